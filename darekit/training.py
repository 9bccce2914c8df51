"""Training with a saved history: the weights after every epoch, atomically, resumable.

``train(cfg)`` is the whole of ``train/train.py`` and ``train/alexnet.py``. It uses plain
``model.fit`` with one callback, so its speed is Keras' own (see ``bench/bench_train.py``).
``--devices`` and ``--precision`` (``darekit.distribute``) train data-parallel over several
devices of this machine and in mixed precision; the history files are the same either way
(float32 layer weights, loadable without a strategy).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from darekit import backend as B
from darekit import distribute, io, layout, rundir
from darekit.config import by_architecture, option
from darekit.data import DATASETS, Split, balanced_subset, dataset_spec, load_dataset, make_split
from darekit.errors import DareError
from darekit.models import ARCHITECTURES, get_architecture
from darekit.models.common import channel_stats
from darekit.paths import default_run_dir, mark_latest
from darekit.rundir import Run, RunData
from darekit.seeding import set_seed, xla_allowed

AUGMENTATIONS = ("none", "crop", "crop-flip")
HOLDOUTS = ("test", "validation")


@dataclass(frozen=True)
class TrainConfig:
    """Every training option. Field defaults are generic; ``resolve`` applies the
    architecture's ``train_defaults`` (the schedules that reach the paper's accuracy)."""

    model: str = option("vgg16", "architecture", choices=lambda: sorted(ARCHITECTURES))
    dataset: str = option("cifar10", "dataset", choices=lambda: sorted(DATASETS))
    epochs: int = option(200, "number of epochs", default_text=by_architecture("epochs"))
    batch_size: int = option(128, distribute.BATCH_HELP,
                             default_text=by_architecture("batch_size"))
    optimizer: str = option("sgd", "optimizer", choices=lambda: list(OPTIMIZERS),
                            default_text=by_architecture("optimizer"))
    lr: float = option(0.05, "initial learning rate", default_text=by_architecture("lr"))
    momentum: float = option(0.9, "SGD momentum", default_text=by_architecture("momentum"))
    nesterov: bool = option(True, "Nesterov momentum", default_text=by_architecture("nesterov"))
    weight_decay: float = option(5e-4, "weight decay",
                                 default_text=by_architecture("weight_decay"))
    schedule: str = option("step", "learning-rate schedule", choices=lambda: list(SCHEDULES),
                           default_text=by_architecture("schedule"))
    milestones: tuple[int, ...] = option((60, 120, 160), "epochs where a step schedule "
                                         "decays, comma-separated",
                                         default_text=by_architecture("milestones"))
    gamma: float = option(0.2, "lr multiplier at each milestone",
                          default_text=by_architecture("gamma"))
    warmup_epochs: int = option(0, "linear lr warm-up epochs",
                                default_text=by_architecture("warmup_epochs"))
    augment: str = option("crop-flip", "data augmentation (pad-4 random crop, horizontal "
                          "flip; datasets where flips change the meaning, SVHN, drop the flip)",
                          choices=AUGMENTATIONS, default_text=by_architecture("augment"))
    seed: int = option(0, "the run's one seed: split, initialisation, batches, augmentation")
    subset: int | None = option(None, "use a seeded class-balanced subset of N training "
                                "images before the 50/50 split (quick runs)",
                                default_text="the whole training set")
    test_subset: int | None = option(None, "evaluate each epoch on a class-balanced subset "
                                     "of N test images", default_text="all test images")
    holdout: str = option("test", "held-out set logged after every epoch", choices=HOLDOUTS)
    jit_compile: bool = option(False, "compile the train step with XLA (one device only: "
                               "turned off under a multi-device strategy)")
    deterministic: bool = option(False, "deterministic TF ops: the same seed repeats bit "
                                 "for bit (slower)")
    devices: str | None = distribute.devices_option()
    precision: str = distribute.precision_option()
    tensorboard: bool = distribute.tensorboard_option("train")
    run_dir: str | None = option(None, "run directory",
                                 default_text="runs/<dataset>-<model>-s<seed>")
    resume: bool = option(False, "continue the run in --run-dir from its last complete epoch")
    verbose: int = option(1, "Keras progress output", choices=(0, 1, 2))

    def __post_init__(self) -> None:
        get_architecture(self.model)  # raises on an unknown name
        distribute.check_options(self)
        dataset_spec(self.dataset)  # raises on an unknown name
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise DareError(f"--{name.replace('_', '-')} must be a positive integer; "
                                f"received {getattr(self, name)}")
        if not self.lr > 0:
            raise DareError(f"--lr must be positive; received {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise DareError("--weight-decay must be >= 0 and --momentum in [0, 1); "
                            f"received {self.weight_decay}, {self.momentum}")
        if not 0 < self.gamma <= 1:
            raise DareError(f"--gamma must lie in (0, 1]; received {self.gamma}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("augment", AUGMENTATIONS), ("holdout", HOLDOUTS)):
            if getattr(self, name) not in allowed:
                raise DareError(f"--{name} must be one of {list(allowed)}; "
                                f"received {getattr(self, name)!r}")
        if self.subset is not None and self.subset < 20:
            raise DareError(f"--subset must be at least 20 images; received {self.subset}")
        if self.test_subset is not None and self.test_subset < 10:
            raise DareError("--test-subset must be at least 10 images; "
                            f"received {self.test_subset}")
        if self.warmup_epochs < 0 or any(m < 1 for m in self.milestones):
            raise DareError("--warmup-epochs must be >= 0 and --milestones positive epochs")

    @classmethod
    def resolve(cls, model: str, dataset: str, **given: Any) -> TrainConfig:
        """Defaults < the architecture's ``train_defaults`` < given options (``None``: unset)."""
        arch = get_architecture(model)
        values: dict[str, Any] = dict(arch.train_defaults)
        if "flip" in values.get("augment", cls.augment) and not dataset_spec(dataset).flip_safe:
            values["augment"] = "crop"
        values.update({k: v for k, v in given.items() if v is not None})
        if "milestones" in values:
            values["milestones"] = tuple(int(m) for m in values["milestones"])
        return cls(model=model, dataset=dataset, **values)

    @classmethod
    def from_options(cls, given: dict[str, Any]) -> TrainConfig:
        """The config for a command line: ``given`` holds the options the user typed.

        With ``resume`` and an existing run, the saved config is the base, so
        ``--resume --run-dir R`` alone continues ``R`` as it was started.
        """
        given = {k: v for k, v in given.items() if v is not None}
        path = given.get("run_dir")
        saved_file = Path(path) / layout.CONFIG if path else None
        if given.get("resume") and saved_file is not None and saved_file.is_file():
            saved = io.read_json(saved_file)["train"]
            names = {f.name for f in dataclasses.fields(cls)}
            base = {k: v for k, v in saved.items() if k in names}
            clash = [f"--{k.replace('_', '-')} {given[k]!r} (run has {base.get(k)!r})"
                     for k in IDENTITY if k in given and given[k] != base.get(k)]
            if clash:
                raise DareError(f"--resume cannot change the run at {path}: " + ", ".join(clash))
            base.update(given)
            base["milestones"] = tuple(base.get("milestones", ()))
            return cls(**base)
        return cls.resolve(given.pop("model", cls.model), given.pop("dataset", cls.dataset),
                           **given)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


