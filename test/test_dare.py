"""Stage 3: the masked loss, synchronization, the three variants, and the whole chain on real
Fashion-MNIST through the scripts."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest
from conftest import call_script, run_script

from darekit import dare as dare_mod
from darekit import io, layout
from darekit.dare import (
    VARIANTS,
    DareConfig,
    masked_mse,
    masked_sse,
    regression_loss,
    run_dare,
    sample_masks,
)
from darekit.errors import DareError
from darekit.models import get_architecture
from darekit.rundir import Run
from darekit.traces import trace_model

LAYERS = get_architecture("smallcnn").trace_layers


def test_masked_loss_equals_hand_computation():
    # two samples, two layers (3 and 2 units)
    o1 = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.5]], np.float32)
    t1 = np.array([[0.0, 2.5, 1.0], [1.0, 1.0, 0.0]], np.float32)
    m1 = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    o2 = np.array([[2.0, 0.0], [1.0, 1.0]], np.float32)
    t2 = np.array([[0.0, 1.0], [3.0, 0.0]], np.float32)
    m2 = np.array([[0, 1], [1, 1]], np.float32)
    # sample 0: 1^2 + 0.5^2 (+ masked 2^2) + 1^2 = 2.25;  sample 1: 1^2 + 0.5^2 + 2^2 + 1^2 = 6.25
    per1 = np.asarray(masked_sse(np.concatenate([t1, m1], 1), o1))
    per2 = np.asarray(masked_sse(np.concatenate([t2, m2], 1), o2))
    np.testing.assert_allclose(per1, [1.25, 1.25])
    np.testing.assert_allclose(per2, [1.0, 5.0])
    np.testing.assert_allclose(np.mean(per1 + per2), (2.25 + 6.25) / 2)
    # The default reduction averages over each sample's slice: sample 0 has 2 of 3 units in
    # layer 1 and 1 of 2 in layer 2, sample 1 has 2 of 3 and 2 of 2.
    mean1 = np.asarray(masked_mse(np.concatenate([t1, m1], 1), o1))
    mean2 = np.asarray(masked_mse(np.concatenate([t2, m2], 1), o2))
    np.testing.assert_allclose(mean1, [1.25 / 2, 1.25 / 2])
    np.testing.assert_allclose(mean2, [1.0 / 1, 5.0 / 2])
    # An empty slice contributes 0, not NaN.
    empty = np.asarray(masked_mse(np.concatenate([t1, np.zeros_like(m1)], 1), o1))
    np.testing.assert_array_equal(empty, [0.0, 0.0])


def test_compiled_regression_loss_is_the_masked_sse_averaged_over_the_batch():
    rng = np.random.default_rng(0)
    x_in = keras.Input((4, 4, 1), name="image")
    c = keras.layers.Conv2D(3, 3, padding="same", name="c")(x_in)
    r = keras.layers.ReLU(name="c_relu")(c)
    f = keras.layers.Flatten(name="flat")(r)
    h = keras.layers.ReLU(name="h_relu")(keras.layers.Dense(5, name="h")(f))
    model = keras.Model(x_in, keras.layers.Dense(2, name="logits")(h))
    reg = trace_model(model, ("c_relu", "h_relu"))
    x = rng.uniform(size=(6, 4, 4, 1)).astype("float32")
    targets = [rng.uniform(size=(6, 3)).astype("float32"), rng.uniform(size=(6, 5)).astype("f4")]
    masks = [(rng.uniform(size=t.shape) > 0.5).astype("float32") for t in targets]
    acts = keras.Model(x_in, [r, h])(x)
    hand = np.mean(np.sum(masks[0] * (np.asarray(acts[0]).mean((1, 2)) - targets[0]) ** 2, 1)
                   + np.sum(masks[1] * (np.asarray(acts[1]) - targets[1]) ** 2, 1))
    assert regression_loss(reg, x, targets, masks, "sum") == pytest.approx(hand, rel=1e-5)
    hand_mean = np.mean(
        np.sum(masks[0] * (np.asarray(acts[0]).mean((1, 2)) - targets[0]) ** 2, 1)
        / np.maximum(masks[0].sum(1), 1)
        + np.sum(masks[1] * (np.asarray(acts[1]) - targets[1]) ** 2, 1)
        / np.maximum(masks[1].sum(1), 1))
    assert regression_loss(reg, x, targets, masks) == pytest.approx(hand_mean, rel=1e-5)
    reg.compile(optimizer="sgd", loss=[masked_sse] * 2)
    y_true = [np.concatenate([t, m], 1) for t, m in zip(targets, masks, strict=True)]
    got = reg.evaluate(x, y_true, batch_size=6, verbose=0, return_dict=True)["loss"]
    assert got == pytest.approx(hand, rel=1e-5)
    assert all(la in model.layers for la in reg.layers if la.weights)  # shared layer objects


def test_variant_registry_is_the_documented_ablation():
    assert {n: (v.use_slice, v.use_transform) for n, v in VARIANTS.items()} == {
        "dare": (True, True), "dare-s": (False, True), "dare-sl": (False, False)}
    slice_masks = {"a": np.array([[1, 0, 1], [0, 1, 0]], bool)}
    y = np.array([1, 0, 1])
    np.testing.assert_array_equal(sample_masks(slice_masks, y, {"a": 3})["a"],
                                  [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(sample_masks(None, y, {"a": 3})["a"], np.ones((3, 3)))


@pytest.mark.parametrize("kw", [{"lr": -1.0}, {"lr": 0.0}, {"epochs": 0}, {"variant": "x"}])
def test_invalid_config(kw):
    with pytest.raises(DareError):
        DareConfig(**kw)


@pytest.fixture(scope="module")
def chain_run(fm_run, tmp_path_factory):
    """fm_run copied, then sliced and mined through the scripts."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    shutil.copytree(fm_run, run_dir)
    run_script("dare/nnslicer.py", "--run-dir", run_dir, "--max-per-class", "20")
    run_script("dare/get_ats.py", "--run-dir", run_dir, "--max-inputs", "300")
    return run_dir


