"""PGD adversarial training from scratch (Madry et al. 2018), as seed 000 does it.

The attack runs inside Keras' compiled train step: ``PGDTrainer`` is the architecture's own
functional graph (same layers, same weights file) whose ``train_step`` replaces each batch by
its PGD adversarial examples before the ordinary step. The PGD loop is a Python loop over a
fixed step count inside that ``tf.function`` (unrolled in the graph): no per-batch Python or
Foolbox overhead. While crafting, batch norm and dropout run in inference mode
(``training=False``): the attack sees the deterministic model it attacks, and the BN running
statistics are updated once per batch, by the training pass on the adversarial batch (the
seed's PyTorch code crafts in train mode, which updates them 7 more times per batch).

Everything else is ``darekit.training``'s: input pipeline (stateless per-epoch shuffling and
augmentation), learning-rate schedule, ``EpochHistory`` (weights after every epoch, optimizer
state, log, progress), resume. After every epoch, ``RobustEval`` adds the PGD robust accuracy
on the held-out test images to the epoch's log row (``robust_accuracy``, ``robust_loss``);
``val_accuracy``/``val_loss`` are the clean ones, and ``accuracy``/``loss`` are measured on
the adversarial training batches.

Under a multi-device strategy (``--devices``) each replica crafts the attack on its share of the
global batch; its random start is its rows of the global batch's draw (``replica_rows``), so the
adversarial batch does not depend on the number of replicas.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from darekit import distribute, io, layout, training
from darekit.config import option
from darekit.data import DATASETS, dataset_spec
from darekit.errors import DareError
from darekit.paths import runs_dir
from darekit.rundir import Run
from darekit.training import TrainConfig

MADRY_TRAIN = {
    "epochs": 200, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
    "nesterov": False, "weight_decay": 2e-4, "schedule": "step", "milestones": (100, 150),
    "gamma": 0.1, "augment": "crop-flip", "warmup_epochs": 0,
}
"""The seed's recipe, for every architecture (it replaces the architecture's train_defaults)."""
ADV_TRAIN_DEFAULTS = {"model": "resnet18", "dataset": "cifar10",
                      "run_dir": "runs/<dataset>-<model>-pgdat-s<seed>"}
"""The seed's model and data; the run goes apart from the standard run of that model."""


@dataclass(frozen=True)
class PGDConfig:
    """L-inf PGD: ``steps`` signed-gradient steps of ``step_size`` (default ``eps / 4``: the
    seed's 2/255 at 8/255), projected on the eps-ball and [0, 1], from a uniform random start."""

    eps: float = option(help="L-inf training budget", default_text=lambda: ", ".join(
        f"{n} {s.linf_budget:.4g}" for n, s in sorted(DATASETS.items())))
    steps: int = option(7, "PGD steps")
    step_size: float | None = option(None, "PGD step", default_text="eps / 4 (2/255 at 8/255)")
    random_start: bool = option(True, "uniform random start in the eps-ball")

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise DareError(f"--eps must be a positive number; received {self.eps}")
        if self.steps < 1:
            raise DareError(f"--steps must be a positive integer; received {self.steps}")
        if self.step_size is None:
            object.__setattr__(self, "step_size", self.eps / 4)
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise DareError(f"--step-size must be positive; received {self.step_size}")

    @classmethod
    def for_dataset(cls, dataset: str, **given: Any) -> PGDConfig:
        """The dataset's L-inf budget (the seed's 8/255 for the colour sets; 0.1 for
        Fashion-MNIST) and the defaults, updated with the non-``None`` ``given``."""
        values = {"eps": dataset_spec(dataset).linf_budget}
        return cls(**values | {k: v for k, v in given.items() if v is not None})


