"""Stage 2: directions from the history, batched ddmin on real inputs, traces, and the script."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import call_script, run_script

from darekit import backend as B
from darekit import io, layout
from darekit.errors import DareError
from darekit.mining import (
    LabelPredictor,
    MineConfig,
    fgsm_directions,
    input_gradients,
    load_mined,
    mine,
    minimize_deltas,
    patch_ids,
)
from darekit.models import get_architecture
from darekit.rundir import Run
from darekit.traces import get_ats


def test_patch_grid():
    g = patch_ids(28, 28, 4)
    assert g.shape == (28, 28) and g.max() == 48
    assert (g[:4, :4] == 0).all() and (g[:4, 4:8] == 1).all() and g[4, 0] == 7
    g = patch_ids(6, 5, 4)  # ragged border patches are smaller, not dropped
    assert g.max() == 3 and (g[4:, 4:] == 3).all()


def test_eps_mine_defaults():
    assert MineConfig().resolved("fashion_mnist").eps_mine == pytest.approx(0.15)
    assert MineConfig().resolved("cifar10").eps_mine == pytest.approx(12 / 255)
    assert MineConfig(eps_mine=0.05).resolved("svhn").eps_mine == 0.05
    with pytest.raises(DareError, match="--eps-mine"):
        MineConfig(eps_mine=0.0)


# --------------------------------------------------------------------------- a fixed model
def _mean_threshold_model():
    """8x8x1 images -> class 0 iff mean(x) > 0.5, with NumPy-set weights (the same on every
    backend): fc = [relu(mean - 0.5), relu(0.5 - mean)], logits = fc."""
    import keras

    x_in = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Flatten(name="flat")(x_in)
    h = keras.layers.Dense(2, activation="relu", name="fc")(h)
    model = keras.Model(x_in, keras.layers.Dense(2, name="logits")(h))
    w = np.stack([np.full(64, 1 / 64), np.full(64, -1 / 64)], axis=1).astype("float32")
    model.get_layer("fc").set_weights([w, np.array([-0.5, 0.5], np.float32)])
    model.get_layer("logits").set_weights([np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    return model


def _near_the_threshold(n: int):
    """Images of mean 0.55 (class 0) and 0.45 (class 1) with a zero-mean checkerboard."""
    y = np.arange(n) % 2
    board = 0.01 * (np.indices((8, 8)).sum(0) % 2 * 2 - 1)
    x = (np.where(y == 0, 0.55, 0.45)[:, None, None] + board)[..., None].astype("float32")
    return x, y


def test_predictor_and_gradients_on_a_fixed_model():
    model = _mean_threshold_model()
    x, y = _near_the_threshold(7)
    predict = LabelPredictor(model, 4)  # batches of 4 and 3; on JAX the 3 are padded to 4
    np.testing.assert_array_equal(predict(x), y)
    assert predict.calls == 2
    assert predict.rows == (8 if B.name() == "jax" else 7)
    np.testing.assert_array_equal(LabelPredictor(model, 3)(x), y)  # batches of 3, 3, 1
    g = input_gradients(model, x, y, batch_size=3)
    # CE of the true class: its logit (mean - 0.5 or 0.5 - mean) has d/dx = +-1/64, the other
    # logit is a dead ReLU; dCE/dlogit_y = p_y - 1.
    p_y = 1 / (1 + np.exp(-0.05))
    want = np.where(y == 0, -1, 1)[:, None, None, None] * (1 - p_y) / 64
    np.testing.assert_allclose(g, np.broadcast_to(want, g.shape), rtol=1e-4)
    d = fgsm_directions(model, x, y, 0.15, batch_size=3)
    np.testing.assert_array_equal(d, np.broadcast_to(np.float32(0.15) * np.sign(want),
                                                     d.shape))


def test_history_shares_one_compiled_gradient_and_each_epoch_has_its_own_weights(monkeypatch):
    """Mining loads every epoch's weights into one model object, so its input gradient is
    compiled once per history, not once per epoch (seconds each for a VGG under JAX); the
    gradients must still be each epoch's own (a compiled function that kept the first epoch's
    weights would give them all the same)."""
    from darekit import mining

    a = _mean_threshold_model()
    b = _mean_threshold_model()   # class 0 iff mean < 0.5: its gradients point the other way
    b.get_layer("fc").set_weights([-b.get_layer("fc").get_weights()[0],
                                   np.array([0.5, -0.5], np.float32)])
    x, y = _near_the_threshold(6)
    fresh = [input_gradients(m, x, y, batch_size=4) for m in (a, b)]
    assert (np.sign(fresh[0]) == -np.sign(fresh[1])).all()

    built = []
    real = B.model_function
    monkeypatch.setattr(B, "model_function", lambda *args, **kw: built.append(1) or real(
        *args, **kw))
    one = mining._OneModel()
    got = [input_gradients(one(m), x, y, batch_size=4) for m in (a, b, a)]
    assert one(a) is one(b)
    assert len(built) == 1   # one compiled gradient for the three epochs
    for g, want in zip(got, [*fresh, fresh[0]], strict=True):
        np.testing.assert_array_equal(g, want)
    # A model of another architecture in the history is used as it is.
    other = keras_dense_model()
    assert one(other) is other


def keras_dense_model():
    import keras

    x_in = keras.Input((8, 8, 1))
    return keras.Model(x_in, keras.layers.Dense(2)(keras.layers.Flatten()(x_in)))


@pytest.mark.parametrize("order", ["grid", "gain"])
def test_mine_on_a_fixed_model(order, capsys):
    """Every input falls at x + delta; each of the four 4x4 patches moves the mean by 0.0375,
    so two patches (0.075 > 0.05) are 1-minimal, found in 3 queries ([0,1], [0], [1])."""
    model = _mean_threshold_model()
    x, y = _near_the_threshold(6)
    cfg = MineConfig(eps_mine=0.15, batch_size=4, order=order, progress=False)
    res = mine([model, model], model, x, y, ("fc",), cfg, log=lambda s: None)
    s = res.stats
    assert s["inputs"] == s["clean_correct"] == s["failures"] == 6
    assert s["s_star_size"]["min"] == s["s_star_size"]["max"] == 2
    assert s["ddmin_queries_per_collected_input"]["max"] == 3
    mined = ~res.anchor
    assert res.anchor.sum() == 6 and set(res.epoch) == {1, 2}
    np.testing.assert_array_equal(res.patches[mined], 2)
    # x' = x - 0.15 on patches 0 and 1 (the top half) only, and the final model calls it wrong
    diff = res.x[mined] - x[res.index[mined]]
    sign = np.where(res.y[mined] == 0, -1.0, 1.0)[:, None, None, None]  # toward the threshold
    np.testing.assert_allclose(diff[:, :4], np.broadcast_to(0.15 * sign, diff[:, :4].shape),
                               atol=1e-6)
    assert (diff[:, 4:] == 0).all()
    assert (np.argmax(model.predict(res.x[mined], verbose=0), -1) != res.y[mined]).all()
    # targets: fc on the clean x, [0.05, 0] for class 0 and [0, 0.05] for class 1
    t = res.targets["fc"]
    np.testing.assert_allclose(t, 0.05 * np.eye(2)[res.y], atol=1e-6)
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_mine_shows_progress_bars(capsys):
    """Issue 16: dk.mine ran for minutes without a word; it now shows the history's directions
    and the ddmin searches as progress bars (progress=True, the default)."""
    model = _mean_threshold_model()
    x, y = _near_the_threshold(4)
    assert MineConfig().progress
    mine([model], model, x, y, ("fc",), MineConfig(eps_mine=0.15), log=lambda s: None)
    err = capsys.readouterr().err
    # each bar counts the images (its first frame, "0/4", is drawn whatever the machine's speed)
    assert "mining: directions" in err and "mining: ddmin" in err and "0/4" in err


def test_traces_average_conv_channels(fm_run):
    run = Run.open(fm_run)
    model = run.load_model()
    x = run.data().x_validation[:5]
    ats = get_ats(model, x, ("block2_relu1", "fc1_relu"))
    import keras
    raw = keras.Model(model.inputs[0], [model.get_layer("block2_relu1").output,
                                        model.get_layer("fc1_relu").output])(x, training=False)
    np.testing.assert_allclose(ats["block2_relu1"], np.asarray(raw[0]).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ats["fc1_relu"], np.asarray(raw[1]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def failing(fm_run):
    """Validation inputs that the final model classifies correctly clean, wrongly at x+delta."""
    run = Run.open(fm_run)
    model = run.load_model()
    d = run.data()
    x, y = d.x_validation[:300], d.y_validation[:300]
    delta = fgsm_directions(run.load_model(1), x, y, 0.15)
    predict = LabelPredictor(model, 256)
    ok = (predict(x) == y) & (predict(np.clip(x + delta, 0, 1)) != y)
    assert ok.sum() >= 5
    return model, x[ok][:24], y[ok][:24], delta[ok][:24]


def test_directions_are_signed_gradient_steps(failing):
    _, _, _, delta = failing
    step = np.float32(0.15).item()
    assert set(np.unique(delta).tolist()) <= {-step, 0.0, step}
    assert (delta != 0).mean() > 0.5


@pytest.mark.parametrize("order", ["grid", "gain"])
def test_ddmin_on_real_inputs_is_failure_inducing_and_one_minimal(failing, order):
    """Re-query the model: x + delta|S* is misclassified, and so is no S* minus one patch."""
    model, x, y, delta = failing
    predict = LabelPredictor(model, 256)
    calls_before = predict.calls
    priority = (delta * input_gradients(model, x, y)).sum(-1) if order == "gain" else None
    mini = minimize_deltas(predict, x, y, delta, patch=4, priority=priority)
    # batched: one model call per round for all inputs (batch 256 >= active inputs)
    assert predict.calls - calls_before == mini.rounds == mini.queries.max()
    grid = patch_ids(28, 28, 4)
    for i in range(len(x)):
        s = mini.patches[i]
        assert len(s) >= 1
        np.testing.assert_array_equal(mini.masks[i], np.isin(grid, s))
        x_s = np.clip(x[i] + delta[i] * np.isin(grid, s)[..., None], 0, 1)
        assert model.predict(x_s[None], verbose=0).argmax() != y[i]
        fewer = [np.clip(x[i] + delta[i] * np.isin(grid, np.delete(s, j))[..., None], 0, 1)
                 for j in range(len(s))]
        assert (model.predict(np.stack(fewer), verbose=0).argmax(-1) == y[i]).all()


@pytest.fixture(scope="module")
def mined_run(fm_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mine") / "run"
    shutil.copytree(fm_run, run_dir)
    run_script("dare/get_ats.py", "--run-dir", run_dir, "--max-inputs", "400")
    return Run.open(run_dir)


@pytest.mark.jax  # mining end to end (the script) on real data: CI runs it on JAX too
def test_get_ats_outputs(mined_run):
    m = load_mined(mined_run)
    stats = io.read_json(mined_run.file(layout.MINED_STATS))
    s = stats["stats"]
    assert stats["mine"]["eps_mine"] == 0.15 and stats["mine"]["patch"] == 4
    assert s["inputs"] == 400 and s["collected"] == s["failures"] > 0
    assert s["failure_rate"] == pytest.approx(s["failures"] / s["clean_correct"])
    n = s["collected"]
    assert len(m.y) == 2 * n and m.anchor.sum() == n and s["anchors"] == n
    assert sum(s["mining_epochs"].values()) == 400 and set(m.epoch) <= {1, 2, 3, 4}
    assert s["s_star_size"]["count"] == n and s["model_queries_per_input"] > 1
    assert set(m.targets) == set(get_architecture("smallcnn").trace_layers)
    # anchors are the clean inputs, with the same targets and labels as their collected twin
    d = mined_run.data()
    mined, anchor = ~m.anchor, m.anchor
    np.testing.assert_array_equal(m.x[anchor], d.x_validation[m.index[anchor]])
    np.testing.assert_array_equal(m.index[mined], m.index[anchor])
    for t in m.targets.values():
        np.testing.assert_array_equal(t[mined], t[anchor])
    np.testing.assert_array_equal(m.y, d.y_validation[m.index])
    # targets are the final model's traces of the clean x
    ats = get_ats(mined_run.load_model(), m.x[anchor], list(m.targets))
    for name, t in m.targets.items():
        np.testing.assert_allclose(t[anchor], ats[name], rtol=1e-5, atol=1e-5)
    # x' = clip(x + delta|S*): within eps of x, in [0, 1], changed only on |S*| patches
    diff = m.x[mined] - m.x[anchor]
    assert np.abs(diff).max() <= 0.15 + 1e-6 and m.x.min() >= 0 and m.x.max() <= 1
    grid = patch_ids(28, 28, 4)
    for dd, k in zip(diff, m.patches[mined], strict=True):
        touched = np.unique(grid[np.any(dd != 0, axis=-1)])
        assert len(touched) <= k
    # the collected inputs fool the final model; the anchors do not
    pred = mined_run.load_model().predict(m.x, verbose=0).argmax(-1)
    assert (pred[mined] != m.y[mined]).all() and (pred[anchor] == m.y[anchor]).all()


def test_get_ats_refuses_a_run_without_history(tmp_path):
    run_dir = tmp_path / "untrained"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"train": {"model": "smallcnn"}}')
    proc = call_script("dare/get_ats.py", "--run-dir", run_dir)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: run ") and "no training history" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (run_dir / layout.MINED).exists()


def test_minimize_deltas_with_no_candidates():
    """No input misclassified at x + delta (it happens on a dry run's VGG): an empty result,
    not a reshape error."""
    from darekit.mining import minimize_deltas

    z = np.zeros((0, 8, 8, 1), np.float32)
    r = minimize_deltas(lambda x: np.zeros(len(x), int), z, np.zeros(0, int), z, 4,
                        priority=np.zeros((0, 8, 8)))
    assert r.masks.shape == (0, 8, 8) and r.queries.shape == (0,)