# ---------------------------------------------------------------------------- registries
OPTIMIZERS: dict[str, Callable[[TrainConfig], keras.optimizers.Optimizer]] = {
    "sgd": lambda c: keras.optimizers.SGD(c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                          weight_decay=c.weight_decay or None),
    "adam": lambda c: keras.optimizers.Adam(c.lr, weight_decay=c.weight_decay or None),
}


def _step(c: TrainConfig, epoch: int) -> float:
    return c.lr * c.gamma ** sum(epoch >= m for m in c.milestones)


def _cosine(c: TrainConfig, epoch: int) -> float:
    return 0.5 * c.lr * (1 + math.cos(math.pi * epoch / c.epochs))


SCHEDULES: dict[str, Callable[[TrainConfig, int], float]] = {
    "constant": lambda c, epoch: c.lr,
    "step": _step,      # lr * gamma ** (number of milestones reached), milestones in epochs
    "cosine": _cosine,  # half cosine from lr to 0 over the run
}


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for the 0-based ``epoch``, with a linear warm-up over ``warmup_epochs``."""
    lr = SCHEDULES[cfg.schedule](cfg, epoch)
    if epoch < cfg.warmup_epochs:
        lr *= (epoch + 1) / (cfg.warmup_epochs + 1)
    return float(lr)


# ---------------------------------------------------------------------------- input pipeline
PAD = 4
"""Pixels of zero padding around an image before its random crop back to the image's size."""