def linf_pgd(model: keras.Model, x: tf.Tensor, y: tf.Tensor, cfg: PGDConfig,
             seed: tf.Tensor, rows: tuple[tf.Tensor, tf.Tensor] | None = None) -> tf.Tensor:
    """PGD adversarial examples of ``x`` ``(B, H, W, C)`` in [0, 1] for labels ``y`` ``(B,)``.

    ``model`` outputs logits and runs in inference mode; ``seed`` (2 integers) draws the random
    start statelessly, so a batch's attack depends only on the seed. ``rows``: ``(offset,
    total)`` when ``x`` is a replica's slice of a global batch of ``total`` rows (the random
    start is then that slice of the global batch's draw). Meant to run inside a
    ``tf.function`` (the step loop unrolls); the result carries no gradient.
    """
    x0 = tf.convert_to_tensor(x, tf.float32)
    y = tf.cast(y, tf.int64)
    xa = x0
    if cfg.random_start:
        if rows is None:
            noise = tf.random.stateless_uniform(tf.shape(x0), seed, -cfg.eps, cfg.eps)
        else:
            offset, total = rows
            shape = tf.concat([tf.reshape(total, [1]), tf.shape(x0, out_type=tf.int64)[1:]], 0)
            noise = tf.random.stateless_uniform(shape, seed, -cfg.eps, cfg.eps)
            noise = noise[offset:offset + tf.shape(x0, out_type=tf.int64)[0]]
        xa = tf.clip_by_value(x0 + noise, 0.0, 1.0)
    for _ in range(cfg.steps):
        with tf.GradientTape() as tape:
            tape.watch(xa)
            logits = model(xa, training=False)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        xa = xa + cfg.step_size * tf.sign(tape.gradient(loss, xa))
        xa = tf.clip_by_value(tf.clip_by_value(xa, x0 - cfg.eps, x0 + cfg.eps), 0.0, 1.0)
    return tf.stop_gradient(xa)


def pgd_function(model: keras.Model, cfg: PGDConfig):
    """``f(x, y, seed) -> x_adv``: ``linf_pgd`` compiled once for ``model``."""
    return tf.function(lambda x, y, seed: linf_pgd(model, x, y, cfg, seed),
                       reduce_retracing=True)


def robust_evaluation(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: PGDConfig, *,
                      batch_size: int = 256, seed: int = 0, attack=None) -> dict[str, float]:
    """Clean and PGD accuracy (and PGD loss) of ``model`` on ``(x, y)``, batched.

    ``attack``: a ``pgd_function`` to reuse (avoids retracing every call).
    """
    attack = attack or pgd_function(model, cfg)
    correct = robust = 0
    loss = 0.0
    for b, i in enumerate(range(0, len(x), batch_size)):
        xb = tf.constant(x[i:i + batch_size])
        yb = tf.constant(y[i:i + batch_size], tf.int64)
        xa = attack(xb, yb, tf.constant([seed, b], tf.int64))
        clean_logits, adv_logits = model(xb, training=False), model(xa, training=False)
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(clean_logits, -1) == yb, tf.int32)))
        robust += int(tf.reduce_sum(tf.cast(tf.argmax(adv_logits, -1) == yb, tf.int32)))
        loss += float(tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(yb, adv_logits)))
    n = max(len(x), 1)
    return {"clean_accuracy": correct / n, "robust_accuracy": robust / n, "robust_loss": loss / n}


