"""Architecture registry, model shapes, parameter counts, and the normalisation layer."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest

from darekit.models import ARCHITECTURES, LOGITS, get_architecture
from darekit.models.common import (
    channel_stats,
    input_block,
    normalization_stats,
    set_normalization,
)

NAMES = sorted(ARCHITECTURES)
SHAPES = [(32, 32, 3), (28, 28, 1)]
# Slicing walks these layer by layer: all but the residual nets must be plain chains.
SEQUENTIAL = [n for n in NAMES if not n.startswith("resnet")]
PAPER = [n for n in NAMES if ARCHITECTURES[n].paper_params is not None]
NEEDS_PAD = {"vgg16": True, "vgg19": True, "alexnet": False, "resnet18": True}


@functools.cache
def _model(name: str, shape: tuple[int, int, int]) -> keras.Model:
    return ARCHITECTURES[name].build(shape, 10)


def test_registry_contents():
    assert set(NAMES) >= {"vgg16", "vgg19", "alexnet", "resnet18"}
    assert set(PAPER) >= {"vgg16", "vgg19", "alexnet", "resnet18"}
    for name in NAMES:
        arch = get_architecture(name)
        assert arch.name == name
        assert arch.trace_layers and arch.dare_lr > 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_build_and_forward(name, shape):
    model = _model(name, shape)
    arch = ARCHITECTURES[name]
    assert model.layers[-1].name == LOGITS
    assert model.get_layer(LOGITS).activation is keras.activations.linear
    assert model.output_shape == (None, 10)
    names = {layer.name for layer in model.layers}
    assert len(names) == len(model.layers)  # names are unique
    for layer_name in arch.trace_layers:
        assert layer_name in names, layer_name
    assert "normalize" in names
    if shape == (28, 28, 1) and name in NEEDS_PAD:
        assert ("pad" in names) == NEEDS_PAD[name]
    x = np.random.default_rng(0).uniform(0, 1, (3, *shape)).astype("float32")
    y = np.asarray(model(x, training=False))
    assert y.shape == (3, 10)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("name", PAPER)
def test_param_count_matches_paper(name):
    arch = ARCHITECTURES[name]
    n = _model(name, (32, 32, 3)).count_params()
    assert abs(n - arch.paper_params) / arch.paper_params < 0.03, (n, arch.paper_params)


def test_alexnet_fashion_mnist_params_near_paper():
    # The paper's Fashion-MNIST AlexNet has 8.1M parameters: the 28x28 input is used as is.
    n = _model("alexnet", (28, 28, 1)).count_params()
    assert abs(n - 8_100_000) / 8_100_000 < 0.03, n


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_sequential_chain(name):
    model = _model(name, (32, 32, 3))
    assert isinstance(model.layers[0], keras.layers.InputLayer)
    allowed = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.BatchNormalization,
               keras.layers.ReLU, keras.layers.Activation, keras.layers.MaxPooling2D,
               keras.layers.AveragePooling2D, keras.layers.Dropout, keras.layers.Flatten,
               keras.layers.ZeroPadding2D, keras.layers.Normalization)
    for prev, layer in zip(model.layers[:-1], model.layers[1:], strict=True):
        assert isinstance(layer, allowed), layer
        assert len(layer._inbound_nodes) == 1, layer.name
        parents = layer._inbound_nodes[0].parent_nodes
        assert len(parents) == 1, layer.name
        assert parents[0].operation is prev, (prev.name, layer.name)


def test_trace_layers_are_post_activation():
    for name in NAMES:
        model = _model(name, (32, 32, 3))
        for layer_name in ARCHITECTURES[name].trace_layers:
            assert isinstance(model.get_layer(layer_name),
                              (keras.layers.ReLU, keras.layers.Activation)), (name, layer_name)


def test_build_sets_normalisation_stats():
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.25, 0.2])
    model = get_architecture("alexnet").build((32, 32, 3), 10, mean=mean, std=std)
    got_mean, got_std = normalization_stats(model.get_layer("normalize"))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_std, std, rtol=1e-6)


def _norm_model() -> keras.Model:
    inputs, x = input_block((5, 5, 3), min_size=5)
    return keras.Model(inputs, x)


def test_channel_normalization_and_weights_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    mean = rng.uniform(0, 1, 3).astype("float32")
    std = rng.uniform(0.1, 1, 3).astype("float32")
    model = _norm_model()
    set_normalization(model.get_layer("normalize"), mean, std)
    x = rng.uniform(0, 1, (4, 5, 5, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), (x - mean) / std, rtol=1e-5, atol=1e-5)

    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    fresh = _norm_model()
    norm = fresh.get_layer("normalize")
    np.testing.assert_array_equal(normalization_stats(norm)[0], np.zeros(3))
    fresh.load_weights(path)
    got_mean, got_std = normalization_stats(norm)
    np.testing.assert_allclose(got_mean, mean)
    np.testing.assert_allclose(got_std, std, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fresh(x)), (x - mean) / std, rtol=1e-5, atol=1e-5)


def test_channel_stats_matches_numpy():
    x = np.random.default_rng(2).uniform(0, 1, (37, 6, 5, 3)).astype("float32")
    mean, std = channel_stats(x, batch=8)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-4)


def test_pad_is_black_border():
    inputs, x = input_block((28, 28, 1))
    model = keras.Model(inputs, x)  # mean 0, std 1: the output is the padded image
    img = np.ones((1, 28, 28, 1), "float32")
    out = np.asarray(model(img))
    assert out.shape == (1, 32, 32, 1)
    assert out.sum() == 28 * 28
    np.testing.assert_array_equal(out[0, 2:30, 2:30], img[0])
