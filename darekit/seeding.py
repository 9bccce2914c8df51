"""One seed per command: Python, NumPy and TensorFlow are seeded together."""

from __future__ import annotations

import keras
import tensorflow as tf


def op_determinism() -> bool:
    """Whether TensorFlow's op determinism is on (it is process-wide, and cannot be undone)."""
    from tensorflow.python.framework import config  # no public getter in TF 2.21

    return bool(config.is_op_determinism_enabled())


def xla_allowed(jit_compile: bool) -> bool:
    """``jit_compile``, unless op determinism is on: TF 2.21 refuses to compile max-pooling
    gradients deterministically with XLA ("MaxPool gradient ops do not yet have a deterministic
    XLA implementation", on the CPU too), so deterministic runs attack and train without XLA."""
    return bool(jit_compile) and not op_determinism()


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG; ``deterministic`` also makes TF ops deterministic (slower)."""
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()