def epoch_draws(seed: int, epoch: int, n: int, pad: int = PAD
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epoch ``epoch``'s order of the ``n`` training images and each image's augmentation:
    ``(order, dy, dx, flip)``, ``order`` a permutation, and ``dy[i]``, ``dx[i]`` (crop offsets in
    ``[0, 2 * pad]``) and ``flip[i]`` those of image ``i`` (its index in ``x``, not its place in
    the order). Drawn from NumPy's generator seeded with ``(seed, epoch)`` alone: the same on
    every backend, device count and batch size, and after a resume."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(n)
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = rng.integers(0, 2, n).astype(bool)
    return order, dy, dx, flip


def crop_flip(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray | None,
              pad: int = PAD) -> np.ndarray:
    """Images ``x`` ``(B, H, W, C)`` zero-padded by ``pad``, cropped back to ``H x W`` at
    offsets ``(dy, dx)`` ``(B,)``, and mirrored left-right where ``flip`` ``(B,)``: one fancy
    index over the batch (no per-image Python)."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = dy[:, None] + np.arange(h)                      # (B, H)
    cols = dx[:, None] + np.arange(w)                      # (B, W)
    if flip is not None:
        cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class TrainBatches:
    """The training batches of epochs ``initial_epoch..epochs-1``, as NumPy arrays.

    Batch ``s`` of epoch ``e`` is a pure function of ``(seed, e, s)`` (``epoch_draws``): a
    resumed run sees exactly the batches the uninterrupted run would have seen, on either
    backend. Every image is used once per epoch; the last batch of an epoch holds the
    remainder (``n % batch_size`` images; on JAX one more compile), cut to a multiple of
    ``multiple`` (the devices of JAX's ``DataParallel``, which shards evenly). Iterating prepares
    batches ahead on ``workers`` threads (NumPy's indexing runs outside the GIL), in order;
    each ``iter`` starts afresh from ``initial_epoch`` (``B.fit_input`` relies on it). The
    batches are global batches (a strategy splits each between its replicas).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, seed: int, batch_size: int,
                 augment: str, epochs: int, initial_epoch: int = 0,
                 workers: int | None = None, multiple: int = 1):
        if augment not in AUGMENTATIONS:
            raise DareError(f"augment must be one of {list(AUGMENTATIONS)}; received {augment!r}")
        self.x, self.y = x, y
        self.seed, self.batch_size, self.augment = int(seed), int(batch_size), augment
        self.epochs, self.initial_epoch = int(epochs), int(initial_epoch)
        # JAX shards a batch evenly over DataParallel's devices: the last batch is cut to a
        # multiple of ``multiple`` (at most multiple - 1 images an epoch, other ones each epoch).
        self.n = len(x) - (len(x) % self.batch_size) % max(1, int(multiple))
        self.steps = math.ceil(self.n / self.batch_size)
        self.workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
        self._draws: dict[int, tuple[np.ndarray, ...]] = {}
        self._lock = threading.Lock()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, ...]:
        with self._lock:  # one draw per epoch, shared by the worker threads
            if epoch not in self._draws:
                self._draws = {e: d for e, d in self._draws.items() if e >= epoch - 1}
                self._draws[epoch] = epoch_draws(self.seed, epoch, len(self.x))
            return self._draws[epoch]

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``step`` (0-based) of the 0-based ``epoch``: ``(x, y)``."""
        order, dy, dx, flip = self._epoch(epoch)
        i = order[step * self.batch_size:min((step + 1) * self.batch_size, self.n)]
        xb = self.x[i]
        if self.augment != "none":
            xb = crop_flip(xb, dy[i], dx[i], flip[i] if self.augment == "crop-flip" else None)
        return xb, self.y[i]

    def __len__(self) -> int:
        return self.steps * max(0, self.epochs - self.initial_epoch)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        jobs = ((e, s) for e in range(self.initial_epoch, self.epochs)
                for s in range(self.steps))
        ahead = 2 * self.workers
        with ThreadPoolExecutor(self.workers, thread_name_prefix="darekit-batches") as pool:
            pending: collections.deque = collections.deque(
                pool.submit(self.batch, *job) for job in itertools.islice(jobs, ahead))
            try:
                while pending:
                    out = pending.popleft().result()
                    job = next(jobs, None)
                    if job is not None:
                        pending.append(pool.submit(self.batch, *job))
                    yield out
            finally:  # stopped early (interrupt, end of fit): drop what was prepared
                for f in pending:
                    f.cancel()


def train_dataset(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, initial_epoch: int,
                  multiple: int = 1) -> tuple[TrainBatches, int]:
    """``cfg``'s batches for epochs ``initial_epoch..epochs-1`` (``TrainBatches``) and the
    number of steps per epoch."""
    batches = TrainBatches(x, y, seed=cfg.seed, batch_size=cfg.batch_size, augment=cfg.augment,
                           epochs=cfg.epochs, initial_epoch=initial_epoch, multiple=multiple)
    return batches, batches.steps


# ---------------------------------------------------------------------------- checkpoints
class EpochHistory(keras.callbacks.Callback):
    """After every epoch: weights into ``history/``, optimizer state, log row, then progress.

    Progress is written last, so a kill at any point leaves the previous epoch as the last
    complete one; every file is replaced atomically, so none is ever half-written.
    """

    def __init__(self, run: Run, cfg: TrainConfig, log_rows: list[dict[str, Any]]):
        super().__init__()
        self.run, self.cfg, self.rows = run, cfg, log_rows
        self._t0 = time.perf_counter()

    def on_train_begin(self, logs=None):
        self._view = rundir.weights_view(self.model)  # layer weights only, no optimizer slots

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(learning_rate(self.cfg, epoch))
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        k = epoch + 1
        seconds = time.perf_counter() - self._t0
        row = {"epoch": k, "lr": learning_rate(self.cfg, epoch), "seconds": round(seconds, 3)}
        row.update({key: float(v) for key, v in (logs or {}).items() if key != "learning_rate"})
        self.rows[:] = [r for r in self.rows if int(r["epoch"]) < k] + [row]
        io.save_with(self.run.epoch_path(k), self._view.save_weights)
        save_optimizer(self.model.optimizer, self.run.file(layout.OPTIMIZER), self.model)
        io.write_csv(self.run.file(layout.TRAIN_LOG), self.rows)
        io.write_json(self.run.file(layout.PROGRESS), {"epoch": k})


def _inner(opt: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer proper: under ``mixed_float16`` Keras wraps it in a ``LossScaleOptimizer``."""
    return getattr(opt, "inner_optimizer", opt)


def seed_states(model: keras.Model) -> list:
    """The state variables of ``model``'s random seed generators (dropout's ``SeedGenerator``s),
    in layer order. They advance at every training step but are not weights (the history files
    do not hold them): a resumed run that restarted them from their initial values would draw
    other dropout masks than the run that never stopped."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights and not v.trainable]


def save_optimizer(opt: keras.optimizers.Optimizer, path: Path,
                   model: keras.Model | None = None) -> None:
    """The optimizer's variables (``v0000``...; the inner optimizer's under loss scaling, so
    the file does not depend on the precision), with loss scaling the scale's state, and the
    seed generators' states of ``model`` (``rng0000``...): everything besides the weights that
    a resumed run needs to continue exactly."""
    arrays = {f"v{i:04d}": v.numpy() for i, v in enumerate(_inner(opt).variables)}
    if _inner(opt) is not opt:
        arrays.update(loss_scale=opt.dynamic_scale.numpy(),
                      loss_scale_steps=opt.step_counter.numpy())
    if model is not None:
        arrays.update({f"rng{i:04d}": v.numpy() for i, v in enumerate(seed_states(model))})
    io.write_npz(path, **arrays)


def load_optimizer(opt: keras.optimizers.Optimizer, model: keras.Model, path: Path) -> None:
    """Restore ``save_optimizer``'s file into ``opt`` (built here, inside the model's strategy
    scope) and ``model``'s seed generators. A run resumed in another precision keeps its
    optimizer state; a loss scale starts from Keras' initial one when the file has none."""
    with distribute.model_scope(model):
        opt.build(model.trainable_variables)
    arrays = io.read_npz(path)
    inner = _inner(opt)
    if sum(k[:1] == "v" and k[1:].isdigit() for k in arrays) != len(inner.variables):
        raise DareError(f"optimizer state {path} does not match the model; cannot resume")
    for i, v in enumerate(inner.variables):
        v.assign(arrays[f"v{i:04d}"])
    if inner is not opt and "loss_scale" in arrays:
        opt.dynamic_scale.assign(arrays["loss_scale"])
        opt.step_counter.assign(arrays["loss_scale_steps"])
    states = seed_states(model)
    saved = sorted(k for k in arrays if k.startswith("rng"))
    if saved:  # files written before the seed states were saved have none: keep the initial
        if len(saved) != len(states):
            raise DareError(f"random-seed state in {path} does not match the model; cannot "
                            "resume")
        for v, k in zip(states, saved, strict=True):
            v.assign(arrays[k])


