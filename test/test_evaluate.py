"""Evaluation: ER against closed-form minimal perturbations of linear multi-class models, the
search's bracket guarantee, and a run's evaluation (files, resume, bad options)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import call_script
from hypothesis import given, settings
from hypothesis import strategies as st
from linear_models import Linear, dense, disjoint, inputs_where

from darekit import evaluate, io, layout
from darekit.errors import DareError
from darekit.evaluate import (
    EvalConfig,
    SearchConfig,
    empirical_robustness,
    evaluate_attack,
    evaluate_run,
    minimal_epsilons,
)
from darekit.models import get_architecture
from darekit.rundir import Run

BUDGET = 0.05   # L-inf: eps_max = 4 x 0.05 = 0.2 keeps every probe inside [0, 1] (inputs 0.4-0.6)
L2_BUDGET = 0.5
TOL = SearchConfig().tol
# Where the true minimal epsilons lie, relative to the budget: spread over the whole search
# range, or packed into a narrow band far below the budget (the first cell of the old grid,
# where a stopping rule on ER's movement stopped while every bracket was still wide).
WHERE = {"spread": (0.08, 3.6), "packed": (0.21, 0.23)}


def _relative_er(truth: np.ndarray, x: np.ndarray, norm: str) -> float:
    ord_ = np.inf if norm == "linf" else 2
    return float(np.mean(truth / np.linalg.norm(x.reshape(len(x), -1), ord=ord_, axis=1)))


@pytest.fixture(scope="module")
def block_model() -> Linear:
    return disjoint(seed=3)


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("attack", ["fgsm", "bim", "pgd"])
def test_fixed_attacks_find_the_closed_form_linf_minimum(block_model, attack, where):
    lo_f, hi_f = WHERE[where]
    x, y = inputs_where(block_model, block_model.linf_optimum, lo_f * BUDGET, hi_f * BUDGET,
                        n=40, seed=1)
    truth = block_model.linf_optimum(x)
    ev = evaluate_attack(block_model.model, x, y, attack, budget=BUDGET, progress=False)
    assert ev.clean_correct.all() and ev.fooled.all()
    # Every input's bracket holds its true minimum and is closed to tol (float32 rounding of
    # the model's logits allowed: 1e-4 relative).
    assert np.all(ev.lo < truth * (1 + 1e-4)) and np.all(ev.hi >= truth * (1 - 1e-4))
    assert np.all(ev.hi - ev.lo <= TOL * ev.hi * (1 + 1e-9))
    expected = _relative_er(truth, x, "linf")
    assert expected * (1 - 1e-4) <= ev.er <= expected * 1.02
    assert ev.bracket() <= TOL


def test_the_budget_is_probed_first_and_gives_robust_accuracy(block_model):
    x, y = inputs_where(block_model, block_model.linf_optimum, 0.3 * BUDGET, 3 * BUDGET, n=40)
    truth = block_model.linf_optimum(x)
    ev = evaluate_attack(block_model.model, x, y, "fgsm", budget=BUDGET, progress=False)
    np.testing.assert_array_equal(ev.robust_at_budget, truth > BUDGET)
    assert 0 < ev.robust_at_budget.mean() < 1  # both kinds of input are present


@pytest.fixture(scope="module")
def dense_model() -> Linear:
    return dense(seed=5)


def test_fgsm_line_search_matches_its_closed_form_on_a_dense_model(dense_model):
    x, y = inputs_where(dense_model, dense_model.fgsm_minimum, 0.1 * BUDGET, 3.5 * BUDGET,
                        n=40, seed=2)
    truth = dense_model.fgsm_minimum(x)
    optimum = dense_model.linf_optimum(x)
    assert np.all(truth >= optimum * (1 - 1e-9)) and np.any(truth > optimum * 1.05)
    ev = evaluate_attack(dense_model.model, x, y, "fgsm", budget=BUDGET, progress=False)
    assert ev.fooled.all()
    assert np.all(ev.lo < truth * (1 + 1e-4)) and np.all(ev.hi >= truth * (1 - 1e-4))
    expected = _relative_er(truth, x, "linf")
    assert expected * (1 - 1e-4) <= ev.er <= expected * 1.02


def test_pgd_never_beats_the_linf_optimum_on_a_dense_model(dense_model):
    x, y = inputs_where(dense_model, dense_model.linf_optimum, 0.1 * BUDGET, 3 * BUDGET,
                        n=40, seed=3)
    optimum = dense_model.linf_optimum(x)
    ev = evaluate_attack(dense_model.model, x, y, "pgd", budget=BUDGET, progress=False)
    f = ev.fooled
    assert f.mean() > 0.9
    assert np.all(ev.perturbation[f] >= optimum[f] * (1 - 1e-4))
    assert ev.er >= _relative_er(optimum[f], x[f], "linf") * (1 - 1e-4)


@pytest.mark.parametrize("model_kind", ["disjoint", "dense"])
def test_deepfool_lands_on_the_minimal_l2_perturbation_times_its_overshoot(model_kind):
    lin = disjoint(seed=4) if model_kind == "disjoint" else dense(seed=6)
    x, y = inputs_where(lin, lin.l2_optimum, 0.05, 1.5, n=40, seed=4)
    truth = lin.l2_optimum(x)
    ev = evaluate_attack(lin.model, x, y, "deepfool", budget=L2_BUDGET, progress=False)
    assert ev.fooled.all()
    # On a linear model DeepFool's first step crosses: Foolbox moves (distance + 1e-4) along
    # the gradient of the nearest class, then scales the step by (1 + overshoot).
    overshoot = 1 + ev.config["params"]["overshoot"]
    np.testing.assert_allclose(ev.perturbation, overshoot * (truth + 1e-4), rtol=1e-4)
    assert ev.er >= _relative_er(truth, x, "l2")


@pytest.mark.parametrize("attack", ["deepfool", "cw"])
@pytest.mark.parametrize("wrong", [0, 7, 20])
def test_minimization_attacks_see_only_the_correctly_classified_images(attack, wrong,
                                                                       monkeypatch):
    """C&W and DeepFool attack only the images the model classifies correctly (a misclassified
    one is neither fooled nor robust whatever comes back); the others stay unfooled and not
    robust, and with none correct nothing is attacked and the config is still recorded."""
    lin = disjoint(seed=4)
    x, y = inputs_where(lin, lin.l2_optimum, 0.05, 1.5, n=20, seed=4)
    y = y.copy()
    y[:wrong] = (y[:wrong] + 1) % int(lin.model.output_shape[-1])  # now misclassified
    seen = []
    real = evaluate.run_attack
    monkeypatch.setattr(evaluate, "run_attack",
                        lambda model, xs, ys, *a, **k: seen.append(len(xs)) or
                        real(model, xs, ys, *a, **k))
    ev = evaluate_attack(lin.model, x, y, attack, budget=L2_BUDGET, progress=False)
    assert seen == ([20 - wrong] if wrong < 20 else [])
    assert not ev.clean_correct[:wrong].any() and ev.clean_correct[wrong:].all()
    assert not ev.fooled[:wrong].any() and ev.fooled[wrong:].all()
    assert not ev.robust_at_budget[:wrong].any()
    assert np.isnan(ev.perturbation[:wrong]).all()
    assert ev.evaluations == 20 - wrong
    assert ev.config["params"] == evaluate.get_spec(attack).params()
    if wrong == 20:
        assert np.isnan(ev.er)


@pytest.mark.parametrize("where", ["spread", "packed"])
def test_cw_converges_to_the_minimal_l2_perturbation(where):
    lin = dense(seed=7)
    band = (0.05, 1.5) if where == "spread" else (0.1, 0.12)
    x, y = inputs_where(lin, lin.l2_optimum, *band, n=40, seed=5)
    truth = lin.l2_optimum(x)
    ev = evaluate_attack(lin.model, x, y, "cw", budget=L2_BUDGET, progress=False)
    assert ev.fooled.all()
    assert np.all(ev.perturbation >= truth * (1 - 1e-4))  # nothing beats the optimum
    expected = _relative_er(truth, x, "l2")
    assert expected <= ev.er <= expected * 1.05


def test_foolbox_reference_and_engine_give_the_same_brackets(block_model):
    x, y = inputs_where(block_model, block_model.linf_optimum, 0.1 * BUDGET, 3 * BUDGET, n=12)
    for attack in ("fgsm", "bim"):  # deterministic attacks: the same decisions
        a = evaluate_attack(block_model.model, x, y, attack, budget=BUDGET, progress=False)
        b = evaluate_attack(block_model.model, x, y, attack, budget=BUDGET, progress=False,
                            search=SearchConfig(engine="foolbox"))
        np.testing.assert_array_equal(a.robust_at_budget, b.robust_at_budget)
        # The searches interpolate logit margins, which the two compute in different batches:
        # float32 rounding may move a proposal by a few ulps, never more.
        np.testing.assert_allclose(a.hi, b.hi, rtol=1e-5)
        np.testing.assert_allclose(a.lo, b.lo, rtol=1e-5)
        assert a.config["search"]["engine"] == "tf" and b.config["search"]["engine"] == "foolbox"


# ---------------------------------------------------------------------------- the search itself
@settings(max_examples=200, deadline=None)
@given(thresholds=st.lists(st.one_of(st.floats(1e-4, 1.0), st.just(np.inf)), min_size=1,
                           max_size=30),
       budget=st.floats(0.01, 0.3), factor=st.floats(1.0, 8.0), tol=st.floats(0.001, 0.2),
       shape=st.sampled_from([0, 1, 2]))
def test_bracket_guarantee_of_a_monotone_attack(thresholds, budget, factor, tol, shape):
    """An attack that fools input i exactly from epsilon t_i on: every input fooled within
    eps_max ends with lo < t_i <= hi and hi - lo <= tol * hi, or the rounds ran out."""
    t = np.array(thresholds)
    calls = []

    def probe(idx, eps, r):
        calls.append((idx.copy(), eps.copy()))
        # A margin that is informative (linear in eps), uninformative (constant) or
        # misleading (rising) must not change the guarantee, only the speed.
        margin = {0: t[idx] - eps, 1: np.where(eps >= t[idx], -1.0, 1.0),
                  2: eps - t[idx] + 0.5}[shape]
        return eps >= t[idx], eps.copy(), np.where(eps >= t[idx], -np.abs(margin),
                                                   np.abs(margin) + 1e-9)

    eps_max = factor * budget
    active = np.ones(len(t), bool)
    clean = {0: t, 1: np.ones(len(t)), 2: np.full(len(t), 0.5)}[shape]
    m = minimal_epsilons(probe, active, budget, eps_max, tol, max_rounds=200,
                         clean_margin=np.where(np.isfinite(clean), clean, 1e9))
    assert np.all(calls[0][1] == budget)                    # round 0 is the budget
    fooled = ~np.isnan(m.hi)
    np.testing.assert_array_equal(fooled, t <= eps_max)
    assert np.all(m.lo[fooled] < t[fooled]) and np.all(t[fooled] <= m.hi[fooled])
    assert np.all(m.hi[fooled] - m.lo[fooled] <= tol * m.hi[fooled] * (1 + 1e-12) + 1e-300)
    assert np.all(m.lo[~fooled] == eps_max)                 # tried up to eps_max
    np.testing.assert_array_equal(m.at_budget, t <= budget)
    # ER at hi overstates the truth by at most tol / (1 - tol)
    if fooled.any():
        assert np.all(m.perturbation[fooled] <= t[fooled] / (1 - tol) * (1 + 1e-12))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 20))
def test_bracket_invariant_holds_for_a_random_attack(seed, n):
    """Whatever an attack answers (randomly here), ``hi`` is an epsilon where it succeeded
    and ``lo`` one where it failed (or 0), and no epsilon exceeds eps_max."""
    rng = np.random.default_rng(seed)
    seen: dict[tuple[int, float], bool] = {}

    def probe(idx, eps, r):
        ok = rng.random(len(idx)) < 0.5
        for i, e, o in zip(idx, eps, ok, strict=True):
            seen.setdefault((int(i), float(e)), []).append(bool(o))
        assert np.all(eps <= 0.4 + 1e-12)
        return ok, eps.copy(), np.where(ok, -1.0, 1.0) * rng.random(len(idx))

    m = minimal_epsilons(probe, np.ones(n, bool), 0.1, 0.4, 0.01, max_rounds=30)
    for i in range(n):
        if not np.isnan(m.hi[i]):
            assert True in seen[i, float(m.hi[i])]
            assert m.lo[i] < m.hi[i]
        if m.lo[i] > 0:
            assert False in seen[i, float(m.lo[i])]


def test_inactive_inputs_are_never_attacked():
    def probe(idx, eps, r):
        assert not np.isin(idx, [1, 3]).any()
        return np.ones(len(idx), bool), eps.copy(), -np.ones(len(idx))

    m = minimal_epsilons(probe, np.array([1, 0, 1, 0], bool), 0.1, 0.4, 0.01, 50)
    assert np.isnan(m.hi[[1, 3]]).all() and not np.isnan(m.hi[[0, 2]]).any()


def test_search_options_are_validated():
    with pytest.raises(DareError, match="--tol"):
        SearchConfig(tol=0.0)
    with pytest.raises(DareError, match="--engine"):
        SearchConfig(engine="jax")
    assert SearchConfig().precision <= 0.02


def test_empirical_robustness_is_nan_when_nothing_is_fooled():
    assert np.isnan(empirical_robustness(np.ones(3), np.ones(3), np.zeros(3, bool)))
    assert empirical_robustness(np.array([0.1, 0.3, 9.0]), np.array([1.0, 1.0, 1.0]),
                                np.array([True, True, False])) == pytest.approx(0.2)


# ---------------------------------------------------------------------------- a run (real data)
@pytest.mark.slow
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "deepfool"])
def test_robust_accuracy_never_exceeds_clean_accuracy(fm_run, attack):
    run = Run.open(fm_run)
    data = run.data()
    ev = evaluate_attack(run.load_model(), data.x_test[:60], data.y_test[:60], attack,
                         dataset="fashion_mnist", progress=False)
    s = ev.summary()
    assert s["robust_accuracy"] <= s["clean_accuracy"]
    assert s["success_rate"] > 0.5  # a standard model is fooled at these budgets
    assert s["er"] > 0 and s["er_low"] <= s["er"] <= s["er_high"]
    assert s["bracket"] <= SearchConfig().tol or attack == "deepfool"


@pytest.fixture
def eval_run(fm_run, tmp_path):
    """A copy of the trained run (evaluation writes into it) with one derived model."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(fm_run, dst, ignore=shutil.ignore_patterns("eval", "models", "ats",
                                                               "slice", "adv", "logs"))
    run = Run.open(dst)
    model = run.load_model(1)
    run.save_model(model, "epoch1")
    return run


