"""The one place that knows which Keras backend runs: TensorFlow (the default) or JAX.

Every other module computes with ``keras.ops`` and calls this seam for what Keras does not
abstract: compiling a function, the gradient of a loss with respect to the *input*, stateless
random draws, seeding and determinism, the devices, and Foolbox's model wrapper. Nothing outside
``darekit/backend/`` imports TensorFlow or JAX.

The pattern for a compiled function over a model (works on both backends)::

    from darekit import backend as B

    def fgsm_dir(call, x, y):                     # call(x) -> logits, pure
        loss = lambda x: keras.ops.sum(B.sparse_ce(y, call(x)))
        return keras.ops.sign(B.grad(loss)(x))

    f = B.model_function(model, fgsm_dir)        # compiled once, weights passed per call
    d = f(x, y)                                   # reads the model's *current* weights

JAX traces a function once per input shape and would keep the weights it closed over; a model
function therefore takes the weights as arguments (``B.model_state(model)`` on every call), so
loading other weights into the same model never needs a recompile. Pad batches to a few sizes
(``pad_to_bucket``): every new shape compiles again on JAX (and with XLA on TensorFlow).

Choosing the backend: ``KERAS_BACKEND`` or a script's ``--backend`` flag, read by
``select(name)`` before Keras is imported (``darekit.cli`` does this).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from darekit.errors import DareError

BACKENDS = ("tensorflow", "jax")
"""The Keras backends darekit runs on."""

BACKEND_HELP = ("Keras backend: tensorflow (default) or jax; read before Keras is imported "
                "(default: $KERAS_BACKEND, else tensorflow)")

_MODULES = {"tensorflow": "darekit.backend._tf", "jax": "darekit.backend._jax"}


# ---------------------------------------------------------------------------- choosing
def select(name: str | None) -> str:
    """Make ``name`` (or ``$KERAS_BACKEND``, else TensorFlow) the backend of this process.

    Must run before Keras is imported; if Keras is already loaded with another backend this is
    a ``DareError`` (the backend cannot change inside a process). Returns the backend's name.
    """
    want = name or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if want not in BACKENDS:
        raise DareError(f"--backend must be one of {list(BACKENDS)}; received {want!r}")
    if "keras" in sys.modules:
        have = sys.modules["keras"].backend.backend()
        if have != want:
            raise DareError(f"Keras is already loaded with the {have} backend; cannot switch to "
                            f"{want} in this process (set KERAS_BACKEND={want} before starting "
                            "Python)")
        return want
    os.environ["KERAS_BACKEND"] = want
    return want


def name() -> str:
    """The running Keras backend: ``"tensorflow"`` or ``"jax"``."""
    import keras

    b = keras.backend.backend()
    if b not in BACKENDS:
        raise DareError(f"darekit runs on the tensorflow or jax backend of Keras; this process "
                        f"uses {b!r} (set KERAS_BACKEND)")
    return b


def _impl():
    return importlib.import_module(_MODULES[name()])


# ---------------------------------------------------------------------------- compiling
def jit(fn: Callable, *, jit_compile: bool = True) -> Callable:
    """``fn`` compiled: ``tf.function`` (XLA when ``jit_compile``; one trace serves every batch
    size) on TensorFlow, ``jax.jit`` on JAX (always XLA; ``jit_compile`` is ignored, JAX's eager
    mode is about 10x slower). Arguments are arrays or (nested lists of) arrays."""
    return _impl().jit(fn, jit_compile=jit_compile)


def model_state(model) -> tuple[list, list]:
    """``(trainable_values, non_trainable_values)`` of ``model``: the weights to pass to a
    function built by ``model_function`` (read at each call, so they are always current)."""
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


def stateless_logits(model, state: tuple[list, list], x: Any, training: bool = False) -> Any:
    """``model(x)`` as a pure function of the weights ``state`` (``model_state``)."""
    out, _ = model.stateless_call(state[0], state[1], x, training=training)
    return out


def model_function(model, fn: Callable[..., Any], *, jit_compile: bool = True) -> Callable:
    """``fn(call, *args)`` compiled, where ``call(x) -> logits`` is ``model`` in inference mode
    as a pure function. Returns ``f(*args)`` that passes the model's current weights on each
    call (a JAX function must not close over them, see the module docstring)."""
    def pure(state, *args):
        return fn(lambda x: stateless_logits(model, state, x), *args)

    compiled = jit(pure, jit_compile=jit_compile)
    return lambda *args: compiled(model_state(model), *args)


def value_and_grad(fn: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """``fn(x, *args) -> scalar`` to ``g(x, *args) -> (fn(x, *args), d fn / d x)``, for use
    inside a compiled function. An ``x`` the value does not depend on gets a zero gradient."""
    return _impl().value_and_grad(fn)


def value_and_grad_aux(fn: Callable[..., Any]) -> Callable[..., tuple[tuple[Any, Any], Any]]:
    """``fn(x, *args) -> (scalar, aux)`` to ``g(x, *args) -> ((scalar, aux), d scalar / d x)``:
    ``value_and_grad`` that also returns what the same forward pass computed (``aux``, any
    nested arrays; no gradient flows through it), so a step needs one model pass, not two."""
    return _impl().value_and_grad_aux(fn)


def grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``d fn(x, *args) / d x`` (see ``value_and_grad``)."""
    vg = value_and_grad(fn)
    return lambda *a: vg(*a)[1]


