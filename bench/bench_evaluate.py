"""Minimal-epsilon search for FGSM, BIM and PGD: the previous implementation against the
current one, side by side on the same model and images.

    python bench/bench_evaluate.py --run-dir runs/fashion_mnist-alexnet-quick-s0 --n 100

- **previous**: the search the package shipped before (``legacy_search`` below, copied from
  it): a grid of 8 epsilons up to 4x the budget (one Foolbox sweep), then bisection rounds with
  one Foolbox call per distinct midpoint, stopped when a round moves ER by less than 2%. Its
  precision is not guaranteed; the table shows the relative bracket it really left.
- **search + Foolbox**: the current search (per-input brackets closed to ``tol``, margin
  interpolation) with every probe run by Foolbox, one call per distinct epsilon: isolates
  what the search gains.
- **search + engine, bisection** and **search + engine** (what ``dare/test.py`` runs): the
  compiled per-input-epsilon engine, without and with margin interpolation.

Each row reports seconds, the attack passes per image (``evaluations / n``), the largest
relative bracket left over the fooled images (ER overstates its bracketed minimum by at most
``b / (1 - b)``) and ER. The ratio is previous / current at equal images; the current search's
precision (tol 0.01) is equal or better. Goal: >= 4x for FGSM, BIM and PGD.
"""
import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import numpy as np  # noqa: E402

from darekit.attacks import get_spec, run_attack, sweep_attack  # noqa: E402
from darekit.data import balanced_subset  # noqa: E402
from darekit.evaluate import (  # noqa: E402
    SearchConfig,
    _engine_probe,
    _foolbox_probe,
    attack_budget,
    input_norms,
    margins,
    minimal_epsilons,
)
from darekit.rundir import Run  # noqa: E402


def legacy_search(model, x, y, attack, budget, seed=0, grid=8, factor=4.0, tol=0.02,
                  max_rounds=8):
    """The previous implementation's search for a fixed-epsilon attack (Foolbox): returns
    ``(hi, lo, perturbation)`` per input (NaN where not fooled) and the attack passes made."""
    spec = get_spec(attack)
    pick = 0 if spec.norm == "linf" else 1
    eps_max = factor * budget
    grid_eps = eps_max * np.arange(1, grid + 1) / grid
    sw = sweep_attack(model, x, y, spec, list(grid_eps), seed=seed, progress=False)
    fooled_k = sw.success & sw.clean_correct[None, :]
    fooled = fooled_k.any(axis=0)
    first = np.argmax(fooled_k, axis=0)
    cols = np.arange(len(x))
    hi = np.where(fooled, grid_eps[first], np.nan)
    lo = np.where(fooled & (first > 0), grid_eps[np.maximum(first - 1, 0)], 0.0)
    pert = np.where(fooled, (sw.linf, sw.l2)[pick][first, cols], np.nan).astype(np.float64)
    x_norm = input_norms(x, spec.norm)
    er = lambda: float(np.mean(pert[fooled] / x_norm[fooled]))
    trace = [er()]
    evaluations = grid * len(x)
    for _ in range(max_rounds):
        idx = np.flatnonzero(fooled)
        evaluations += len(idx)
        mid = (lo[idx] + hi[idx]) / 2
        for m in np.unique(mid):   # one Foolbox call per distinct midpoint
            sel = idx[mid == m]
            res = run_attack(model, x[sel], y[sel], spec, eps=float(m), seed=seed,
                             progress=False)
            ok = res.success
            hi[sel[ok]] = m
            pert[sel[ok]] = (res.linf, res.l2)[pick][ok]
            lo[sel[~ok]] = m
        trace.append(er())
        if abs(trace[-1] - trace[-2]) / trace[-2] < tol:
            break
    return hi, lo, pert, evaluations


def bracket(hi, lo):
    f = ~np.isnan(hi)
    return float(np.max((hi[f] - lo[f]) / hi[f])) if f.any() else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a trained run (its final model)")
    p.add_argument("--n", type=int, default=100, help="test images (class-balanced)")
    p.add_argument("--attacks", default="fgsm,bim,pgd")
    p.add_argument("--skip-foolbox-search", action="store_true",
                   help="skip the slow 'search + Foolbox' row")
    a = p.parse_args()

    run = Run.open(a.run_dir)
    model, data = run.load_model(), run.data()
    idx = balanced_subset(data.y_test, a.n, 0)
    x, y = data.x_test[idx], data.y_test[idx]
    m0 = margins(model, x, y)
    active = m0 > 0
    tol = SearchConfig().tol
    print(f"{run.model_name} on {run.dataset_name}, {a.n} test images "
          f"({int(active.sum())} classified correctly), tol {tol}")
    print(f"{'attack':6s} {'method':30s} {'seconds':>8s} {'passes/img':>10s} "
          f"{'bracket':>8s} {'ER':>8s}")
    for attack in a.attacks.split(","):
        spec = get_spec(attack)
        budget = attack_budget(attack, run.dataset_name)
        x_norm = input_norms(x, spec.norm)
        params = spec.params()
        rows = {}
        t0 = time.perf_counter()
        hi, lo, pert, evaluations = legacy_search(model, x, y, attack, budget)
        f = ~np.isnan(hi)
        rows["previous (grid + Foolbox)"] = (time.perf_counter() - t0, evaluations / a.n,
                                             bracket(hi, lo), np.mean(pert[f] / x_norm[f]))
        variants = [("search + engine, bisection", _engine_probe, False),
                    ("search + engine", _engine_probe, True)]
        if not a.skip_foolbox_search:
            variants.insert(0, ("search + Foolbox", _foolbox_probe, True))
        for name, make, interp in variants:
            probe = make(model, spec, params, x, y, 256, 0)
            t0 = time.perf_counter()
            m = minimal_epsilons(probe, active, budget, 4 * budget, tol, 24, m0,
                                 interpolate=interp)
            f = m.fooled
            rows[name] = (time.perf_counter() - t0, m.evaluations / a.n, m.bracket(),
                          np.mean(m.perturbation[f] / x_norm[f]))
        for name, (sec, passes, br, er) in rows.items():
            print(f"{attack:6s} {name:30s} {sec:8.1f} {passes:10.2f} {br:8.4f} {er:8.4f}")
        prev = rows["previous (grid + Foolbox)"][0]
        cur = rows["search + engine"][0]
        print(f"{attack:6s} ratio previous / current: {prev / cur:.2f}x  (goal >= 4)")


if __name__ == "__main__":
    main()
