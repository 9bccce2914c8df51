"""Attacks on the real Fashion-MNIST ``fm_run`` model: strength, threat model, files, CLI."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import call_script, run_script

from darekit import advsets as S
from darekit import attacks as A
from darekit.errors import DareError
from darekit.rundir import Run

N_IMAGES = 64  # correctly classified test images per attack: one batch

# Success rate on correctly classified images at the documented budget, measured on this
# fixture (4 epochs, 1000 images) with margin: FGSM ~0.48, PGD ~0.75, BIM ~0.73, L2-PGD ~0.64,
# C&W and DeepFool 1.0 (unclipped minimal perturbations).
MIN_SUCCESS = {"fgsm": 0.3, "pgd": 0.6, "pgd-margin": 0.6, "bim": 0.55, "l2pgd": 0.45, "cw": 0.95,
               "deepfool": 0.95}


def one_error_line(stderr: str) -> str:
    """The single ``error: ...`` line of a failed command (argparse prefixes it with the
    script's name; TensorFlow may log other lines)."""
    errors = [line for line in stderr.splitlines() if re.match(r"(\S+: )?error: ", line)]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def adv_run(fm_run, tmp_path_factory) -> Run:
    """A private copy of ``fm_run``: these tests write into ``adv/``."""
    dst = tmp_path_factory.mktemp("attacks") / "run"
    shutil.copytree(fm_run, dst)
    return Run.open(dst)


@pytest.fixture(scope="module")
def model(adv_run):
    return adv_run.load_model()


@pytest.fixture(scope="module")
def correct(adv_run, model):
    """``N_IMAGES`` test images the model classifies correctly, and their labels."""
    d = adv_run.data()
    pred = np.argmax(model.predict(d.x_test[:400], verbose=0), -1)
    ok = np.flatnonzero(pred == d.y_test[:400])[:N_IMAGES]
    assert len(ok) == N_IMAGES
    return d.x_test[ok], d.y_test[ok]


@pytest.fixture(scope="module")
def results(model, correct):
    """Each attack's result at its default budget, computed once (lazily) per module."""
    cache: dict[str, A.AttackResult] = {}

    def get(name: str) -> A.AttackResult:
        if name not in cache:
            cache[name] = A.run_attack(model, *correct, name, dataset="fashion_mnist", seed=0,
                                       batch_size=N_IMAGES, progress=False)
        return cache[name]

    return get


def test_registry_is_explicit():
    assert set(A.DEFAULT_ATTACKS) <= set(A.ATTACKS)
    assert A.parse_attacks(["fgsm,pgd", "fgsm", "cw"]) == ("fgsm", "pgd", "cw")
    assert A.parse_attacks(["all"]) == A.DEFAULT_ATTACKS
    cw = A.get_attack("cw")
    assert (cw.binary_search_steps, cw.steps) == (2, 150)  # not Foolbox's 9 x 10,000
    assert A.get_attack("pgd", steps=3).steps == 3
    with pytest.raises(DareError, match="no parameter"):
        A.get_attack("fgsm", steps=3)
    with pytest.raises(DareError, match="unknown attack"):
        A.parse_attacks(["fgsm", "nope"])
    assert A.ATTACKS["pgd"].epsilon("cifar10") == pytest.approx(8 / 255)
    assert A.ATTACKS["fgsm"].epsilon("fashion_mnist") == 0.1
    assert A.ATTACKS["deepfool"].epsilon("fashion_mnist") is None


@pytest.mark.parametrize("name", list(A.ATTACKS))
def test_attack_fools_standard_model(results, name):
    r = results(name)
    assert r.clean_correct.all()
    assert r.success_rate >= MIN_SUCCESS[name], r.summary()


@pytest.mark.parametrize("name", list(A.ATTACKS))
def test_adversarials_respect_threat_model(results, correct, name):
    r, (x, _) = results(name), correct
    spec = A.ATTACKS[name]
    assert r.x_adv.dtype == np.float32 and r.x_adv.shape == x.shape
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    linf, l2 = A._norms(x, r.x_adv)
    np.testing.assert_allclose(r.linf, linf, atol=1e-6)
    np.testing.assert_allclose(r.l2, l2, atol=1e-5)
    eps = r.config["eps"]
    if spec.kind == "fixed":
        bound = r.linf if spec.norm == "linf" else r.l2
        assert bound.max() <= eps + 1e-5
        assert bound.max() > 0.5 * eps  # it did use its budget
    else:
        assert eps is None
        # A minimal perturbation is small for fooled inputs; untouched ones are unchanged.
        assert np.median(r.l2[r.fooled]) < 3.0
        assert np.all(r.l2[~r.success] == 0) or name == "deepfool"


def test_minimization_attack_with_budget_is_clipped(model, correct):
    x, y = correct[0][:16], correct[1][:16]
    r = A.run_attack(model, x, y, "deepfool", eps=0.5, progress=False)
    assert r.l2.max() <= 0.5 + 1e-4
    full = A.run_attack(model, x, y, "deepfool", progress=False)
    assert r.success.sum() <= full.success.sum()


def test_success_matches_model_predictions(model, results, correct):
    r = results("pgd")
    pred = np.argmax(model.predict(r.x_adv, verbose=0), -1)
    np.testing.assert_array_equal(r.success, pred != correct[1])


def test_sweep_several_epsilons_in_one_call(model, correct, results):
    eps = [0.01, 0.05, 0.1]
    s = A.sweep_attack(model, *correct, "fgsm", eps, progress=False)
    assert s.success.shape == (3, N_IMAGES)
    assert np.all(s.linf <= np.asarray(eps)[:, None] + 1e-6)
    # FGSM is deterministic: the sweep's 0.1 column is the single-budget run
    np.testing.assert_array_equal(s.success[-1], results("fgsm").success)
    eps_min, linf_min, _ = s.minimal()
    fooled = np.isfinite(eps_min)
    assert fooled.sum() == (s.success & s.clean_correct).any(0).sum()
    assert set(eps_min[fooled]) <= set(eps)
    assert np.all(linf_min[fooled] <= eps_min[fooled] + 1e-6)
    assert s.success[0].mean() < s.success[-1].mean()  # a bigger budget fools more


def test_seeded_random_start_is_reproducible(model, correct):
    x, y = correct[0][:16], correct[1][:16]
    a = A.run_attack(model, x, y, "pgd", eps=0.03, params={"steps": 2}, seed=7, progress=False)
    b = A.run_attack(model, x, y, "pgd", eps=0.03, params={"steps": 2}, seed=7, progress=False)
    c = A.run_attack(model, x, y, "pgd", eps=0.03, params={"steps": 2}, seed=8, progress=False)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    assert not np.array_equal(a.x_adv, c.x_adv)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_generate_resumes_by_chunk(adv_run, tmp_path, monkeypatch, attack):
    cfg = S.GenerateConfig(attacks=(attack,), n=100, chunk_size=30, batch_size=30,
                           params={"steps": 2} if attack == "pgd" else {}, progress=False)
    calls = []
    real = A.run_attack
    monkeypatch.setattr(S, "run_attack", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert S.generate(adv_run, cfg, attack, max_chunks=2) is None  # "killed" after 2 chunks
    parts = adv_run.file(f"adv/parts/train-{attack}")
    assert sorted(p.name for p in parts.glob("chunk_*.npz")) == ["chunk_00000.npz",
                                                                 "chunk_00001.npz"]
    out = S.generate(adv_run, cfg, attack)
    assert len(calls) == 4 and not parts.exists()  # 4 chunks in all, none computed twice
    resumed = S.load_adversarial(adv_run, attack)

    fresh_run = Run(tmp_path / "fresh")
    shutil.copytree(adv_run.path, fresh_run.path, ignore=shutil.ignore_patterns("adv"))
    calls.clear()
    S.generate(fresh_run, cfg, attack)
    assert len(calls) == 4
    fresh = S.load_adversarial(fresh_run, attack)
    np.testing.assert_array_equal(resumed.x_adv, fresh.x_adv)
    np.testing.assert_array_equal(resumed.idx, fresh.idx)

    d = adv_run.data()
    assert len(resumed.idx) == 100 and np.all(np.bincount(d.y_train[resumed.idx]) == 10)
    np.testing.assert_array_equal(resumed.y, d.y_train[resumed.idx])
    assert resumed.linf.max() <= 0.1 + 1e-6 and resumed.x_adv.dtype == np.float32
    assert resumed.config["params"] == A.ATTACKS[attack].params(**cfg.params)
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert summary["n"] == 100
    calls.clear()
    assert S.generate(adv_run, cfg, attack) == out  # already done: nothing recomputed
    assert not calls


def test_generate_cli_end_to_end(adv_run):
    p = run_script("adv/generate_adv.py", "--run-dir", adv_run.path, "--attack", "fgsm,bim",
                   "--n", "50", "--eps", "0.05", "--split", "test", "--no-progress")
    assert "bim:" in p.stdout
    for attack in ("fgsm", "bim"):
        s = S.load_adversarial(adv_run, attack, "test")
        assert len(s.x_adv) == 50 and s.linf.max() <= 0.05 + 1e-6
        assert s.config["eps"] == 0.05 and s.config["split"] == "test"


@pytest.mark.parametrize("args, message", [
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--attack", "fgsm", "--eps", "-0.1"], "--eps must be a positive number"),
    (["--attack", "fgsm", "--param", "steps=3"], "none of the attacks"),
])
def test_generate_cli_rejects_bad_options(adv_run, args, message):
    p = run_script("adv/generate_adv.py", "--run-dir", adv_run.path, "--split", "test",
                   *args, check=False)
    assert p.returncode == 2
    assert message in one_error_line(p.stderr)
    assert not adv_run.file("adv/parts").exists()  # nothing started


def test_generate_cli_rejects_missing_run(tmp_path):
    p = call_script("adv/generate_adv.py", "--run-dir", tmp_path / "none", "--attack", "fgsm")
    assert p.returncode == 2 and "no run at" in one_error_line(p.stderr)
    assert not (tmp_path / "none").exists()


def test_staged_deepfool_equals_one_long_run():
    """DeepFool's inputs run independently, so rerunning only the unfinished ones with the full
    step budget gives what one run with that budget gives, input by input."""
    import dataclasses

    import keras

    init = keras.initializers.GlorotUniform
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, activation="relu", kernel_initializer=init(seed=0))(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", kernel_initializer=init(seed=1))(h)
    model = keras.Model(inputs, keras.layers.Dense(4, kernel_initializer=init(seed=2))(h))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (48, 8, 8, 1)).astype(np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    spec = A.ATTACKS["deepfool"]
    once = dataclasses.replace(spec, first_steps=None)
    staged = dataclasses.replace(spec, first_steps=1)
    a = A.run_attack(model, x, y, once, params={"steps": 30}, progress=False)
    b = A.run_attack(model, x, y, staged, params={"steps": 30}, progress=False)
    first = A.run_attack(model, x, y, once, params={"steps": 1}, progress=False)
    assert 0 < first.success.sum() < a.success.sum()   # the second stage had work to do
    np.testing.assert_array_equal(a.success, b.success)
    np.testing.assert_allclose(a.x_adv, b.x_adv, atol=1e-6)
