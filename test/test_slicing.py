"""NNSlicer contribution analysis on chains: hand-computed cases, the vectorised rules against a
plain per-neuron transcription of NNSlicer's algorithm, ``per`` monotonicity, the options and
the script. Graphs with branches (Add, global pooling, built-in activations, ResNet) and the
layer checks are in ``test_slicing_dag.py``."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from conftest import call_script, run_script

from darekit import io, layout
from darekit.config import add_options, from_args
from darekit.errors import DareError
from darekit.models import get_architecture
from darekit.rundir import Run
from darekit.slicing import (
    RULES,
    Graph,
    SliceConfig,
    _extract,
    _scatter,
    approx_contributions,
    contributions,
    cover_mask,
    run_slicing,
    select_synapses,
    slice_model,
    unit_scores,
)


def _dense_net(w1: np.ndarray, w2: np.ndarray) -> keras.Model:
    """image (2,) -> ReLU r0 -> Dense h (3) -> ReLU h_relu -> Dense logits (2); no biases."""
    x_in = keras.Input((2,), name="image")
    x = keras.layers.ReLU(name="r0")(x_in)
    x = keras.layers.Dense(3, use_bias=False, name="h")(x)
    x = keras.layers.ReLU(name="h_relu")(x)
    out = keras.layers.Dense(2, use_bias=False, name="logits")(x)
    model = keras.Model(x_in, out)
    model.get_layer("h").set_weights([w1])
    model.get_layer("logits").set_weights([w2])
    return model


# Chosen so that, for class 0, the logit's synapse terms are v = W2[:, 0] * dx = [3, 1, -0.5]
# (dy = 3.5) and the hidden unit 0's terms are v = W1[:, 0] * dx0 = [1, -0.5] (dy = 0.5).
W1 = np.array([[1.0, 0.3, 0.2], [2.0, 0.1, 0.4]], dtype=np.float32)
W2 = np.array([[6.0, 1.0], [-1.0, 1.0], [-0.25, 1.0]], dtype=np.float32)
X = np.array([[1.0, 0.75]], dtype=np.float32)


def _hand_case(eps: float):
    model = _dense_net(W1, W2)
    graph = Graph.of(model, ("r0", "h_relu"))
    acts = graph.forward(X)
    assert list(acts) == ["r0", "h", "h_relu", "logits"]  # the chain, in order
    dx_h_relu = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    refs = {"r0": acts["r0"][0] - np.array([1.0, -0.25], dtype=np.float32),  # dx0 = [1, -0.25]
            "h": acts["h"][0], "h_relu": acts["h_relu"][0] - dx_h_relu,
            "logits": acts["logits"][0]}
    cfg = SliceConfig(eps=eps, bar=0.01)
    return contributions(graph, acts, refs, np.array([0]), cfg)


def test_hand_computed_contributions_eps_0_2():
    c = _hand_case(eps=0.2)
    # Logit 0: v = [3, 1, -0.5], dy = 3.5; sorted partial sums [3, 4, 3.5]; |3 - 3.5| < 0.7,
    # so only synapse 0 is kept: CONTRIB = sign(3) sign(3.5) = +1.
    np.testing.assert_array_equal(c["h_relu"], [[1.0, 0.0, 0.0]])
    # ReLU passes it to h; unit 0 of h: v = [1, -0.5], dy = 0.5, partial sums [1, 0.5]:
    # both synapses are needed (|1 - 0.5| >= 0.1): CONTRIB = [sign(1), sign(-0.5)] = [1, -1].
    np.testing.assert_array_equal(c["r0"], [[1.0, -1.0]])


def test_hand_computed_contributions_eps_0_1_keeps_the_negative_synapse():
    c = _hand_case(eps=0.1)
    # |3 - 3.5| = 0.5 >= 0.35 and |4 - 3.5| = 0.5 >= 0.35: all three synapses are kept, with
    # signs sign(v) * sign(dy) = [+1, +1, -1]; the third pulls the logit against its change.
    np.testing.assert_array_equal(c["h_relu"], [[1.0, 1.0, -1.0]])
    # Each traced hidden unit j sends its own signs to r0 (v_j = W1[:, j] * [1, -0.25]):
    # j=0: [1, -0.5] -> [1, -1] * (+1);  j=1: [0.3, -0.025] -> [1, 0] * (+1) (0.025 < 0.1*0.275
    # after the first: |0.3 - 0.275| = 0.025 < 0.0275);  j=2: [0.2, -0.1] -> sum 0.1,
    # |0.2 - 0.1| >= 0.01 so both: [1, -1] * (-1) = [-1, 1].  Total: [1, 0].
    np.testing.assert_array_equal(c["r0"], [[1.0, 0.0]])
    scores = unit_scores(c["h_relu"])
    np.testing.assert_array_equal(cover_mask(scores, 0.95), [[True, True, True]])
    np.testing.assert_array_equal(cover_mask(scores, 0.5), [[True, True, False]])


def test_approx_mode_is_gradient_times_delta():
    model = _dense_net(W1, W2)
    graph = Graph.of(model, ("h_relu",))
    acts = graph.forward(X)
    refs = {"h_relu": acts["h_relu"][0] - np.array([0.5, -1.0, 2.0], np.float32),
            "logits": acts["logits"][0]}
    got = approx_contributions(graph, X, refs, np.array([0]), SliceConfig(mode="approx"))
    np.testing.assert_allclose(got["h_relu"], [[3.0, 1.0, -0.5]], rtol=1e-6)


def _select_reference(v, eps, bar):
    """``arg_abs_approx`` exactly as research/nnslicer.md section 4 writes it (one neuron)."""
    if 1.0 / v.size >= 1 - eps:
        return {int(np.argmax(v))}
    s = v.sum()
    sv = v[np.argsort(-np.abs(v), kind="stable")]
    if abs(s) < abs(sv[-1]) or abs(s) < 1e-3 * abs(sv[0]) or s == 0:
        return set()
    hits = np.flatnonzero(np.abs(np.cumsum(sv) - s) < eps * abs(s))
    k = hits[0] if len(hits) else len(sv) - 1
    return set(np.flatnonzero(np.abs(v) > abs(sv[k]) * (1 - bar)).tolist())


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_vectorised_selection_matches_the_per_neuron_algorithm(eps):
    rng = np.random.default_rng(1)
    v = rng.normal(size=(300, 17)) * rng.uniform(0, 3, size=(300, 1))
    v[::7] *= rng.uniform(size=(1, 17)) > 0.6  # some sparse rows, some all-zero
    keep = select_synapses(v, eps, 0.01)
    for row, k in zip(v, keep, strict=True):
        assert set(np.flatnonzero(k).tolist()) == _select_reference(row, eps, 0.01)


def _conv_net(stride: int) -> keras.Model:
    x_in = keras.Input((6, 6, 2), name="image")
    x = keras.layers.ReLU(name="r0")(x_in)
    x = keras.layers.Conv2D(3, 3, strides=stride, padding="same", use_bias=False, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.MaxPooling2D(2 if stride == 1 else 1, name="pool")(x)
    x = keras.layers.Flatten(name="flat")(x)
    out = keras.layers.Dense(4, name="logits")(x)
    model = keras.Model(x_in, out)
    rng = np.random.default_rng(stride)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    model.get_layer("bn").set_weights([np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)])
    return model


def _conv_backward_reference(layer, x_in, ref, c_out, eps, bar):
    """The per-neuron loop of research/nnslicer.md section 7 (one image, 'same' padding)."""
    k = np.asarray(layer.kernel)
    kh, kw, cin, _ = k.shape
    s = layer.strides[0]
    h, w = x_in.shape[:2]
    ho, wo = c_out.shape[:2]
    pt = max((ho - 1) * s + kh - h, 0) // 2
    pl = max((wo - 1) * s + kw - w, 0) // 2
    dx = x_in - ref
    c_in = np.zeros(x_in.shape)
    for oh, ow, co in np.argwhere(c_out != 0):
        cells = [(oh * s + a - pt, ow * s + b - pl, ci) for a in range(kh) for b in range(kw)
                 for ci in range(cin)]
        cells = [(i, j, ci) for i, j, ci in cells if 0 <= i < h and 0 <= j < w]
        v = np.array([dx[i, j, ci] * k[i - oh * s + pt, j - ow * s + pl, ci, co]
                      for i, j, ci in cells])
        dy = v.sum()
        for idx in _select_reference(v, eps, bar):
            c_in[cells[idx]] += np.sign(v[idx]) * np.sign(dy) * np.sign(c_out[oh, ow, co])
    return c_in


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_rule_matches_the_per_neuron_algorithm(stride):
    model = _conv_net(stride)
    graph = Graph.of(model, ("r0", "r1"))
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, size=(3, 6, 6, 2)).astype("float32")
    acts = graph.forward(x)
    refs = {k: a.mean(0) for k, a in acts.items()}
    cfg = SliceConfig(eps=0.2)
    got = contributions(graph, acts, refs, np.array([0, 1, 3]), cfg)
    conv = model.get_layer("conv")
    assert np.abs(got["r1"]).sum() > 0
    for b in range(3):  # conv's input is r0's output; r1's contributions pass BN unchanged
        want = _conv_backward_reference(conv, acts["r0"][b], refs["r0"], got["r1"][b], 0.2,
                                        0.01)
        np.testing.assert_array_equal(got["r0"][b], want)
        assert np.abs(want).sum() > 0


@pytest.mark.parametrize("kernel, strides, padding, dilation", [
    (3, 1, "same", 1), (3, 2, "same", 1), ((3, 2), (2, 1), "valid", 1), (2, 2, "same", 1),
    (3, 1, "same", 2), ((2, 3), 1, "valid", (2, 1)), (4, 3, "same", 1)])
def test_receptive_fields_are_the_convolution_and_scatter_is_their_adjoint(kernel, strides,
                                                                         padding, dilation):
    """``_extract`` (NumPy, backend-free) reproduces Keras' convolution on every geometry the
    conv rule meets, and ``_scatter`` is its adjoint: <extract(x), g> = <x, scatter(g)>."""
    layer = keras.layers.Conv2D(3, kernel, strides=strides, padding=padding,
                                dilation_rate=dilation, use_bias=False)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 7, 6, 2)).astype("float32")
    want = np.asarray(layer(x))
    patches = _extract(x, layer)
    assert patches.shape[:3] == want.shape[:3]
    got = patches @ np.asarray(layer.kernel).reshape(patches.shape[-1], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = rng.integers(-3, 4, size=patches.shape).astype("float32")
    back = _scatter(g, layer, x.shape)
    assert back.shape == x.shape
    np.testing.assert_allclose((patches * g).sum(), (x * back).sum(), rtol=1e-5)


def test_maxpool_copies_to_every_tied_maximum_and_flatten_keeps_mass():
    x_in = keras.Input((4, 4, 1), name="image")
    x = keras.layers.ReLU(name="r")(x_in)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flat")(x)
    model = keras.Model(x_in, keras.layers.Dense(2, name="logits")(x))
    graph = Graph.of(model, ("r", "flat"))
    img = np.zeros((1, 4, 4, 1), np.float32)
    img[0, 0, 1, 0] = 5.0  # window (0,0): one maximum; the other windows are all-zero ties
    acts = graph.forward(img)
    pool = model.get_layer("pool")
    c_out = np.array([[[[1.0], [-1.0]], [[1.0], [2.0]]]], np.float32)
    (c_in,) = RULES[keras.layers.MaxPooling2D](pool, [acts["r"]], [0.0], acts["pool"], c_out,
                                               SliceConfig())
    assert c_in[0, 0, 1, 0] == 1.0 and c_in[0, :2, :2].sum() == 1.0
    np.testing.assert_array_equal(c_in[0, :2, 2:, 0], -np.ones((2, 2)))  # 4 tied maxima
    np.testing.assert_array_equal(c_in[0, 2:, 2:, 0], 2 * np.ones((2, 2)))
    (flat,) = RULES[keras.layers.Flatten](model.get_layer("flat"), [c_out], [0.0], None,
                                          c_out.reshape(1, -1), SliceConfig())
    assert np.abs(flat).sum() == np.abs(c_out).sum()


def _fixed_cnn() -> keras.Model:
    """8x8x1 -> conv1 (relu) -> pool -> conv2 (relu) -> fc (relu) -> logits, weights drawn
    with NumPy (the same on every backend); the logits' bias balances the three classes."""
    x_in = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(x_in)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(6, activation="relu", name="fc")(h)
    model = keras.Model(x_in, keras.layers.Dense(3, name="logits")(h))
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    model.get_layer("logits").set_weights([model.get_layer("logits").get_weights()[0],
                                           np.array([10.6, 0, 0], np.float32)])
    return model


