"""Robustness evaluation: Empirical Robustness, success rate and robust accuracy of a run's
classifiers under the five attacks, with the paper's "best in N of M scenarios" table.

Definitions (also written into every ``results.json``):

- **clean accuracy**: fraction of the N test images classified correctly.
- **Empirical Robustness (ER)**, as the Adversarial Robustness Toolbox defines it: over the
  inputs whose prediction the attack changes, the mean of ``||x_adv - x||_p / ||x||_p`` with
  the attack's minimal perturbation and ``p`` its norm; restricted to the correctly classified
  test inputs (there "changed" and "fooled" coincide). Higher is more robust.
  Minimization attacks (C&W, DeepFool) return their minimal adversarial directly. Fixed-epsilon
  attacks (FGSM, PGD, BIM) get a per-input minimal epsilon: a grid of ``grid`` epsilons up to
  ``eps_max`` (one Foolbox sweep), then rounds of bisection of every input's bracket
  (largest failing, smallest fooling epsilon) until a round moves ER by less than ``tol``
  (2%) -- the search is then fine enough that refining it further changes ER by less.
- **attack success rate**: fraction of the correctly classified inputs that the attack fools
  (within ``eps_max`` for fixed attacks).
- **robust accuracy**: fraction of all N inputs still classified correctly under the attack at
  the budget (L-inf: 0.1 Fashion-MNIST, 8/255 CIFAR-10/SVHN; L2: ``attacks.L2_EPS``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm.auto import tqdm

from darekit import io
from darekit.attacks import DEFAULT_ATTACKS, L2_EPS, LINF_EPS, get_spec, run_attack, sweep_attack
from darekit.data import balanced_subset
from darekit.errors import DareError
from darekit.rundir import Run

DEFINITIONS = {
    "clean_accuracy": "fraction of the N test images classified correctly",
    "er": "Empirical Robustness (ART): mean over the correctly classified inputs that the attack "
          "fools of ||x_adv - x||_p / ||x||_p, minimal perturbation, p = the attack's norm",
    "success_rate": "fraction of the correctly classified inputs the attack fools "
                    "(within eps_max for fixed-epsilon attacks)",
    "robust_accuracy": "fraction of all N inputs still classified correctly under the attack "
                       "at the budget",
    "min_eps_search": "fixed-epsilon attacks: grid of `grid` epsilons up to eps_max, then "
                      "bisection of each input's bracket until ER moves by less than `tol`",
}

NORM_ORD = {"linf": np.inf, "l2": 2}


@dataclass(frozen=True)
class SearchConfig:
    """Minimal-epsilon search for fixed-epsilon attacks (defaults: see module docstring)."""

    grid: int = 8
    eps_max_factor: float = 4.0  # eps_max = factor x the dataset's budget; budget on the grid
    tol: float = 0.02
    max_rounds: int = 8

    def __post_init__(self) -> None:
        if self.grid < 2 or self.max_rounds < 0 or not 0 < self.tol < 1:
            raise DareError("search: grid >= 2, max_rounds >= 0 and tol in (0, 1) required")
        if not self.eps_max_factor >= 1:
            raise DareError(f"--eps-max-factor must be >= 1; received {self.eps_max_factor}")


def budget(attack: str, dataset: str) -> float:
    """The fixed budget at which robust accuracy is reported, by the attack's norm."""
    norm = get_spec(attack).norm
    table = LINF_EPS if norm == "linf" else L2_EPS
    if dataset not in table:
        raise DareError(f"no {norm} budget for dataset {dataset!r}")
    return float(table[dataset])


def input_norms(x: np.ndarray, norm: str) -> np.ndarray:
    """``||x||_p`` per image, ``(N,)`` (float64)."""
    return np.linalg.norm(x.reshape(len(x), -1).astype(np.float64), ord=NORM_ORD[norm], axis=1)


def empirical_robustness(perturbation: np.ndarray, x_norm: np.ndarray, fooled: np.ndarray
                         ) -> float:
    """ART's ER: mean of ``perturbation / x_norm`` over ``fooled``; 0.0 when none is fooled."""
    if not fooled.any():
        return 0.0
    return float(np.mean(perturbation[fooled] / x_norm[fooled]))


