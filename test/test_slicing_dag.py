"""NNSlicer contribution analysis over layer graphs: residual fan-outs, ``Add``, global average
pooling, built-in activations, the checks made before any work, ``find_trace_layers``, and
ResNet18. Chains and the rules they share are in ``test_slicing.py``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from test_slicing import _conv_backward_reference, _select_reference

from darekit.errors import DareError
from darekit.models import ARCHITECTURES, get_architecture
from darekit.slicing import (
    RULES,
    Graph,
    SliceConfig,
    approx_contributions,
    check_sliceable,
    contributions,
    find_trace_layers,
    slice_model,
)

L = keras.layers


# --------------------------------------------------------------------------- hand-checked
def _residual_net() -> keras.Model:
    """``r0 = relu(image)``, ``add = relu(2 * r0) + r0`` (a 1x1 conv with a built-in relu plus
    the identity), global average pooling, ``logits = [gap, -gap]``; image (1, 2, 1)."""
    x_in = keras.Input((1, 2, 1), name="image")
    r0 = L.ReLU(name="r0")(x_in)
    conv = L.Conv2D(1, 1, use_bias=False, activation="relu", name="conv")(r0)
    add = L.Add(name="add")([conv, r0])
    gap = L.GlobalAveragePooling2D(name="gap")(add)
    model = keras.Model(x_in, L.Dense(2, use_bias=False, name="logits")(gap))
    model.get_layer("conv").set_weights([np.full((1, 1, 1, 1), 2.0, np.float32)])
    model.get_layer("logits").set_weights([np.array([[1.0, -1.0]], np.float32)])
    return model


# One image: r0 = [3, 0], conv = [6, 0], add = [9, 0], gap = 4.5. The references are chosen
# (linearly consistent: ref(add) = ref(conv) + ref(r0)) so that dx(r0) = [0.5, -1],
# dx(conv) = [10, -2], dx(add) = [10.5, -3] and dx(gap) = 3.75.
X_RES = np.array([[[[3.0], [0.0]]]], np.float32)
REFS_RES = {"r0": np.array([[[2.5], [1.0]]], np.float32),
            "conv": np.array([[[-4.0], [2.0]]], np.float32),
            "add": np.array([[[-1.5], [3.0]]], np.float32),
            "gap": np.array([0.75], np.float32), "logits": np.zeros(2, np.float32)}


@pytest.mark.parametrize("relu, r0_want", [("pass", [1.0, -2.0]), ("gate", [1.0, -1.0])])
def test_residual_contributions_by_hand(relu, r0_want):
    model = _residual_net()
    graph = Graph.of(model, ("r0", "conv", "add", "gap"))
    assert graph.frontier == ("r0",) and [s.output for s in graph.steps] == [
        "conv", "add", "gap", "logits"]
    acts = graph.forward(X_RES)
    np.testing.assert_array_equal(acts["add"].ravel(), [9.0, 0.0])
    got = contributions(graph, acts, REFS_RES, np.array([0]), SliceConfig(eps=0.2, relu=relu))
    # logits: one synapse (gap) -> +1.  gap: v = dx(add) / 2 = [5.25, -1.5], dy = 3.75; the
    # first alone misses dy by 1.5 >= 0.2 * 3.75, so both: [+1, -1].
    np.testing.assert_array_equal(got["gap"], [[1.0]])
    np.testing.assert_array_equal(got["add"].ravel(), [1.0, -1.0])
    # add, position 0: v = (dx conv, dx r0) = (10, 0.5), dy = 10.5: conv alone is within
    # 0.2 * 10.5, so only conv gets +1.  Position 1: v = (-2, -1), dy = -3: both are needed;
    # sign(v) sign(dy) = +1, times sign(CONTRIB) = -1: conv -1, r0 -1.
    np.testing.assert_array_equal(got["conv"].ravel(), [1.0, -1.0])
    # conv (1x1, one synapse each): r0 gets sign(CONTRIB) = [1, -1] through the relu ("pass"),
    # or [1, 0] with "gate" (conv's output is 0 at position 1).  The fan-out adds the add's
    # [0, -1]: r0 = [1, -2] (pass) or [1, -1] (gate).
    np.testing.assert_array_equal(got["r0"].ravel(), r0_want)


def test_residual_approx_sums_the_gradient_of_both_branches():
    graph = Graph.of(_residual_net(), ("r0",))
    got = approx_contributions(graph, X_RES, REFS_RES, np.array([0]),
                               SliceConfig(mode="approx"))
    # logit_0 = mean(relu(2 r0) + r0): d/d r0 = (2 [r0 > 0] + 1) / 2 = [1.5, 0.5] at r0 = [3, 0];
    # times dx(r0) = [0.5, -1].
    np.testing.assert_allclose(got["r0"].ravel(), [0.75, -0.5], rtol=1e-6)


# --------------------------------------------------------------------------- rules vs reference
def test_add_and_global_pool_rules_match_the_per_neuron_algorithm():
    rng = np.random.default_rng(3)
    cfg = SliceConfig(eps=0.2)
    xs = [rng.normal(size=(2, 3, 3, 4)).astype("float32") for _ in range(3)]
    refs = [rng.normal(size=(3, 3, 4)).astype("float32") for _ in range(3)]
    c_out = rng.integers(-2, 3, size=(2, 3, 3, 4)).astype("float32")
    got = RULES[L.Add](L.Add(), xs, refs, None, c_out, cfg)
    dx = np.stack([x - r for x, r in zip(xs, refs, strict=True)], -1)
    want = np.zeros(dx.shape)
    for pos in np.argwhere(c_out != 0):
        v = dx[tuple(pos)]
        for i in _select_reference(v, 0.2, 0.01):
            want[(*pos, i)] = np.sign(v[i]) * np.sign(v.sum()) * np.sign(c_out[tuple(pos)])
    for i in range(3):
        np.testing.assert_array_equal(got[i], want[..., i])
    assert np.abs(want).sum() > 0

    c_gap = rng.integers(-2, 3, size=(2, 4)).astype("float32")
    (got,) = RULES[L.GlobalAveragePooling2D](L.GlobalAveragePooling2D(), xs[:1], refs[:1],
                                             None, c_gap, cfg)
    want = np.zeros(xs[0].shape)
    for b, ch in np.argwhere(c_gap != 0):
        v = (xs[0][b, :, :, ch] - refs[0][:, :, ch]).ravel() / 9
        for i in _select_reference(v, 0.2, 0.01):
            want[b, i // 3, i % 3, ch] = np.sign(v[i]) * np.sign(v.sum()) * np.sign(c_gap[b, ch])
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).sum() > 0


def _downsampling_block() -> keras.Model:
    """A ResNet block that halves the size: 3x3 stride-2 conv -> BN -> ReLU -> 3x3 conv -> BN,
    plus the 1x1 stride-2 (valid) shortcut conv -> BN; Add, ReLU, global pool, logits."""
    x_in = keras.Input((6, 6, 2), name="image")
    r0 = L.ReLU(name="r0")(x_in)
    y = L.Conv2D(3, 3, strides=2, padding="same", use_bias=False, name="c1")(r0)
    y = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(y))
    y = L.BatchNormalization(name="bn2")(L.Conv2D(3, 3, padding="same", use_bias=False,
                                                  name="c2")(y))
    s = L.Conv2D(3, 1, strides=2, use_bias=False, name="sc")(r0)
    s = L.BatchNormalization(name="sc_bn")(s)
    out = L.ReLU(name="out")(L.Add(name="add")([y, s]))
    model = keras.Model(x_in, L.Dense(4, name="logits")(L.GlobalAveragePooling2D()(out)))
    rng = np.random.default_rng(5)
    for name in ("c1", "c2", "sc", "logits"):
        layer = model.get_layer(name)
        layer.set_weights([rng.normal(size=w.shape).astype("float32")
                           for w in layer.get_weights()])
    return model


def test_strided_shortcut_and_fan_out_match_the_per_neuron_algorithm():
    model = _downsampling_block()
    graph = Graph.of(model, ("r0", "c1", "sc", "out"))
    x = np.random.default_rng(9).uniform(-1, 1, size=(3, 6, 6, 2)).astype("float32")
    acts = graph.forward(x)
    refs = {k: a.mean(0) for k, a in acts.items()}
    got = contributions(graph, acts, refs, np.array([0, 2, 3]), SliceConfig(eps=0.2))
    assert got["c1"].shape == got["sc"].shape == (3, 3, 3, 3)
    for b in range(3):  # r0 feeds both convs: it receives the sum of their contributions
        parts = [_conv_backward_reference(model.get_layer(n), acts["r0"][b], refs["r0"],
                                          got[n][b], 0.2, 0.01) for n in ("c1", "sc")]
        assert all(np.abs(p).sum() > 0 for p in parts)
        np.testing.assert_array_equal(got["r0"][b], parts[0] + parts[1])


# --------------------------------------------------------------------------- built-in relu
def _cnn(fused: bool) -> keras.Model:
    """conv(relu) -> maxpool -> flatten -> dense(relu) -> logits, the relus built in or as
    separate layers (``c1_relu``, ``fc_relu``); same weights either way."""
    x_in = keras.Input((6, 6, 2), name="image")
    x = L.ReLU(name="r0")(x_in)
    x = L.Conv2D(4, 3, padding="same", activation="relu" if fused else None, name="c1")(x)
    x = x if fused else L.ReLU(name="c1_relu")(x)
    x = L.Flatten(name="flat")(L.MaxPooling2D(2, name="pool")(x))
    x = L.Dense(5, activation="relu" if fused else None, name="fc")(x)
    x = x if fused else L.Activation("relu", name="fc_relu")(x)
    model = keras.Model(x_in, L.Dense(3, name="logits")(x))
    rng = np.random.default_rng(11)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


@pytest.mark.parametrize("relu", ["pass", "gate"])
def test_built_in_relu_is_the_weighted_sum_then_the_relu_rule(relu):
    x = np.random.default_rng(2).uniform(-1, 1, size=(4, 6, 6, 2)).astype("float32")
    classes = np.array([0, 1, 2, 0])
    cfg = SliceConfig(relu=relu)
    out = {}
    for fused, names in ((True, ("r0", "c1", "fc")), (False, ("r0", "c1_relu", "fc_relu"))):
        graph = Graph.of(_cnn(fused), names)
        acts = graph.forward(x)
        refs = {k: a.mean(0) for k, a in acts.items()}
        got = contributions(graph, acts, refs, classes, cfg)
        out[fused] = [got[n] for n in names]
    for a, b in zip(out[True], out[False], strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(out[True][0]).sum() > 0


# --------------------------------------------------------------------------- checks
def test_check_sliceable_names_every_problem_in_one_line():
    x_in = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(4, 3, activation="tanh", name="c_tanh")(x_in)
    x = L.AveragePooling2D(2, name="avg")(x)
    x = L.MaxPooling2D(2, strides=1, name="overlap")(x)
    x = L.Flatten(name="flat")(x)
    model = keras.Model(x_in, L.Dense(3, activation="softmax", name="probs")(x))
    with pytest.raises(DareError) as e:
        check_sliceable(model, ("image", "nope"))
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'probs' applies a softmax", "'c_tanh' (Conv2D): activation 'tanh'",
                 "'avg' (AveragePooling2D): no contribution rule", "'overlap' (MaxPooling2D)",
                 "trace layer 'nope' is missing", "rules exist for Dense, Conv2D"):
        assert part in msg, (part, msg)
    assert "'flat'" not in msg  # Flatten is fine
    # slice_model checks first: with no data at all, it still fails with the same message.
    with pytest.raises(DareError, match="'avg' \\(AveragePooling2D\\)"):
        slice_model(model, None, None, ("image", "nope"), SliceConfig())
    # Layers before the earliest trace layer are never walked: slicing from "flat" is fine
    # but for the softmax.
    with pytest.raises(DareError) as e:
        check_sliceable(model, ("flat",))
    assert "softmax" in str(e.value) and "avg" not in str(e.value)


def test_trace_layer_off_the_path_to_the_logits_is_refused():
    x_in = keras.Input((4,), name="image")
    h = L.Dense(4, activation="relu", name="h")(x_in)
    aux = L.Dense(2, activation="relu", name="aux_relu")(x_in)
    logits = L.Dense(3, name="logits")(h)
    model = keras.Model(x_in, [logits, L.Dense(1, name="aux")(aux)])
    check_sliceable(model, ("h",))  # the layer named "logits" is the criterion
    with pytest.raises(DareError, match="'aux_relu' is not on a path to the logits"):
        check_sliceable(model, ("h", "aux_relu"))
    assert find_trace_layers(model) == ("h",)


# --------------------------------------------------------------------------- found layers
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
def test_found_trace_layers_are_the_declared_ones(name, shape):
    model = get_architecture(name).build(shape, 10)
    found = find_trace_layers(model)
    assert found == get_architecture(name).trace_layers
    check_sliceable(model, found)


@pytest.mark.parametrize("sequential", [False, True])
def test_found_trace_layers_of_a_cnn_with_built_in_relus(sequential):
    stack = [L.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
             L.Conv2D(8, 3, padding="same", activation="relu", name="c2"),
             L.MaxPooling2D(2, name="p1"),
             L.Conv2D(16, 3, padding="same", activation="relu", name="c3"),
             L.BatchNormalization(name="bn3"),
             L.Conv2D(16, 3, padding="same", activation="relu", name="c4"),
             L.MaxPooling2D(2, name="p2"),
             L.Flatten(name="flat"),
             L.Dense(32, activation="relu", name="fc"),
             L.Dropout(0.5, name="drop"),
             L.Dense(10, name="out")]
    if sequential:
        model = keras.Sequential([keras.Input((16, 16, 3)), *stack])
    else:
        x_in = keras.Input((16, 16, 3))
        x = x_in
        for layer in stack:
            x = layer(x)
        model = keras.Model(x_in, x)
    found = find_trace_layers(model)
    assert found == ("c3", "c4", "fc")
    x = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), -1)
    for mode in ("exact", "approx"):
        res = slice_model(model, x, y, found, SliceConfig(max_per_class=4, mode=mode))
        assert {k: m.shape for k, m in res.masks().items()} == {
            "c3": (10, 16), "c4": (10, 16), "fc": (10, 32)}
        assert res.images.sum() == 4


# --------------------------------------------------------------------------- ResNet18
def test_resnet18_slices_in_both_modes():
    keras.utils.set_random_seed(0)
    model = get_architecture("resnet18").build((32, 32, 3), 10)
    # stage3_block2_out too: then the walk passes stage 4's stride-2 conv and its 1x1
    # stride-2 shortcut conv + BN, and stage 3's output fans out to both.
    layers = ("stage3_block2_out", *find_trace_layers(model))
    x = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), -1)
    for mode in ("exact", "approx"):
        # reference "all": a class profiled on one image is its own class mean (dx = 0).
        cfg = SliceConfig(max_per_class=3, mode=mode, reference="all")
        res = slice_model(model, x, y, layers, cfg)
        masks = res.masks()
        assert {k: m.shape for k, m in masks.items()} == {
            "stage3_block2_out": (10, 256), "stage4_block1_out": (10, 512),
            "stage4_block2_out": (10, 512)}
        assert res.images.sum() == 3
        profiled = res.images > 0
        for m in masks.values():  # a non-empty slice for exactly the profiled classes
            np.testing.assert_array_equal(m.any(1), profiled)
