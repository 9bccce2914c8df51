"""The TensorFlow side of the seam (see ``darekit.backend``)."""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

_DEVICE_RE = re.compile(r"^(?:.*/)?(?:device:)?(cpu|gpu|tpu):(\d+)$", re.IGNORECASE)


def jit(fn, *, jit_compile=True):
    # reduce_retracing: one trace serves every batch size (bisections shrink their sets).
    return tf.function(fn, jit_compile=bool(jit_compile), reduce_retracing=True)


def value_and_grad(fn):
    def g(x, *args):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            v = fn(x, *args)
        return v, tape.gradient(v, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return g


def value_and_grad_aux(fn):
    def g(x, *args):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            v, aux = fn(x, *args)
        return (v, aux), tape.gradient(v, x,
                                       unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return g


def stateless_uniform(shape, seed, minval, maxval):
    return tf.random.stateless_uniform(shape, tf.cast(seed, tf.int64), minval, maxval,
                                       dtype=tf.float32)


def seed_array(*parts):
    return tf.constant([int(p) for p in parts], tf.int64)


def enable_determinism():
    tf.config.experimental.enable_op_determinism()


def op_determinism():
    from tensorflow.python.framework import config  # no public getter in TF 2.21

    return bool(config.is_op_determinism_enabled())


def xla_allowed(jit_compile):
    # TF 2.21 refuses to compile max-pooling gradients deterministically with XLA ("MaxPool
    # gradient ops do not yet have a deterministic XLA implementation", on the CPU too).
    return bool(jit_compile) and not op_determinism()


def visible_devices(kind=None):
    out = []
    for d in tf.config.list_logical_devices(kind):
        m = _DEVICE_RE.match(d.name)
        if m:
            out.append(f"{m.group(1).upper()}:{int(m.group(2))}")
    return out


def versions():
    return {"tensorflow": tf.__version__}


def foolbox_model(model, bounds):
    import foolbox as fb

    return fb.TensorFlowModel(model, bounds=bounds)


def foolbox_tensors(x, y):
    # Foolbox 3 under NumPy 2 needs tensors (eagerpy's NumPy path breaks), labels int64.
    return (tf.convert_to_tensor(np.asarray(x, np.float32)),
            tf.convert_to_tensor(np.asarray(y).astype(np.int64)))


def seed_foolbox(seed):
    tf.random.set_seed(int(seed))


# ---------------------------------------------------------------------------- data parallel
_STRATEGIES: dict = {}


def data_parallel(devices):
    # One MirroredStrategy per device set and process: a strategy sets up its collective ops
    # once, and models built under one must be trained under the same object.
    devices = tuple(devices)
    if devices not in _STRATEGIES:
        _STRATEGIES[devices] = tf.distribute.MirroredStrategy([f"/{d}" for d in devices])
    return _STRATEGIES[devices]


def default_strategy():
    return tf.distribute.get_strategy()


def parallel_scope(strategy):
    import contextlib

    current = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    return contextlib.nullcontext() if current is strategy else strategy.scope()


def device_scope(device):
    return tf.device(f"/{device}")


def model_scope(model):
    import contextlib

    strategy = model.distribute_strategy  # the current one when the model recorded none
    if strategy is tf.distribute.get_strategy():
        return contextlib.nullcontext()
    return strategy.scope()


def replica_rows(x):
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    sizes = ctx.all_gather(tf.shape(x, out_type=tf.int64)[:1], axis=0)
    rid = ctx.replica_id_in_sync_group
    offset = tf.reduce_sum(sizes[:rid])
    return offset, tf.reduce_sum(sizes)


def fit_input(batches, count):
    # A finite tf.data pipeline over the host's batches. Under MirroredStrategy tf.data calls
    # the generator function more than once: each call must start the batches afresh (Keras'
    # own generator adapter shares one Python iterator between the calls, and a two-replica
    # run then trained on batches out of order: measured, loss 2.99 vs 2.75 on one device).
    # ``batches`` is therefore an iterable that restarts, not an iterator.
    first = next(iter(batches))
    spec = tuple(tf.TensorSpec((None, *np.shape(a)[1:]), tf.as_dtype(np.asarray(a).dtype))
                 for a in first)
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=spec)
    return ds.apply(tf.data.experimental.assert_cardinality(int(count))).prefetch(2)