# ---------------------------------------------------------------------------- the run
IDENTITY = ("model", "dataset", "seed", "subset", "augment", "optimizer")


def _prepare_run(cfg: TrainConfig) -> tuple[Run, TrainConfig, int]:
    """Create or reopen the run directory; return it, the config to use and the start epoch."""
    path = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.dataset, cfg.model, cfg.seed)
    run = Run(path)
    has_config = run.file(layout.CONFIG).is_file()
    done = run.completed_epochs() if has_config else 0
    if not cfg.resume:
        if has_config:
            raise DareError(f"{run.path} already holds a run ({done} epochs trained); "
                            "pass --resume to continue it or choose another --run-dir")
        io.check_writable(run.path)  # one line now, not a traceback at the first save
        return run, cfg, 0
    if not has_config:
        raise DareError(f"nothing to resume at {run.path} (no {layout.CONFIG})")
    io.check_writable(run.path)
    io.remove_stale_tmp(run.path)
    return run, cfg, done


Hook = Callable[[np.ndarray, np.ndarray], Sequence[keras.callbacks.Callback]]


def train(cfg: TrainConfig, *, wrap_model: Callable[[keras.Model], keras.Model] | None = None,
          callbacks: Sequence[keras.callbacks.Callback] | Hook = (),
          extra_config: dict[str, Any] | None = None) -> Run:
    """Train ``cfg.model`` on ``cfg.dataset``'s ``x_train``, saving every epoch. Returns the run.

    Hooks for variants of training (PGD adversarial training uses all three):
    ``wrap_model`` turns the built model into the one that is compiled and fitted (it must
    share its layers, so the history holds the architecture's own weights); ``callbacks`` (or
    ``callbacks(x_holdout, y_holdout)``) run before the checkpointing callback, so metrics
    they add to the epoch's logs reach ``train_log.csv``; ``extra_config`` joins the ``train``
    section of ``config.json``.

    ``cfg.devices`` / ``cfg.precision`` choose the strategy and dtype policy
    (``darekit.distribute``); ``config.json`` records them under ``distribution`` (strategy,
    replicas, devices, global and per-replica batch, XLA, batch-norm synchronisation).
    """
    # Devices first: a device that is not there is an error before the run folder is made.
    dist = distribute.distribution(cfg.devices, cfg.precision)
    dist.check_batch(cfg.batch_size)
    run, cfg, start = _prepare_run(cfg)
    set_seed(cfg.seed, cfg.deterministic)
    jit = dist.jit_compile(cfg.jit_compile)
    # JAX's DataParallel shards every batch evenly over its devices (TF's MirroredStrategy
    # splits uneven batches): the held-out set and each epoch's last batch are cut to a
    # multiple of the replicas (recorded as ``even_batches``).
    even = dist.replicas if B.name() == "jax" and dist.replicas > 1 else 1
    if cfg.verbose:
        print(dist.summary(cfg.batch_size))
        if cfg.jit_compile and not jit:
            print("jit_compile: off (XLA cannot compile a MirroredStrategy step)")
    if jit and not xla_allowed(jit):
        jit = False
        if cfg.verbose:
            print("jit_compile: off (no deterministic XLA max-pooling gradient in TF)")
    dataset = load_dataset(cfg.dataset)
    split_path = run.file(layout.SPLIT)
    if split_path.is_file():
        split = Split.load(split_path)
    else:
        split = make_split(dataset.y_train, cfg.seed, cfg.subset)
        split.save(split_path)
    data = RunData.from_split(dataset, split)
    arch = get_architecture(cfg.model)
    train_cfg = {**cfg.to_dict(), **(extra_config or {}),
                 "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
                 "n_train": len(split.train_idx), "n_validation": len(split.validation_idx),
                 "distribution": {**dist.describe(cfg.batch_size), "jit_compile": jit,
                                  "sync_batch_norm": dist.replicas > 1,
                                  **({"even_batches": even} if even > 1 else {})}}
    run.write_config(layout.CONFIG, "train", train_cfg)  # on resume: records new --epochs
    mark_latest(run.path)

    x_hold, y_hold = (data.x_test, data.y_test) if cfg.holdout == "test" else \
        (data.x_validation, data.y_validation)
    if cfg.test_subset is not None and cfg.holdout == "test":
        keep = balanced_subset(y_hold, min(cfg.test_subset, len(y_hold)), cfg.seed)
        x_hold, y_hold = x_hold[keep], y_hold[keep]
    if even > 1:
        x_hold, y_hold = x_hold[:len(x_hold) - len(x_hold) % even], \
            y_hold[:len(y_hold) - len(y_hold) % even]

    # NumPy batches on the host, on either backend; Keras moves each to the device(s).
    batches, steps = train_dataset(data.x_train, data.y_train, cfg, start, multiple=even)
    # Built, compiled and fitted under the strategy and dtype policy of --devices/--precision.
    with dist.scope():
        model = arch.build(dataset.input_shape, dataset.num_classes,
                           *channel_stats(data.x_train))
        if dist.replicas > 1:
            # Each replica normalises with the global batch's statistics: the step computes
            # what it computes on one device (otherwise BN would see batch/replicas images).
            distribute.synchronize_batch_norm(model)
        if wrap_model is not None:
            model = wrap_model(model)
        model.compile(optimizer=OPTIMIZERS[cfg.optimizer](cfg),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=jit)
        rows: list[dict[str, Any]] = []
        if start > 0:
            rundir.weights_view(model).load_weights(str(run.epoch_path(start)))
            load_optimizer(model.optimizer, model, run.file(layout.OPTIMIZER))
            rows = [r for r in io.read_csv(run.file(layout.TRAIN_LOG))
                    if int(r["epoch"]) <= start]
        else:
            distribute.build_optimizer(model)  # see its docstring: keras-team/keras#23085
        if start >= cfg.epochs:
            print(f"{run.path}: already trained for {start} epochs; nothing to do")
            return run

        extra = list(callbacks(x_hold, y_hold) if callable(callbacks) else callbacks)
        if cfg.tensorboard:
            log_dir = str(run.file(layout.tensorboard("train")))
            extra.append(keras.callbacks.TensorBoard(log_dir=log_dir))
        model.fit(B.fit_input(batches, len(batches)), epochs=cfg.epochs, initial_epoch=start,
                  steps_per_epoch=steps,
                  validation_data=(x_hold, y_hold),
                  validation_batch_size=max(256, cfg.batch_size),
                  callbacks=[*extra, EpochHistory(run, cfg, rows)], verbose=cfg.verbose,
                  shuffle=False)
    return run
