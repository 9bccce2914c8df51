"""One seed per command: Python, NumPy and TensorFlow are seeded together."""

from __future__ import annotations

import keras
import tensorflow as tf


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG; ``deterministic`` also makes TF ops deterministic (slower)."""
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()