@dataclass(frozen=True, eq=False)
class AttackEvaluation:
    """One model under one attack on N images. Per-input arrays are ``(N,)``:
    ``perturbation`` holds the minimal perturbation norm (NaN where not fooled)."""

    attack: str
    norm: str
    clean_correct: np.ndarray
    fooled: np.ndarray
    perturbation: np.ndarray
    x_norm: np.ndarray
    robust_at_budget: np.ndarray
    budget: float
    er_trace: tuple[float, ...]
    config: dict[str, Any]

    @property
    def er(self) -> float:
        return self.er_trace[-1]

    def summary(self) -> dict[str, Any]:
        n_correct = int(self.clean_correct.sum())
        return {
            "attack": self.attack, "norm": self.norm, "n": len(self.clean_correct),
            "clean_accuracy": float(self.clean_correct.mean()),
            "er": self.er,
            "n_fooled": int(self.fooled.sum()),
            "success_rate": float(self.fooled.sum() / n_correct) if n_correct else math.nan,
            "robust_accuracy": float(self.robust_at_budget.mean()),
            "budget": self.budget,
            "search_rounds": len(self.er_trace) - 1,
            "er_last_change": (abs(self.er_trace[-1] - self.er_trace[-2]) / self.er_trace[-2]
                               if len(self.er_trace) > 1 and self.er_trace[-2] else 0.0),
        }

    def robust_curve(self, epsilons: np.ndarray) -> np.ndarray:
        """Robust accuracy at each epsilon, from the per-input minimal perturbations
        ``(K,)``: an input counts as robust at eps when correct and not fooled within eps."""
        p = np.where(self.fooled, self.perturbation, np.inf)
        return np.array([np.mean(self.clean_correct & (p > e)) for e in epsilons])


def evaluate_attack(model: keras.Model, x: np.ndarray, y: np.ndarray, attack: str, *,
                    dataset: str, search: SearchConfig = SearchConfig(),
                    params: Mapping[str, Any] | None = None, batch_size: int = 256,
                    seed: int = 0, progress: bool = True) -> AttackEvaluation:
    """Attack ``x`` ``(N, H, W, C)`` with labels ``y`` ``(N,)``; see the module docstring."""
    spec = get_spec(attack)
    eps_budget = budget(attack, dataset)
    x_norm = input_norms(x, spec.norm)
    pick = 0 if spec.norm == "linf" else 1   # index of the attack's norm in (linf, l2)

    if spec.kind == "minimization":
        res = run_attack(model, x, y, spec, eps=None, params=params, batch_size=batch_size,
                         seed=seed, progress=progress)
        pert = (res.linf, res.l2)[pick].astype(np.float64)
        fooled = res.fooled
        er = empirical_robustness(pert, x_norm, fooled)
        return AttackEvaluation(
            attack=spec.name, norm=spec.norm, clean_correct=res.clean_correct, fooled=fooled,
            perturbation=np.where(fooled, pert, np.nan), x_norm=x_norm,
            robust_at_budget=res.clean_correct & ~(fooled & (pert <= eps_budget)),
            budget=eps_budget, er_trace=(er,), config={**res.config, "budget": eps_budget})

    eps_max = search.eps_max_factor * eps_budget
    grid = eps_max * np.arange(1, search.grid + 1) / search.grid
    sw = sweep_attack(model, x, y, spec, list(grid), params=params, batch_size=batch_size,
                      seed=seed, progress=progress)
    correct = sw.clean_correct
    fooled_k = sw.success & correct[None, :]
    fooled = fooled_k.any(axis=0)
    first = np.argmax(fooled_k, axis=0)
    cols = np.arange(len(x))
    hi = np.where(fooled, grid[first], np.nan)
    lo = np.where(fooled & (first > 0), grid[np.maximum(first - 1, 0)], 0.0)
    pert = np.where(fooled, (sw.linf, sw.l2)[pick][first, cols], np.nan).astype(np.float64)
    # Robust accuracy at the budget: the budget lies on the grid (eps_max = factor x budget).
    k_budget = int(np.argmin(np.abs(grid - eps_budget)))
    robust = ~sw.success[k_budget]
    trace = [empirical_robustness(pert, x_norm, fooled)]
    for _ in range(search.max_rounds):
        idx = np.flatnonzero(fooled)
        if len(idx) == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        # One Foolbox call per distinct midpoint; bisection keeps them on a dyadic grid.
        for m in np.unique(mid):
            sel = idx[mid == m]
            res = run_attack(model, x[sel], y[sel], spec, eps=float(m), params=params,
                             batch_size=batch_size, seed=seed, progress=False)
            ok = res.success
            hi[sel[ok]] = m
            pert[sel[ok]] = (res.linf, res.l2)[pick][ok]
            lo[sel[~ok]] = m
        trace.append(empirical_robustness(pert, x_norm, fooled))
        if trace[-2] > 0 and abs(trace[-1] - trace[-2]) / trace[-2] < search.tol:
            break
    config = {**sw.config, "eps": None, "grid": grid.tolist(), "budget": eps_budget,
              "search": asdict(search)}
    return AttackEvaluation(
        attack=spec.name, norm=spec.norm, clean_correct=correct, fooled=fooled,
        perturbation=pert, x_norm=x_norm, robust_at_budget=robust, budget=eps_budget,
        er_trace=tuple(trace), config=config)