SMALL = EvalConfig(n=30, attacks=("fgsm", "deepfool"), crosscheck=False)


@pytest.mark.slow
def test_evaluate_run_writes_results_and_resumes(eval_run, monkeypatch):
    rows = evaluate_run(eval_run, SMALL, progress=False)
    assert {(r["model"], r["attack"]) for r in rows} == {
        (m, a) for m in ("original", "epoch1") for a in ("fgsm", "deepfool")}
    out = eval_run.path / layout.EVAL_DIR
    for name in ("results.csv", "results.json", "report.md", "robust_accuracy.png", "er.png"):
        assert (out / name).is_file(), name
    js = io.read_json(out / "results.json")
    r0 = js["results"][0]
    assert isinstance(r0["er"], float) and r0["er_low"] <= r0["er"] <= r0["er_high"]
    assert "er" in js["definitions"] and "best" in r0
    assert js["attacks"]["fgsm"]["params"] is not None and js["attacks"]["deepfool"]["foolbox"]
    md = (out / "report.md").read_text()
    assert "significantly best in" in md and "[" in md

    # Interrupted after the first scenarios: the rerun attacks only what is missing.
    (out / "parts" / "epoch1__deepfool.json").unlink()
    calls = []
    real = evaluate.evaluate_attack
    monkeypatch.setattr(evaluate, "evaluate_attack",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    rows2 = evaluate_run(eval_run, SMALL, progress=False)
    assert calls == ["deepfool"]
    assert [r["er"] for r in rows2[:3]] == [r["er"] for r in rows[:3]]


@pytest.mark.slow
def test_model_file_that_does_not_match_its_run_fails_clearly(eval_run):
    other = get_architecture("alexnet").build((28, 28, 1), 10)  # same input, other layers
    eval_run.save_model(other, "foreign")
    with pytest.raises(DareError, match="does not match run"):
        evaluate_run(eval_run, EvalConfig(n=10, attacks=("fgsm",), models=("foreign",)),
                     progress=False)


@pytest.mark.slow
@pytest.mark.jax
def test_evaluation_with_the_crosscheck_end_to_end(eval_run):
    """On either backend (CI runs it under JAX too): two models under FGSM and C&W, and the
    ART cross-check (APGD-CE, targeted APGD-DLR, Square, transfer) through the seam's
    estimator, with the backend and its versions recorded."""
    from darekit import backend as B

    cfg = EvalConfig(n=20, attacks=("fgsm", "cw"), crosscheck_n=16,
                     params={"cw": {"steps": 20}},
                     crosscheck_params={"apgd_iter": 5, "dlr_targets": 1, "square_queries": 30})
    rows = evaluate_run(eval_run, cfg, progress=False)
    assert {(r["model"], r["attack"]) for r in rows} == {
        (m, a) for m in ("original", "epoch1") for a in ("fgsm", "cw")}
    for r in rows:
        assert r["robust_accuracy"] <= r["clean_accuracy"] and r["success_rate"] > 0.5, r
    js = io.read_json(eval_run.path / layout.EVAL_DIR / "results.json")
    checks = {c["model"]: c for c in js["crosscheck"]}
    assert set(checks) == {"original", "epoch1"}
    for c in checks.values():
        acc = c["robust_accuracy"]
        assert set(acc) >= {"apgd_ce", "apgd_t", "square", "transfer"}
        assert c["worst_case_accuracy"] <= min(acc.values()) <= c["clean_accuracy"]
    assert checks["original"]["robust_accuracy"]["apgd_ce"] < checks["original"]["clean_accuracy"]
    part = io.read_json(eval_run.path / layout.EVAL_PARTS / "original__crosscheck.json")
    assert part["config"]["versions"]["backend"] == B.name()
    assert set(part["config"]["versions"]) >= {"art", "keras", "numpy", "backend"}


def test_cli_rejects_bad_options(tmp_path):
    proc = call_script("dare/test.py", "--run-dir", tmp_path / "none")
    assert proc.returncode == 2 and "no run at" in proc.stderr
    proc = call_script("dare/test.py", "--run-dir", tmp_path, "--attack", "nope")
    assert proc.returncode == 2 and "unknown attack" in proc.stderr
    proc = call_script("dare/test.py", "--run-dir", tmp_path, "--tol", "0.7")
    assert proc.returncode == 2 and "--tol" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # Two configs of one command both have an `attacks` field: each keeps its own.
    from darekit.cli.evaluate import parser
    from darekit.config import given
    from darekit.crosscheck import CrossCheckConfig

    args = parser().parse_args(["--attack", "fgsm", "--crosscheck-attacks", "square"])
    assert given(args, EvalConfig) == {"attacks": ("fgsm",)}
    assert given(args, CrossCheckConfig) == {"attacks": ("square",)}
