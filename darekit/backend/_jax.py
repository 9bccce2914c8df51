"""The JAX side of the seam (see ``darekit.backend``)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def jit(fn, *, jit_compile=True):
    del jit_compile  # JAX always compiles; its eager mode is about 10x slower
    return jax.jit(fn)


def value_and_grad(fn):
    return jax.value_and_grad(fn)


def value_and_grad_aux(fn):
    return jax.value_and_grad(fn, has_aux=True)


def stateless_uniform(shape, seed, minval, maxval):
    seed = jnp.asarray(seed, jnp.uint32)
    key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
    return jax.random.uniform(key, tuple(shape), jnp.float32, minval, maxval)


def seed_array(*parts):
    return jnp.asarray([int(p) % 2**32 for p in parts], jnp.uint32)


_FLAG = "--xla_gpu_deterministic_ops=true"


def enable_determinism():
    # XLA reads XLA_FLAGS when its backends start: setting it here is effective only if no
    # computation ran yet; the scripts set it before Keras is imported (backend.deterministic_env).
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + _FLAG).strip()


def op_determinism():
    # CPU XLA kernels are deterministic; on a GPU only with the flag set before start.
    return _FLAG in os.environ.get("XLA_FLAGS", "") or jax.default_backend() == "cpu"


def xla_allowed(jit_compile):
    return True


def visible_devices(kind=None):
    out = []
    for d in jax.devices():
        t = "GPU" if d.platform in ("gpu", "cuda", "rocm") else d.platform.upper()
        if kind is None or t == kind.upper():
            out.append(f"{t}:{d.id}")
    return out


def versions():
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "jax_devices": ",".join(visible_devices())}


def foolbox_model(model, bounds):
    import foolbox as fb

    from darekit.backend import model_state, stateless_logits

    if not hasattr(model, "stateless_call"):  # already a pure function x -> logits
        return fb.JAXModel(model, bounds=bounds)
    # Foolbox differentiates fn with jax.grad: a pure function of the current weights (read
    # at every call, so weights loaded later are seen).
    return fb.JAXModel(lambda x: stateless_logits(model, model_state(model), x), bounds=bounds)


def foolbox_tensors(x, y):
    return jnp.asarray(np.asarray(x, np.float32)), jnp.asarray(np.asarray(y).astype(np.int32))


def seed_foolbox(seed):
    # Foolbox's random starts draw from eagerpy's class-level key.
    from eagerpy.tensor.jax import JAXTensor

    JAXTensor.key = jax.random.PRNGKey(int(seed))


# ---------------------------------------------------------------------------- data parallel
def _keras_device(name):
    kind, i = name.split(":")
    return f"{'gpu' if kind.upper() == 'GPU' else kind.lower()}:{int(i)}"


def data_parallel(devices):
    import keras

    return keras.distribution.DataParallel(devices=[_keras_device(d) for d in devices])


def default_strategy():
    return None


def parallel_scope(strategy):
    return strategy.scope()


def device_scope(device):
    kind, i = device.split(":")
    for d in jax.devices():
        t = "GPU" if d.platform in ("gpu", "cuda", "rocm") else d.platform.upper()
        if t == kind.upper() and d.id == int(i):
            return jax.default_device(d)
    raise ValueError(f"no JAX device {device}")


def model_scope(model):
    import contextlib

    # Under JAX, variables carry their layout from creation; fit reads the current
    # keras.distribution, which the stage's Distribution.scope() sets.
    return contextlib.nullcontext()


def replica_rows(x):
    return None  # SPMD: a step sees the global batch, its random draws are global


def fit_input(batches, count):
    del count  # fit is given steps_per_epoch
    return iter(batches)  # Keras' generator adapter: NumPy batches, moved to the device(s)