# What both modes gave on TensorFlow (exact: integer sums, so equality; approx: float32).
FIXED_EXACT = {
    "conv1": [[153, 71, 64, 89], [221, 50, 66, 68], [148, 88, 74, 83]],
    "conv2": [[39, 27, 7, 20], [45, 37, 17, 45], [44, 24, 14, 36]],
    "fc": [[1, 4, 0, 0, 0, 8], [6, 2, 0, 0, 4, 7], [8, 0, 0, 0, 1, 1]],
}
FIXED_APPROX = {
    "conv1": [[25.156706, 21.720207, 26.253963, 31.870235],
              [21.743967, 16.815662, 22.323706, 23.963781],
              [20.32482, 20.533478, 26.406223, 33.88047]],
    "conv2": [[20.020601, 17.529171, 6.5635076, 13.293596],
              [16.790676, 13.821599, 5.64137, 13.420866],
              [24.99931, 15.336146, 8.325907, 19.653381]],
    "fc": [[0.1902104, 1.114494, 0, 0, 0, 3.5501661],
           [3.3961468, 0.816904, 0, 0, 2.4418435, 4.994183],
           [5.1820006, 0.1250359, 0, 0.1843641, 0.2185457, 0.1635626]],
}


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_fixed_model_slices_alike_on_every_backend(mode):
    """The same scores and masks on TensorFlow and JAX (the constants above): weights and
    images come from NumPy; batches of 3 leave ragged last batches (padded on JAX). No cumulative
    share lies within 0.02 of per = 0.85, so float noise cannot move a mask."""
    model = _fixed_cnn()
    x = np.random.default_rng(1).uniform(-1, 1, size=(40, 8, 8, 1)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), -1)
    assert np.bincount(y).tolist() == [17, 14, 9]
    cfg = SliceConfig(mode=mode, max_per_class=8, batch_size=3, per=0.85)
    res = slice_model(model, x, y, ("conv1", "conv2", "fc"), cfg)
    assert res.images.tolist() == [8, 8, 8]
    want = FIXED_EXACT if mode == "exact" else FIXED_APPROX
    for name, w in want.items():
        w = np.asarray(w, np.float64)
        if mode == "exact":
            np.testing.assert_array_equal(res.scores[name], w)
        else:
            np.testing.assert_allclose(res.scores[name], w, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(res.masks()[name], cover_mask(w, 0.85))
    masks = res.masks()
    assert masks["conv2"].tolist() == [[True, True, False, True]] * 3


def test_cover_mask_definition_and_edge_cases():
    s = np.array([[5.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(cover_mask(s, 0.5), [[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cover_mask(s, 0.51), [[1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cover_mask(s, 1.0), [[1, 0, 1, 1], [0, 0, 0, 0]])


@pytest.mark.parametrize("per", [0.0, -0.1, 1.5])
def test_per_outside_unit_interval_is_refused(per):
    with pytest.raises(DareError, match="--per must lie in"):
        SliceConfig(per=per)


def test_every_option_has_help_and_parses_into_the_config():
    p = argparse.ArgumentParser()
    names = add_options(p, SliceConfig)
    assert names == [f.name for f in fields(SliceConfig)]
    assert all(f.metadata["help"] for f in fields(SliceConfig))
    cfg = from_args(SliceConfig, p.parse_args(["--per", "0.5", "--mode", "approx",
                                                "--max-per-class", "7", "--relu", "gate"]))
    assert cfg == SliceConfig(per=0.5, mode="approx", max_per_class=7, relu="gate")
    assert from_args(SliceConfig, p.parse_args([])) == SliceConfig()
    with pytest.raises(SystemExit):  # choices come from MODES
        p.parse_args(["--mode", "fast"])


def test_run_slicing_slices_the_runs_own_layers(tmp_path):
    # The run names a registered architecture whose layers the model does not have: the run's
    # own layers (Run.trace_layers) are sliced, not get_architecture(model_name).trace_layers.
    model = get_architecture("smallcnn").build((12, 12, 1), 3)
    x = np.random.default_rng(0).uniform(size=(6, 12, 12, 1)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), -1)
    run = SimpleNamespace(model_name="vgg16", trace_layers=("fc1_relu",), path=tmp_path,
                          load_model=lambda: model,
                          data=lambda: SimpleNamespace(x_train=x, y_train=y),
                          file=lambda rel: Path(tmp_path) / rel)
    result = run_slicing(run, SliceConfig(max_per_class=2, mode="approx"), log=lambda s: None)
    masks = io.read_npz(tmp_path / layout.MASKS)
    assert set(masks) == set(result.scores) == {"fc1_relu"}
    assert masks["fc1_relu"].shape == (3, 128)
    assert io.read_json(tmp_path / layout.SLICE_SUMMARY)["slice"]["mode"] == "approx"


@pytest.fixture(scope="module")
def fm_slice(fm_run):
    run = Run.open(fm_run)
    data = run.data()
    cfg = SliceConfig(max_per_class=15)
    return slice_model(run.load_model(), data.x_train, data.y_train, run.trace_layers, cfg)


@pytest.mark.slow
def test_slice_grows_with_per(fm_slice):
    pers = [0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0]
    masks = [fm_slice.masks(p) for p in pers]
    for name in fm_slice.scores:
        sizes = [m[name].sum() for m in masks]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1], (name, sizes)
        for small, big in zip(masks, masks[1:], strict=False):
            assert not (small[name] & ~big[name]).any()  # nested, not just larger
        # per = 1 keeps exactly the units with a non-zero score
        np.testing.assert_array_equal(masks[-1][name], fm_slice.scores[name] > 0)


@pytest.mark.slow
@pytest.mark.jax  # slicing, both modes, on real data: CI runs it on JAX too
def test_exact_and_approx_slices_agree_roughly(fm_run, fm_slice):
    from darekit.slicing import mask_jaccard
    run = Run.open(fm_run)
    data = run.data()
    approx = slice_model(run.load_model(), data.x_train, data.y_train, run.trace_layers,
                         SliceConfig(max_per_class=15, mode="approx"))
    jac = mask_jaccard(fm_slice.masks(), approx.masks())
    assert all(0.3 < j <= 1.0 for j in jac.values()), jac


@pytest.mark.slow
def test_nnslicer_script_writes_masks(fm_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fm_run, run_dir)
    run_script("dare/nnslicer.py", "--run-dir", run_dir, "--per", "0.9", "--max-per-class", "10")
    masks = io.read_npz(run_dir / layout.MASKS)
    arch = get_architecture("smallcnn")
    assert set(masks) == set(arch.trace_layers)
    assert masks["fc1_relu"].shape == (10, 128) and masks["fc1_relu"].dtype == bool
    assert masks["block2_relu1"].shape == (10, 64)
    assert all(m.any(axis=1).all() for m in masks.values())  # every class has a slice
    summary = io.read_json(run_dir / layout.SLICE_SUMMARY)
    assert summary["slice"]["per"] == 0.9
    sizes = summary["summary"]["layers"]["fc1_relu"]["slice_size"]
    assert sizes == masks["fc1_relu"].sum(1).tolist()
    assert (run_dir / "slice" / "summary.csv").is_file()


def test_nnslicer_script_refuses_bad_per_before_work(tmp_path):
    proc = call_script("dare/nnslicer.py", "--run-dir", tmp_path / "none", "--per", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --per must lie in (0, 1]; received 0.0"
