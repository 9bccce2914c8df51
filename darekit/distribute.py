"""Data parallelism on one machine and mixed precision, for every ``fit`` of the package.

``distribution(devices, precision)`` says where and how a stage trains:

- ``devices=None`` (the default): every visible GPU when there are two or more (data-parallel:
  ``tf.distribute.MirroredStrategy`` on TensorFlow, ``keras.distribution.DataParallel`` on JAX,
  through ``darekit.backend.data_parallel``), otherwise no strategy (on the one GPU or the CPU);
- ``devices="GPU:0,GPU:1"`` (or ``"CPU:0,CPU:1"``, which tests use: logical devices on TF,
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` on JAX): those devices, data-parallel
  when there are two or more; a single named device runs without a strategy (placed there when
  it is not the backend's default device, e.g. ``GPU:1``).

On JAX, ``DataParallel`` shards each global batch over the devices and runs one SPMD program:
batch norm and random draws see the global batch without further work, and XLA stays on.

Under a strategy the batch-size options are the *global* batch: each replica computes the
gradient of ``batch / replicas`` examples, and the replicas' gradients are summed (each replica's
mean loss is scaled by ``1 / replicas``, so the update is the global batch's mean gradient, as on
one device). A stage builds, compiles and fits its model inside ``Distribution.scope()``.

``precision`` is a Keras dtype policy: ``float32`` (default), ``mixed_float16`` or
``mixed_bfloat16``: layers compute in 16 bits while their variables stay float32, and the
architectures' ``logits`` layer computes in float32 (``darekit.models.float32_logits``), so
logits, losses and the saved weights are float32 whatever the policy. With ``mixed_float16``,
``Model.compile`` wraps the optimizer in Keras' ``LossScaleOptimizer`` (dynamic loss scaling).

Limits (Keras 3.15 / TF 2.21):

- multi-worker training (``MultiWorkerMirroredStrategy``, several machines) does not work with
  Keras 3 (keras-team/keras#20585): only devices of this machine can be named;
- XLA (``jit_compile``) cannot compile a step that runs under ``MirroredStrategy`` (TF refuses to
  read one replica's variables from another's device), and Keras itself turns XLA off under a
  strategy by default: with more than one replica ``jit_compile`` is turned off, and the run says
  so (``Distribution.jit_compile``). On JAX every step is compiled (its eager mode is about 10x
  slower), with or without ``DataParallel``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras

from darekit import backend as B
from darekit.config import option
from darekit.errors import DareError
from darekit.models import copy_weights

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
"""The ``--precision`` choices: Keras dtype policies."""

DEVICES_HELP = (
    "devices to train on, comma-separated (e.g. GPU:0,GPU:1; logical CPU:0,CPU:1 in tests): "
    "two or more train data-parallel with tf.distribute.MirroredStrategy (TensorFlow) or "
    "keras.distribution.DataParallel (JAX), where the batch size "
    "is the global batch (each replica gets batch/replicas; it must divide evenly); one device "
    "runs without a strategy. One machine only: multi-worker training is broken with Keras 3 "
    "(keras-team/keras#20585)")
DEVICES_DEFAULT = "every visible GPU when there are 2 or more, else the one GPU or the CPU"
PRECISION_HELP = (
    "float32, or a Keras mixed-precision policy: mixed_float16 (GPUs; dynamic loss scaling) or "
    "mixed_bfloat16 (Ampere+ GPUs, TPUs, some CPUs); weights, logits and losses stay float32")
BATCH_HELP = "global batch size (split evenly across the replicas of --devices)"

_DEVICE_RE = re.compile(r"^(?:.*/)?(?:device:)?(cpu|gpu|tpu):(\d+)$", re.IGNORECASE)


def parse_devices(text: str | None) -> tuple[str, ...] | None:
    """``"gpu:0, /device:GPU:1"`` -> ``("GPU:0", "GPU:1")``; ``None`` or empty -> ``None``
    (automatic). Raises ``DareError`` on a malformed name, a repeated device or mixed types."""
    if text is None or not str(text).strip():
        return None
    names = []
    for part in str(text).split(","):
        m = _DEVICE_RE.match(part.strip())
        if not m:
            raise DareError(f"--devices: {part.strip()!r} is not a device name like GPU:0 or "
                            "CPU:1")
        names.append(f"{m.group(1).upper()}:{int(m.group(2))}")
    if len(set(names)) != len(names):
        raise DareError(f"--devices names a device twice: {','.join(names)}")
    if len({n.split(':')[0] for n in names}) > 1:
        raise DareError(f"--devices mixes device types: {','.join(names)}")
    return tuple(names)


def normalize_devices(text: str | None) -> str | None:
    """The canonical ``--devices`` string (``"GPU:0,GPU:1"``), or ``None`` for automatic."""
    names = parse_devices(text)
    return ",".join(names) if names else None


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DareError(f"--precision must be one of {list(PRECISIONS)}; received {precision!r}")
    return precision


def visible_devices(kind: str | None = None) -> list[str]:
    """Devices the backend sees, as ``TYPE:N`` names (``kind``: only ``"GPU"``...)."""
    return B.visible_devices(kind)


@dataclass(frozen=True)
class Distribution:
    """Where a stage trains (``strategy`` over ``devices``) and in which ``precision``."""

    strategy: Any  # tf.distribute.Strategy, keras.distribution.DataParallel, or None (JAX)
    devices: tuple[str, ...]
    precision: str
    placed: bool = False  # one explicitly named device: ops are placed on it

    @property
    def replicas(self) -> int:
        if self.strategy is None:
            return 1
        n = getattr(self.strategy, "num_replicas_in_sync", None)  # TF's strategies
        return int(n) if n is not None else len(self.devices)

    @property
    def strategy_name(self) -> str:
        return type(self.strategy).__name__ if self.replicas > 1 else "default"

    def per_replica_batch(self, global_batch: int) -> int:
        return global_batch // self.replicas

    def check_batch(self, global_batch: int, flag: str = "--batch-size") -> None:
        """Every replica gets the same share: ``global_batch`` must be a multiple of the
        replica count (an uneven split would weight the replicas' mean losses unequally)."""
        if global_batch % self.replicas:
            raise DareError(f"{flag} {global_batch} is the global batch and must be a multiple "
                            f"of the {self.replicas} replicas ({','.join(self.devices)})")

    def jit_compile(self, requested: bool) -> bool:
        """XLA as requested, except under a TF multi-replica strategy; always on JAX (see the
        module docstring)."""
        if B.name() == "jax":
            return True
        return bool(requested) and self.replicas == 1

    def describe(self, global_batch: int | None = None) -> dict[str, Any]:
        """What a run records in its config: strategy, replicas, devices, precision, batch."""
        d: dict[str, Any] = {"strategy": self.strategy_name, "replicas": self.replicas,
                             "devices": list(self.devices), "precision": self.precision}
        if global_batch is not None:
            d.update(global_batch_size=global_batch,
                     per_replica_batch_size=self.per_replica_batch(global_batch))
        return d

    def summary(self, global_batch: int | None = None) -> str:
        """One line for the logs."""
        where = (f"{self.strategy_name} over {','.join(self.devices)} ({self.replicas} replicas)"
                 if self.replicas > 1 else f"one device ({self.devices[0]}), no strategy")
        batch = "" if global_batch is None else (
            f", global batch {global_batch} = {self.per_replica_batch(global_batch)} per replica")
        return f"distribution: {where}{batch}; precision {self.precision}"

    @contextlib.contextmanager
    def scope(self) -> Iterator[Distribution]:
        """Build, compile and fit inside this: the strategy's scope, the dtype policy (models
        built here compute in ``precision``) and, for one named device, its placement. The
        previous global dtype policy is restored on exit."""
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.precision)
        try:
            with contextlib.ExitStack() as stack:
                if self.replicas > 1:
                    stack.enter_context(B.parallel_scope(self.strategy))
                elif self.placed:
                    stack.enter_context(B.device_scope(self.devices[0]))
                yield self
        finally:
            keras.config.set_dtype_policy(previous)