class PGDTrainer(keras.Model):
    """A functional model trained on the PGD adversarial examples of every batch.

    Built on an architecture's inputs and outputs (``PGDTrainer.wrap(model, cfg, seed)``), it
    shares that model's layers, so its weights file is the architecture's own and
    ``Run.load_model`` reads it back as a plain classifier.
    """

    def __init__(self, *args: Any, pgd: PGDConfig, seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pgd, self.pgd_seed = pgd, int(seed)

    @classmethod
    def wrap(cls, model: keras.Model, pgd: PGDConfig, seed: int = 0) -> PGDTrainer:
        return cls(model.inputs, model.outputs, pgd=pgd, seed=seed, name=model.name)

    def train_step(self, data):
        x, y = data[0], data[1]
        # (run seed, optimizer step): the random starts of a resumed run equal the original's.
        seed = tf.stack([tf.constant(self.pgd_seed, tf.int64),
                         tf.cast(self.optimizer.iterations, tf.int64)])
        x_adv = linf_pgd(self, x, y, self.pgd, seed, rows=distribute.replica_rows(x))
        return super().train_step((x_adv, y))


class RobustEval(keras.callbacks.Callback):
    """After every epoch, add ``robust_accuracy`` and ``robust_loss`` (PGD on ``(x, y)``) to the
    epoch's logs, which ``EpochHistory`` (placed after it) writes into ``train_log.csv``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, cfg: PGDConfig, batch_size: int,
                 seed: int):
        super().__init__()
        self.x, self.y, self.cfg, self.batch_size, self.seed = x, y, cfg, batch_size, seed
        self._attack = None

    def on_epoch_end(self, epoch, logs=None):
        if self._attack is None:
            self._attack = pgd_function(self.model, self.cfg)
        # The same random starts every epoch, so epochs are compared on the same attack.
        r = robust_evaluation(self.model, self.x, self.y, self.cfg, seed=self.seed,
                              batch_size=self.batch_size, attack=self._attack)
        if logs is not None:
            logs["robust_accuracy"], logs["robust_loss"] = r["robust_accuracy"], r["robust_loss"]


# ---------------------------------------------------------------------------- configuration
def default_adv_run_dir(dataset: str, model: str, seed: int) -> Path:
    """``runs/<dataset>-<model>-pgdat-s<seed>``: apart from the standard run of that model."""
    return runs_dir() / f"{dataset}-{model}-pgdat-s{seed}"


PGD_FIELDS = tuple(f.name for f in dataclasses.fields(PGDConfig))


@dataclass(frozen=True)
class AdvTrainConfig:
    """PGD adversarial training: the training options (``MADRY_TRAIN`` defaults) and the attack."""

    train: TrainConfig
    pgd: PGDConfig

    @classmethod
    def resolve(cls, model: str = ADV_TRAIN_DEFAULTS["model"],
                dataset: str = ADV_TRAIN_DEFAULTS["dataset"], **given: Any) -> AdvTrainConfig:
        """``MADRY_TRAIN`` < given options (``None``: unset); PGD fields go to ``PGDConfig``."""
        pgd = {k: given.pop(k) for k in PGD_FIELDS if k in given}
        values: dict[str, Any] = dict(MADRY_TRAIN)
        if not dataset_spec(dataset).flip_safe:
            values["augment"] = "crop"
        values.update({k: v for k, v in given.items() if v is not None})
        values["milestones"] = tuple(int(m) for m in values["milestones"])
        values.setdefault("run_dir", str(default_adv_run_dir(dataset, model,
                                                             values.get("seed", 0))))
        return cls(TrainConfig(model=model, dataset=dataset, **values),
                   PGDConfig.for_dataset(dataset, **pgd))

    @classmethod
    def from_options(cls, given: dict[str, Any]) -> AdvTrainConfig:
        """The config of a command line; ``--resume`` of an existing run starts from its saved
        config (its training options and attack cannot change)."""
        given = {k: v for k, v in given.items() if v is not None}
        model = given.get("model", ADV_TRAIN_DEFAULTS["model"])
        dataset = given.get("dataset", ADV_TRAIN_DEFAULTS["dataset"])
        given.setdefault("run_dir", str(default_adv_run_dir(dataset, model,
                                                            given.get("seed", 0))))
        path = given["run_dir"]
        saved_file = Path(path) / layout.CONFIG
        if not (given.get("resume") and saved_file.is_file()):
            return cls.resolve(given.pop("model", model), given.pop("dataset", dataset),
                               **given)
        saved = io.read_json(saved_file)["train"]
        if "pgd" not in saved:
            raise DareError(f"{path} is not a PGD adversarial-training run (no pgd config); "
                            "resume it with train/train.py")
        pgd = {k: given.pop(k) for k in PGD_FIELDS if k in given}
        clash = [f"--{k.replace('_', '-')} {v!r} (run has {saved['pgd'][k]!r})"
                 for k, v in pgd.items() if v != saved["pgd"][k]]
        if clash:
            raise DareError(f"--resume cannot change the attack of the run at {path}: "
                            + ", ".join(clash))
        return cls(TrainConfig.from_options(given), PGDConfig(**saved["pgd"]))

    def to_dict(self) -> dict[str, Any]:
        return {**self.train.to_dict(), "pgd": dataclasses.asdict(self.pgd)}


# ---------------------------------------------------------------------------- the run
def adv_train(cfg: AdvTrainConfig) -> Run:
    """PGD-train ``cfg.train.model`` on the run's ``x_train``, saving every epoch; return the run.

    ``training.train`` with its three hooks: the fitted model is a ``PGDTrainer``, a
    ``RobustEval`` callback logs robust accuracy on the held-out set, and the attack joins the
    run's config.
    """
    tc = cfg.train
    return training.train(
        tc, wrap_model=lambda m: PGDTrainer.wrap(m, cfg.pgd, tc.seed),
        callbacks=lambda x, y: [RobustEval(x, y, cfg.pgd, max(256, tc.batch_size), tc.seed)],
        extra_config={"pgd": dataclasses.asdict(cfg.pgd)})
