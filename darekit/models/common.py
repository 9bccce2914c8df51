"""Layers shared by every architecture."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

BN_MOMENTUM = 0.9
"""Moving-average momentum of every BatchNormalization layer: PyTorch's default (0.1 there),
which the reference codebases use. Keras' 0.99 leaves the statistics far from the data after
the few hundred steps of a quick run, and test accuracy then lags training accuracy badly."""


def batch_norm(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)


@keras.saving.register_keras_serializable(package="darekit")
class ChannelNormalization(layers.Layer):
    """``(x - mean) / std`` per channel, with the statistics stored as (non-trainable) weights.

    Keeping the statistics as weights means a weights file fully describes a trained model:
    rebuilding the architecture and loading the weights restores the normalisation too.
    Input and output: ``(batch, H, W, C)``.
    """

    def build(self, input_shape):
        c = input_shape[-1]
        self.mean = self.add_weight(name="mean", shape=(c,), initializer="zeros", trainable=False)
        self.std = self.add_weight(name="std", shape=(c,), initializer="ones", trainable=False)

    def set_stats(self, mean: np.ndarray | None, std: np.ndarray | None) -> None:
        if mean is not None:
            self.mean.assign(np.asarray(mean, "float32").reshape(-1))
        if std is not None:
            self.std.assign(np.maximum(np.asarray(std, "float32").reshape(-1), 1e-6))

    def call(self, x):
        return (x - self.mean) / self.std


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
    x = ChannelNormalization(name="normalize")(x)
    return inputs, x