def stop_gradient(x: Any) -> Any:
    import keras

    return keras.ops.stop_gradient(x)


def stateless_uniform(shape: Any, seed: Any, minval: float = 0.0, maxval: float = 1.0) -> Any:
    """Uniform float32 draws in ``[minval, maxval)`` determined by ``seed`` ``(2,)`` integers
    alone (usable inside compiled functions). TensorFlow's and JAX's draws differ for a seed."""
    return _impl().stateless_uniform(shape, seed, minval, maxval)


def seed_array(*parts: int) -> Any:
    """A ``(2,)`` seed for ``stateless_uniform``, as the backend's integer tensor."""
    return _impl().seed_array(*parts)


# ---------------------------------------------------------------------------- losses
def sparse_ce(y: Any, logits: Any) -> Any:
    """Per-example softmax cross-entropy ``(B,)`` of integer labels ``y`` and ``logits``."""
    import keras

    return keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True)


def margin(logits: Any, y: Any) -> Any:
    """``z_y - max_{j != y} z_j`` per input ``(B,)``: negative when misclassified."""
    from keras import ops

    k = ops.shape(logits)[-1]
    onehot = ops.one_hot(ops.cast(y, "int32"), k, dtype=logits.dtype)
    true = ops.sum(logits * onehot, axis=-1)
    other = ops.max(ops.where(onehot > 0, ops.cast(-np.inf, logits.dtype), logits), axis=-1)
    return true - other


# ---------------------------------------------------------------------------- seeds
def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and the backend; ``deterministic`` also makes its ops deterministic
    (TensorFlow: op determinism; JAX: ``--xla_gpu_deterministic_ops``, which must be set before
    JAX starts, so it is set by ``select``/``deterministic_env`` when asked on the command
    line; on a CPU, JAX is deterministic already)."""
    import keras

    keras.utils.set_random_seed(int(seed))
    if deterministic:
        _impl().enable_determinism()


def op_determinism() -> bool:
    """Whether the backend's ops were made deterministic in this process."""
    return _impl().op_determinism()


def xla_allowed(jit_compile: bool) -> bool:
    """``jit_compile``, unless TensorFlow's op determinism is on (TF 2.21 has no deterministic
    XLA max-pool gradient); on JAX always ``True``: XLA is how JAX runs."""
    return _impl().xla_allowed(jit_compile)


XLA_DETERMINISTIC = "--xla_gpu_deterministic_ops=true"


def deterministic_env(environ: dict | None = None) -> None:
    """Add JAX's GPU determinism flag to ``XLA_FLAGS`` (must happen before JAX starts: call it
    before Keras is imported). Harmless on TensorFlow and on a CPU."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if XLA_DETERMINISTIC not in flags:
        env["XLA_FLAGS"] = (flags + " " + XLA_DETERMINISTIC).strip()


# ---------------------------------------------------------------------------- devices
def visible_devices(kind: str | None = None) -> list[str]:
    """The devices the backend sees, as ``TYPE:N`` (``kind``: only ``"GPU"``, ``"CPU"``...)."""
    return _impl().visible_devices(kind)


def data_parallel(devices: tuple[str, ...]) -> Any:
    """The data-parallel strategy over ``devices`` (``TYPE:N`` names, two or more):
    ``tf.distribute.MirroredStrategy`` (one per device set and process) on TensorFlow,
    ``keras.distribution.DataParallel`` on JAX."""
    return _impl().data_parallel(tuple(devices))


def default_strategy() -> Any:
    """TensorFlow's default (no-op) strategy; ``None`` on JAX."""
    return _impl().default_strategy()


