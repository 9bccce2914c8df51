"""One seed per command: Python, NumPy and the Keras backend are seeded together.

Thin names over the backend seam (``darekit.backend``), kept because the stages import them.
Across backends the same seed draws different initial weights (and dropout masks); the input
pipeline's shuffle and augmentation (NumPy) are the same on both.
"""

from __future__ import annotations

import numpy as np

from darekit import backend as B


def op_determinism() -> bool:
    """Whether the backend's ops were made deterministic in this process (TensorFlow: op
    determinism, process-wide and final; JAX: always on a CPU, on a GPU with XLA's flag)."""
    return B.op_determinism()


def xla_allowed(jit_compile: bool) -> bool:
    """``jit_compile``, unless TensorFlow's op determinism is on (TF 2.21 has no deterministic
    XLA max-pooling gradient, so deterministic runs attack and train without XLA); on JAX
    always ``True``."""
    return B.xla_allowed(jit_compile)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG; ``deterministic`` also makes the backend's ops deterministic (slower on
    TensorFlow; on JAX's GPU the flag must be set before JAX starts, ``B.deterministic_env``)."""
    B.set_seed(seed, deterministic)


def derive_words(seed: int, *keys: int, n: int = 1) -> np.ndarray:
    """``n`` uint32 words drawn from ``(seed, *keys)`` by NumPy's ``SeedSequence``: independent
    streams for every key (a chunk, an attack, a model) from one user seed, the same on every
    run and every backend."""
    return np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(n)


def derive_seed(seed: int, *keys: int) -> int:
    """One non-negative 31-bit seed derived from ``(seed, *keys)`` (``derive_words``' first
    word, halved so that any seed argument takes it)."""
    return int(derive_words(seed, *keys)[0] >> 1)