# ---------------------------------------------------------------------------- comparison table
def best_counts(rows: Sequence[Mapping[str, Any]], *, scenario: Sequence[str] = ("arch", "attack"),
                method: str = "model", value: str = "er"
                ) -> tuple[dict[tuple, set[str]], dict[str, int], int]:
    """For every scenario (rows sharing the ``scenario`` keys), the method(s) with the highest
    ``value`` (ties all count), and per method the number of scenarios where it is best.

    Returns ``(best per scenario, count per method, number of scenarios)``.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in scenario), []).append(r)
    best: dict[tuple, set[str]] = {}
    counts: dict[str, int] = {r[method]: 0 for r in rows}
    for key, group in groups.items():
        vals = [float(r[value]) for r in group if not math.isnan(float(r[value]))]
        if not vals:
            best[key] = set()
            continue
        top = max(vals)
        best[key] = {r[method] for r in group if float(r[value]) == top}
        for m in best[key]:
            counts[m] += 1
    return best, counts, len(groups)


def markdown_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> str:
    """Per dataset: one line per (arch, attack) scenario, one ER column per method, the best
    in bold; then "best in N of M scenarios" per method, and clean accuracy per method."""
    out: list[str] = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        drows = [r for r in rows if r["dataset"] == dataset]
        present = [m for m in methods if any(r["model"] == m for r in drows)]
        best, counts, n_scen = best_counts(drows)
        out += [f"### {dataset}: Empirical Robustness (higher is more robust)", "",
                "| model | attack | " + " | ".join(present) + " |",
                "|---|---|" + "---|" * len(present)]
        for (arch, attack), winners in best.items():
            cells = []
            for m in present:
                r = next((r for r in drows if (r["arch"], r["attack"], r["model"]) ==
                          (arch, attack, m)), None)
                v = "" if r is None else f"{float(r['er']):.4f}"
                cells.append(f"**{v}**" if m in winners and v else v)
            out.append(f"| {arch} | {attack} | " + " | ".join(cells) + " |")
        out += ["", "| method | best in | clean accuracy |", "|---|---|---|"]
        for m in present:
            accs = {(r["arch"]): float(r["clean_accuracy"]) for r in drows if r["model"] == m}
            acc = ", ".join(f"{a} {v:.3f}" for a, v in accs.items())
            out.append(f"| {m} | {counts.get(m, 0)} of {n_scen} | {acc} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- a run's models
EVAL_DIR = "eval"


@dataclass(frozen=True)
class EvalConfig:
    """What ``dare/test.py`` evaluates: every model of a run under every attack, on the same
    ``n`` seeded, class-balanced test images."""

    n: int = 1000
    seed: int = 0
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    models: tuple[str, ...] | None = None   # None: every model of the run
    batch_size: int = 256
    search: SearchConfig = SearchConfig()
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per attack


    def __post_init__(self) -> None:
        if self.n < 10:
            raise DareError(f"--n must be at least 10 test images; received {self.n}")
        if self.batch_size < 1:
            raise DareError(f"--batch-size must be positive; received {self.batch_size}")
        for a in self.attacks:
            get_spec(a)
        for a, p in self.params.items():
            get_spec(a).params(**p)  # unknown attack or parameter: fail now, not mid-run


def _part_paths(run: Run, model: str, attack: str) -> tuple[Path, Path]:
    stem = run.path / EVAL_DIR / "parts" / f"{model}__{attack}"
    return stem.with_suffix(".json"), stem.with_suffix(".npz")


def evaluate_run(run: Run, cfg: EvalConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the run's models (``original``, ``dare``, ``adv-fgsm``...) under the attacks.

    Every (model, attack) result is saved as soon as it is done (``eval/parts/``), so an
    interrupted evaluation continues where it stopped. Writes ``eval/results.csv``,
    ``results.json``, ``report.md`` and the plots; returns the result rows.
    """
    models = list(cfg.models) if cfg.models else run.named_models()
    missing = [m for m in models if m != "original" and not run.model_path(m).is_file()]
    if missing:
        raise DareError(f"run {run.path} has no model(s) {missing}; it has {run.named_models()}")
    data = run.data()
    idx = balanced_subset(data.y_test, min(cfg.n, len(data.y_test)), cfg.seed)
    x, y = data.x_test[idx], data.y_test[idx]
    io.write_json(run.path / EVAL_DIR / "config.json",
                  {"eval": {**asdict(cfg), "test_idx": idx}, "definitions": DEFINITIONS})
    rows: list[dict[str, Any]] = []
    configs: dict[str, Any] = {}
    todo = [(m, a) for m in models for a in cfg.attacks]
    bar = tqdm(todo, desc="evaluation", unit="scenario", disable=not progress)
    loaded: dict[str, keras.Model] = {}
    for model_name, attack in bar:
        bar.set_postfix_str(f"{model_name} / {attack}")
        meta_path, arrays_path = _part_paths(run, model_name, attack)
        params = dict(cfg.params.get(attack, {}))
        key = {"n": len(idx), "seed": cfg.seed, "search": asdict(cfg.search),
               "params": params, "weights_mtime": _mtime(run, model_name)}
        if meta_path.is_file() and io.read_json(meta_path).get("key") == key:
            meta = io.read_json(meta_path)
        else:
            if model_name not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[model_name] = run.load_named(model_name)
            ev = evaluate_attack(loaded[model_name], x, y, attack, dataset=run.dataset_name,
                                 search=cfg.search, params=params, batch_size=cfg.batch_size,
                                 seed=cfg.seed, progress=progress)
            io.write_npz(arrays_path, clean_correct=ev.clean_correct, fooled=ev.fooled,
                         perturbation=ev.perturbation, x_norm=ev.x_norm,
                         robust_at_budget=ev.robust_at_budget)
            meta = {"key": key, "summary": ev.summary(), "config": ev.config,
                    "er_trace": list(ev.er_trace)}
            io.write_json(meta_path, meta)
        configs[attack] = meta["config"]
        rows.append({"dataset": run.dataset_name, "arch": run.model_name, "model": model_name,
                     **meta["summary"]})
    write_results(run, rows, configs)
    return rows