def distribution(devices: str | None = None, precision: str = "float32") -> Distribution:
    """The ``Distribution`` for a ``--devices`` value and a ``--precision`` (see the module
    docstring). Raises ``DareError`` when a named device is not visible."""
    check_precision(precision)
    names = parse_devices(devices)
    if names is None:
        gpus = visible_devices("GPU")
        if len(gpus) > 1:
            return Distribution(B.data_parallel(tuple(gpus)), tuple(gpus), precision)
        one = tuple(gpus or ["CPU:0"])[:1]
        return Distribution(B.default_strategy(), one, precision)
    visible = visible_devices()
    missing = [n for n in names if n not in visible]
    if missing:
        raise DareError(f"--devices: {','.join(missing)} not visible to the {B.name()} backend "
                        f"(visible: {','.join(visible)})")
    if len(names) == 1:
        # The backend's default device (the first GPU, else the CPU) needs no placement.
        default = (visible_devices("GPU") or ["CPU:0"])[0]
        return Distribution(B.default_strategy(), names, precision,
                            placed=names[0] != default)
    return Distribution(B.data_parallel(names), names, precision)


def model_scope(model: keras.Model) -> contextlib.AbstractContextManager:
    """The scope of the strategy ``model`` was built under, unless it is already the current
    one: compiling and fitting a model (or a model sharing its layers, like DARE's regression
    model) must happen under the strategy that created its variables. A no-op on JAX."""
    return B.model_scope(model)


