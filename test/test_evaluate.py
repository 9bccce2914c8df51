"""Evaluation: ER against analytic minimal perturbations, the comparison table, resumability."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import run_script

from darekit import evaluate, io
from darekit.errors import DareError
from darekit.evaluate import (
    EvalConfig,
    SearchConfig,
    best_counts,
    empirical_robustness,
    evaluate_attack,
    evaluate_run,
    markdown_table,
)
from darekit.models import get_architecture
from darekit.rundir import Run


def linear_binary(seed: int = 0, shape=(4, 4, 1)):
    """A linear two-class classifier ``z = W x + b`` and inputs near its boundary.

    For a linear model the minimal perturbations are known in closed form: with
    ``f(x) = (w1 - w0) . x + (b1 - b0)`` and ``w = w1 - w0``, the smallest L2 change that
    flips the decision is ``|f(x)| / ||w||_2`` and the smallest L-inf change (what FGSM's
    minimal epsilon finds) is ``|f(x)| / ||w||_1``.
    """
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                              keras.layers.Dense(2, name="logits")])
    w = rng.normal(size=(d, 2)).astype("float32")
    model.get_layer("logits").set_weights([w, np.zeros(2, "float32")])
    x = rng.uniform(0.35, 0.65, size=(200, *shape)).astype("float32")
    wd = w[:, 1] - w[:, 0]
    f = x.reshape(len(x), -1) @ wd
    keep = np.abs(f) > 1e-3
    x, f = x[keep][:64], f[keep][:64]
    y = (f > 0).astype("int64")  # labels = the model's own predictions: all correct
    return model, x, y, np.abs(f), wd


def test_deepfool_er_matches_the_analytic_minimal_l2_perturbation():
    model, x, y, f, wd = linear_binary()
    ev = evaluate_attack(model, x, y, "deepfool", dataset="fashion_mnist", progress=False)
    expected = np.mean((f / np.linalg.norm(wd)) / np.linalg.norm(x.reshape(len(x), -1), axis=1))
    assert ev.fooled.all()
    # DeepFool lands (1 + overshoot) = 1.02 times the distance across: 2% above, so 3% bounds it.
    assert ev.er == pytest.approx(expected, rel=0.03)
    assert ev.er >= expected * 0.999


def test_fgsm_minimal_epsilon_search_matches_the_analytic_linf_distance():
    model, x, y, f, wd = linear_binary(seed=1)
    eps_star = f / np.abs(wd).sum()
    budget = float(np.median(eps_star))  # grid up to 4 x this covers almost every input
    search = SearchConfig(grid=8, tol=0.02)
    ev = evaluate_attack(model, x, y, "fgsm", dataset="fashion_mnist", search=search,
                         progress=False, params=None)
    # The evaluation budget is the dataset's (0.1); only inputs fooled within eps_max count.
    fooled = ev.fooled
    assert fooled.sum() >= 0.9 * len(x)
    expected = np.mean(eps_star[fooled] / np.abs(x.reshape(len(x), -1)).max(1)[fooled])
    # The search stops once a bisection round moves ER by < 2%; each input's epsilon is then
    # within its bracket above the true minimum, so ER sits slightly above the analytic value.
    assert ev.er == pytest.approx(expected, rel=0.05)
    assert ev.er >= expected * 0.999
    assert budget > 0


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "deepfool"])
def test_robust_accuracy_never_exceeds_clean_accuracy(fm_run, attack):
    run = Run.open(fm_run)
    data = run.data()
    ev = evaluate_attack(run.load_model(), data.x_test[:60], data.y_test[:60], attack,
                         dataset="fashion_mnist", search=SearchConfig(grid=4, max_rounds=2),
                         progress=False)
    s = ev.summary()
    assert s["robust_accuracy"] <= s["clean_accuracy"]
    assert s["success_rate"] > 0.5  # a standard model is fooled at these budgets
    assert s["er"] > 0


def test_empirical_robustness_is_zero_when_nothing_is_fooled():
    assert empirical_robustness(np.ones(3), np.ones(3), np.zeros(3, bool)) == 0.0
    assert empirical_robustness(np.array([0.1, 0.3, 9.0]), np.array([1.0, 1.0, 1.0]),
                                np.array([True, True, False])) == pytest.approx(0.2)


TABLE = [  # a hand-made comparison: 2 architectures x 2 attacks, 3 methods
    {"dataset": "d", "arch": "vgg16", "attack": "fgsm", "model": "original", "er": 0.10},
    {"dataset": "d", "arch": "vgg16", "attack": "fgsm", "model": "dare", "er": 0.30},
    {"dataset": "d", "arch": "vgg16", "attack": "fgsm", "model": "adv-fgsm", "er": 0.20},
    {"dataset": "d", "arch": "vgg16", "attack": "cw", "model": "original", "er": 0.05},
    {"dataset": "d", "arch": "vgg16", "attack": "cw", "model": "dare", "er": 0.04},
    {"dataset": "d", "arch": "vgg16", "attack": "cw", "model": "adv-fgsm", "er": 0.06},
    {"dataset": "d", "arch": "alexnet", "attack": "fgsm", "model": "original", "er": 0.20},
    {"dataset": "d", "arch": "alexnet", "attack": "fgsm", "model": "dare", "er": 0.25},
    {"dataset": "d", "arch": "alexnet", "attack": "fgsm", "model": "adv-fgsm", "er": 0.25},
    {"dataset": "d", "arch": "alexnet", "attack": "cw", "model": "original", "er": 0.01},
    {"dataset": "d", "arch": "alexnet", "attack": "cw", "model": "dare", "er": 0.09},
    {"dataset": "d", "arch": "alexnet", "attack": "cw", "model": "adv-fgsm", "er": float("nan")},
]


def test_best_in_n_counts_a_hand_made_table():
    best, counts, n = best_counts(TABLE)
    assert n == 4
    assert best[("vgg16", "fgsm")] == {"dare"}
    assert best[("vgg16", "cw")] == {"adv-fgsm"}
    assert best[("alexnet", "fgsm")] == {"dare", "adv-fgsm"}  # a tie: both are best
    assert best[("alexnet", "cw")] == {"dare"}                 # NaN never wins
    assert counts == {"original": 0, "dare": 3, "adv-fgsm": 2}


def test_markdown_table_marks_the_best_and_counts():
    rows = [{**r, "clean_accuracy": 0.9} for r in TABLE]
    md = markdown_table(rows, ["original", "dare", "adv-fgsm"])
    assert "| vgg16 | fgsm | 0.1000 | **0.3000** | 0.2000 |" in md
    assert "| dare | 3 of 4 |" in md and "| original | 0 of 4 |" in md


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


SMALL = EvalConfig(n=30, attacks=("fgsm", "deepfool"), search=SearchConfig(grid=4, max_rounds=2))


def test_evaluate_run_writes_results_and_resumes(eval_run, monkeypatch):
    rows = evaluate_run(eval_run, SMALL, progress=False)
    assert {(r["model"], r["attack"]) for r in rows} == {
        (m, a) for m in ("original", "epoch1") for a in ("fgsm", "deepfool")}
    out = eval_run.path / "eval"
    for name in ("results.csv", "results.json", "report.md", "robust_accuracy.png", "er.png"):
        assert (out / name).is_file(), name
    js = io.read_json(out / "results.json")
    assert isinstance(js["results"][0]["er"], float) and "er" in js["definitions"]
    assert js["attacks"]["fgsm"]["params"] and js["attacks"]["deepfool"]["foolbox"]

    # Interrupted after the first scenario: the rerun attacks only what is missing.
    (out / "parts" / "epoch1__deepfool.json").unlink()
    calls = []
    real = evaluate.evaluate_attack
    monkeypatch.setattr(evaluate, "evaluate_attack",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    rows2 = evaluate_run(eval_run, SMALL, progress=False)
    assert calls == ["deepfool"]
    assert [r["er"] for r in rows2[:3]] == [r["er"] for r in rows[:3]]


def test_model_file_that_does_not_match_its_run_fails_clearly(eval_run):
    other = get_architecture("alexnet").build((28, 28, 1), 10)  # same input, other layers
    eval_run.save_model(other, "foreign")
    with pytest.raises(DareError, match="does not match run"):
        evaluate_run(eval_run, EvalConfig(n=10, attacks=("fgsm",), models=("foreign",)),
                     progress=False)


def test_cli_rejects_bad_options(tmp_path):
    proc = run_script("dare/test.py", "--run-dir", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "no run at" in proc.stderr
    proc = run_script("dare/test.py", "--run-dir", tmp_path, "--attack", "nope", check=False)
    assert proc.returncode == 2 and "unknown attack" in proc.stderr
    assert "Traceback" not in proc.stderr