def _mtime(run: Run, model: str) -> float:
    path = run.epoch_path(run.history_epochs()[-1]) if model == "original" else \
        run.model_path(model)
    return path.stat().st_mtime


def write_results(run: Run, rows: list[dict[str, Any]], configs: Mapping[str, Any]) -> None:
    """``eval/results.csv``, ``results.json`` (numbers as numbers, attack configurations,
    definitions), ``report.md`` and the PNG plots."""
    from darekit import plots

    out = run.path / EVAL_DIR
    io.write_csv(out / "results.csv", rows)
    io.write_json(out / "results.json", {"run": str(run.path), "definitions": DEFINITIONS,
                                         "attacks": dict(configs), "results": rows})
    methods = list(dict.fromkeys(r["model"] for r in rows))
    io.write_text(out / "report.md", f"# Robustness of {run.model_name} on {run.dataset_name}"
                  f"\n\nRun: `{run.path}`\n\n" + markdown_table(rows, methods)
                  + "\n" + definitions_markdown())
    plots.plot_run(run, rows)


def definitions_markdown() -> str:
    return "Definitions:\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in DEFINITIONS.items()) \
        + "\n"


def combined_report(runs: Sequence[Run]) -> str:
    """One Markdown report over several evaluated runs: a table per dataset, best-in-N counts
    over every (architecture, attack) scenario of that dataset."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        path = run.path / EVAL_DIR / "results.json"
        if not path.is_file():
            raise DareError(f"run {run.path} has not been evaluated (no {path})")
        rows += io.read_json(path)["results"]
    methods = list(dict.fromkeys(r["model"] for r in rows))
    runs_md = "\n".join(f"- `{r.path}`" for r in runs)
    return ("# Robustness comparison\n\nRuns:\n\n" + runs_md + "\n\n"
            + markdown_table(rows, methods) + "\n" + definitions_markdown())