def build_optimizer(model: keras.Model) -> None:
    """Create the compiled optimizer's variables (momentum, Adam moments, loss scale) now,
    inside the model's strategy scope, rather than lazily inside the first distributed step.

    Why: a stateful optimizer whose slots are first created inside a custom ``train_step``
    running under a strategy can fail with "You must feed a value for placeholder tensor"
    (keras-team/keras#23085). Keras' ``fit`` would build them at the same point with the same
    initial values, so this changes no number."""
    opt = model.optimizer
    if opt is not None and not opt.built:
        with model_scope(model):
            opt.build(model.trainable_variables)


def synchronize_batch_norm(model: keras.Model, on: bool = True) -> int:
    """Make every ``BatchNormalization`` layer of ``model`` normalise with the statistics of the
    global batch (an all-reduce per layer and step) rather than its replica's share, so a
    multi-replica step computes what the single-device step computes. Returns how many layers.
    The attribute is read when the step is traced; it does not change the weights file.

    TensorFlow only: under JAX's ``DataParallel`` the step is one SPMD program whose batch
    statistics are those of the global batch already (and Keras refuses the attribute there),
    so nothing is changed and 0 returned."""
    if B.name() != "tensorflow":
        return 0
    n = 0
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on
            n += 1
        elif isinstance(layer, keras.Model):  # a nested model
            stack.extend(layer.layers)
    return n


def replica_rows(x: Any) -> tuple[Any, Any] | None:
    """``(offset, total)``: where this replica's rows of a batch ``x`` lie in the global batch,
    or ``None`` outside a multi-replica step. Lets a replica draw its slice of a random tensor
    of the global batch's shape, so random draws do not depend on the replica count (the
    strategy splits a global batch into consecutive slices, in replica order). TensorFlow
    only: on JAX a step is one SPMD program over the global batch, so this is ``None``."""
    return B.replica_rows(x)


def plain_copy(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """A float32 copy of ``model`` by ``build()`` (called outside any strategy scope): what a
    stage saves (a standalone ``.keras`` export then records no mixed policy, no strategy) and
    hands back to its caller. The weights are the same: variables are float32 under every
    policy."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        plain = build()
    finally:
        keras.config.set_dtype_policy(previous)
    return copy_weights(model, plain)


# ---------------------------------------------------------------------------- the options
# Every config that fits a model (TrainConfig, DareConfig, FinetuneConfig) declares these three
# fields, defined here once: the same help, default, choices and parsing everywhere.
def devices_option() -> Any:
    """The ``devices`` field of a config (``--devices``; ``None``: ``DEVICES_DEFAULT``)."""
    return option(None, DEVICES_HELP, default_text=DEVICES_DEFAULT, parse=normalize_devices)


def precision_option() -> Any:
    """The ``precision`` field of a config (``--precision``, one of ``PRECISIONS``)."""
    return option("float32", PRECISION_HELP, choices=PRECISIONS)


def tensorboard_option(folder: str = "<model name>") -> Any:
    """The ``tensorboard`` flag of a config: logs go to ``<run-dir>/tensorboard/<folder>/``."""
    return option(False, f"write TensorBoard logs into <run-dir>/tensorboard/{folder}/")


def check_options(cfg: Any) -> None:
    """In a frozen config's ``__post_init__``: check ``cfg.precision`` and normalise
    ``cfg.devices`` in place."""
    check_precision(cfg.precision)
    object.__setattr__(cfg, "devices", normalize_devices(cfg.devices))
