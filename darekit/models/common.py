"""Layers shared by every architecture.

Every model is built from Keras' own layers only (no custom layer classes), so a saved
``.keras`` file of any of them opens with a plain ``keras.saving.load_model``, without darekit.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

BN_MOMENTUM = 0.9
"""Moving-average momentum of every BatchNormalization layer: PyTorch's default (0.1 there),
which the reference codebases use. Keras' 0.99 leaves the statistics far from the data after
the few hundred steps of a quick run, and test accuracy then lags training accuracy badly."""

NORMALIZE = "normalize"
"""Name of the per-channel normalisation layer of every registered architecture."""

STD_FLOOR = 1e-6
"""Smallest standard deviation a channel is divided by (a constant channel would give 0)."""


def batch_norm(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)


def normalization(name: str = NORMALIZE) -> layers.Normalization:
    """Per-channel ``(x - mean) / std`` as Keras' built-in ``Normalization(axis=-1)``.

    Its statistics are (non-trainable) weights, ``mean`` and ``variance`` ``(C,)`` (plus an
    unused scalar ``count``), so a weights file fully describes a trained model: rebuilding
    the architecture and loading the weights restores the normalisation too. Until
    ``set_normalization`` sets them they are 0 and 1 (the identity).
    Input and output: ``(batch, H, W, C)``.
    """
    return layers.Normalization(axis=-1, name=name)


def _stat_variables(layer: layers.Normalization) -> dict[str, keras.Variable]:
    if not isinstance(layer, layers.Normalization) or not layer.built:
        raise TypeError(f"{layer.name!r} is not a built keras.layers.Normalization layer")
    return {v.name: v for v in layer.weights}


def set_normalization(layer: layers.Normalization, mean: np.ndarray | None,
                      std: np.ndarray | None) -> None:
    """Set a built ``Normalization`` layer to ``(x - mean) / std``; ``mean``, ``std`` ``(C,)``.

    Keras divides by ``maximum(sqrt(variance), epsilon)``: the variance stored is
    ``max(std, STD_FLOOR) ** 2``. ``None`` leaves that statistic as it is.
    """
    var = _stat_variables(layer)
    if mean is not None:
        var["mean"].assign(np.asarray(mean, "float32").reshape(-1))
    if std is not None:
        std = np.maximum(np.asarray(std, "float64").reshape(-1), STD_FLOOR)
        var["variance"].assign((std * std).astype("float32"))
    # The layer divides by tensors derived from its weights when they change (adapt, load);
    # after a direct assignment it must be told, or it keeps the old statistics.
    layer.finalize_state()


def normalization_stats(layer: layers.Normalization) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` ``(C,)`` float32 of a built ``Normalization`` layer."""
    var = _stat_variables(layer)
    mean = np.asarray(var["mean"].numpy(), "float32").reshape(-1)
    std = np.sqrt(np.asarray(var["variance"].numpy(), "float64")).astype("float32").reshape(-1)
    return mean, std


def channel_stats(x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``x`` ``(N, H, W, C)``, in float64 to avoid drift."""
    c = x.shape[-1]
    s = np.zeros(c)
    s2 = np.zeros(c)
    for i in range(0, len(x), batch):
        b = x[i:i + batch].reshape(-1, c).astype(np.float64)
        s += b.sum(0)
        s2 += (b * b).sum(0)
    n = x.size // c
    mean = s / n
    return mean.astype("float32"), np.sqrt(np.maximum(s2 / n - mean**2, 0)).astype("float32")


def input_block(input_shape: tuple[int, int, int], min_size: int = 32):
    """``Input`` -> (``pad`` with black pixels up to ``min_size``) -> ``normalize``.

    Returns ``(inputs, x)``. Padding happens in pixel space, before normalisation, so a padded
    Fashion-MNIST image is the original on a black (0) border, as its own background is.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    h, w = input_shape[:2]
    if h < min_size or w < min_size:
        ph, pw = max(min_size - h, 0), max(min_size - w, 0)
        x = layers.ZeroPadding2D(((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), name="pad")(x)
    x = normalization()(x)
    return inputs, x