@pytest.fixture(scope="module")
def chain_outputs(chain_run):
    procs = {v: run_script(f"dare/{v}.py", "--run-dir", chain_run, "--epochs", "2",
                           "--verbose", "0") for v in VARIANTS}
    return chain_run, procs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_whole_chain_via_scripts(chain_outputs, variant):
    run_dir, procs = chain_outputs
    run = Run.open(run_dir)
    summary = io.read_json(run_dir / "dare" / f"{variant}.json")["dare"]
    # DARE and DARE-S default to the architecture's regression rate, DARE-SL to the
    # cross-entropy fine-tuning rate of the adversarial baselines.
    assert summary["lr"] == (1e-3 if variant == "dare-sl" else run.dare_lr)
    s = summary["summary"]
    assert s["moved"] is True and s["max_rel_change"] > 1e-6
    assert s["variant"]["name"] == variant
    rows = io.read_csv(run_dir / "dare" / f"{variant}_log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert {"validation_accuracy", "test_accuracy", "max_rel_change"} <= set(rows[0])
    assert any(k.startswith("rel_change/") for k in rows[0])
    tuned = run.load_named(variant)
    original = run.load_model()
    x = run.data().x_test[:64]
    assert not np.allclose(tuned.predict(x, verbose=0), original.predict(x, verbose=0))
    x_held, y_held = run.eval_sets()["test"]  # the test images training held out
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(
        float(np.mean(tuned.predict(x_held, verbose=0).argmax(-1) == y_held)), abs=1e-6)
    assert "validation accuracy" in procs[variant].stdout
    # DARE-SL is CE fine-tuning (logs accuracy); DARE/DARE-S regress the sliced layers' traces
    regression_cols = {f"{LAYERS[0]}_ats_loss", f"{LAYERS[1]}_loss"}
    if variant == "dare-sl":
        assert "accuracy" in rows[1] and not regression_cols & set(rows[1])
        assert "synchronized_layers" not in s  # no transform: nothing to synchronize
    else:
        assert regression_cols <= set(rows[1])
        assert "block2_conv1" in s["synchronized_layers"] and "fc1" in s["synchronized_layers"]
        assert "logits" not in s["synchronized_layers"]  # not on R's path: R never touched it
        np.testing.assert_array_equal(tuned.get_layer("logits").get_weights()[0],
                                      original.get_layer("logits").get_weights()[0])


@pytest.mark.jax  # slicing and mining by the scripts, then DARE: CI runs it on JAX too
def test_saved_classifier_carries_exactly_the_tuned_weights(chain_run):
    run = Run.open(chain_run)
    res = run_dare(run, DareConfig(epochs=1, verbose=0), log=lambda s: None)
    saved = run.load_named("dare")
    checked = 0
    for layer in res.regression_model.layers:
        if not layer.weights:
            continue
        assert layer is res.model.get_layer(layer.name)  # R shares the classifier's layers
        for a, b in zip(saved.get_layer(layer.name).get_weights(), layer.get_weights(),
                        strict=True):
            np.testing.assert_array_equal(a, b)
            checked += 1
    assert checked >= 6


def test_predictions_change_only_if_the_weights_moved(chain_run, capsys):
    run = Run.open(chain_run)
    x = run.data().x_test[:128]
    before = run.load_model().predict(x, verbose=0)
    still = run_dare(run, DareConfig(variant="dare-s", lr=1e-30, epochs=1, verbose=0),
                     log=lambda s: None)
    assert still.summary["moved"] is False and still.summary["max_rel_change"] == 0.0
    assert "weights did not move" in capsys.readouterr().err
    # Not a result: status no-op, no model saved (test_newcomer.py has the rest).
    assert still.status == "no-op" and not run.model_path("dare-s").exists()
    np.testing.assert_array_equal(still.model.predict(x, verbose=0), before)
    moved = run_dare(run, DareConfig(variant="dare-s", epochs=1, verbose=0), log=lambda s: None)
    assert moved.summary["moved"] is True
    assert not np.array_equal(run.load_named("dare-s").predict(x, verbose=0), before)


def test_dare_sl_never_builds_the_regression_model(chain_run, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("DARE-SL must not build R")

    monkeypatch.setattr(dare_mod, "trace_model", forbidden)
    res = run_dare(Run.open(chain_run), DareConfig(variant="dare-sl", epochs=1, verbose=0),
                   log=lambda s: None)
    assert res.regression_model is None and res.summary["moved"]
    with pytest.raises(AssertionError, match="must not build R"):
        run_dare(Run.open(chain_run), DareConfig(variant="dare-s", epochs=1, verbose=0),
                 log=lambda s: None)


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "error: --lr must be positive; received -1.0"),
    (["--epochs", "0"], "error: --epochs and --batch-size must be positive"),
])
def test_invalid_options_fail_before_any_work(chain_run, args, message):
    mtime = (chain_run / "history").stat().st_mtime
    proc = run_script("dare/dare.py", "--run-dir", chain_run, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (chain_run / "history").stat().st_mtime == mtime


@pytest.mark.slow
def test_the_artifacts_two_commands_work_as_typed(tmp_path):
    """``python train/train.py --model ...`` then ``python dare/dare.py --lr ...`` with no
    run directory: dare.py finds the latest run, runs the missing Stages 1 and 2 with their
    defaults, and saves the DARE model."""
    env = {"DAREKIT_RUNS": str(tmp_path / "runs")}
    run_script("train/train.py", "--model", "smallcnn", "--dataset", "fashion_mnist",
               "--subset", "400", "--epochs", "2", "--verbose", "0", env=env)
    assert (tmp_path / "runs" / "latest").is_symlink()
    proc = run_script("dare/dare.py", "--lr", "1e-3", "--epochs", "1", "--verbose", "0",
                      env=env)
    run_dir = tmp_path / "runs" / "fashion_mnist-smallcnn-s0"
    assert f"using run {run_dir}" in proc.stdout
    assert "running Stage 1" in proc.stdout and "running Stage 2" in proc.stdout
    run = Run.open(run_dir)
    assert run.model_path("dare").is_file() and run.file(layout.MASKS).is_file()


def test_stage_scripts_without_a_run_say_what_to_do(tmp_path):
    env = {"DAREKIT_RUNS": str(tmp_path / "none")}
    for script in ("dare/dare.py", "dare/nnslicer.py", "dare/get_ats.py", "dare/test.py",
                   "adv/generate_adv.py"):
        proc = call_script(script, env=env)
        assert proc.returncode == 2, script
        assert "no trained run under" in proc.stderr and "train/train.py" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_divergence_is_recorded_not_a_result(chain_run):
    run = Run.open(chain_run)
    res = run_dare(run, DareConfig(variant="dare-s", lr=1e8, epochs=1, verbose=0),
                   log=lambda s: None)
    assert res.status == "diverged"
    assert not run.model_path("dare-s").exists()      # no model, not even an older one
    summary = io.read_json(run.file(layout.dare_summary("dare-s")))["dare"]
    assert summary["lr"] == 1e8 and summary["summary"]["status"] == "diverged"
    assert run.file(layout.dare_log("dare-s")).is_file()
    assert "dare-s" in run.diverged_models()
    # The script, unlike a study, stops with one line and a non-zero exit.
    proc = run_script("dare/dare-s.py", "--run-dir", chain_run, "--lr", "1e8", "--epochs", "1",
                      check=False)
    assert proc.returncode != 0 and "diverged at lr 1e+08" in proc.stderr