def parallel_scope(strategy: Any) -> Any:
    """A context manager under which models are built, compiled and fitted data-parallel by
    ``strategy`` (``data_parallel``); a no-op when it is already the current one on TF."""
    return _impl().parallel_scope(strategy)


def device_scope(device: str) -> Any:
    """A context manager placing new variables and ops on one ``TYPE:N`` device."""
    return _impl().device_scope(device)


def model_scope(model) -> Any:
    """The scope of the strategy ``model`` was built under, unless it is the current one (on
    TF, compiling and fitting must happen under the strategy that created the variables); a
    no-op on JAX."""
    return _impl().model_scope(model)


def replica_rows(x: Any) -> tuple[Any, Any] | None:
    """Inside a TF multi-replica step: ``(offset, total)`` of this replica's rows of a batch
    ``x`` in the global batch; ``None`` elsewhere and always on JAX (SPMD steps see the global
    batch)."""
    return _impl().replica_rows(x)


def fit_input(batches: Any, count: int) -> Any:
    """What ``model.fit`` takes for ``batches``, an iterable of ``count`` host batches (tuples
    of NumPy arrays) that starts afresh at each ``iter``: a finite ``tf.data.Dataset`` on
    TensorFlow (under ``MirroredStrategy`` tf.data calls its generator more than once, which
    breaks Keras' adapter of a Python iterator), an iterator on JAX."""
    return _impl().fit_input(batches, count)


# ---------------------------------------------------------------------------- records
def versions() -> dict[str, str]:
    """``{"backend": name, <backend package>: version, ...}``: what a run records."""
    return {"backend": name(), **_impl().versions()}


def to_numpy(x: Any) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(x)


# ---------------------------------------------------------------------------- Foolbox
def foolbox_model(fn_or_model: Any, bounds: tuple[float, float] = (0.0, 1.0)):
    """Foolbox's model wrapper of the backend around ``model`` (inference mode):
    ``TensorFlowModel`` or ``JAXModel`` (a pure function of the current weights)."""
    return _impl().foolbox_model(fn_or_model, bounds)


def foolbox_tensors(x: np.ndarray, y: np.ndarray):
    """``x`` (float32) and ``y`` as the tensors Foolbox wants on this backend."""
    return _impl().foolbox_tensors(x, y)


def seed_foolbox(seed: int) -> None:
    """Seed the RNG that Foolbox's random starts draw from (TensorFlow's global generator, or
    eagerpy's class-level JAX key)."""
    _impl().seed_foolbox(seed)


# ---------------------------------------------------------------------------- shapes
BUCKETS = (32, 64, 128, 256, 512, 1024)
"""Batch sizes compiled functions see: every new shape compiles again under XLA."""


FINE_BUCKETS = (1, 2, 4, 8, 16, *BUCKETS)
"""``BUCKETS`` with powers of two below them, for calls whose batches shrink to a few rows
(ddmin's last rounds): five more compilations of a forward pass, against padding 3 rows to 32
on each of a hundred rounds (a VGG's forward pass costs about linearly in rows on a CPU)."""


def bucket(n: int, batch_size: int, *, fine: bool = False) -> int:
    """The padded size of a batch of ``n`` rows (at most ``max(batch_size, n)``), among
    ``FINE_BUCKETS`` if ``fine`` else ``BUCKETS``."""
    sizes = FINE_BUCKETS if fine else BUCKETS
    return min(next((b for b in sizes if b >= n), n), max(batch_size, n))


def pad_rows(a: np.ndarray, m: int) -> np.ndarray:
    """``a`` with its first row repeated up to ``m`` rows (valid inputs, results dropped)."""
    return a if len(a) == m else np.concatenate([a, np.repeat(a[:1], m - len(a), axis=0)])


def needs_buckets(jit_compile: bool) -> bool:
    """Whether batches should be padded to ``BUCKETS``: always on JAX, with XLA on TF."""
    return name() == "jax" or bool(jit_compile)
