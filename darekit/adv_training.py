"""PGD adversarial training from scratch (Madry et al. 2018), as seed 000 does it.

The attack runs inside Keras' compiled train step: ``PGDTrainer`` is the architecture's own
functional graph (same layers, same weights file) whose ``train_step`` replaces each batch by
its PGD adversarial examples (``darekit.linf``, over the model as a pure function of the
step's weights) before the ordinary step. The PGD loop is a Python loop over a fixed step
count inside the compiled step (unrolled): no per-batch Python or Foolbox overhead. While
crafting, batch norm and dropout run in inference mode
(``training=False``): the attack sees the deterministic model it attacks, and the BN running
statistics are updated once per batch, by the training pass on the adversarial batch (the
seed's PyTorch code crafts in train mode, which updates them 7 more times per batch).

Everything else is ``darekit.training``'s: input pipeline (stateless per-epoch shuffling and
augmentation), learning-rate schedule, ``EpochHistory`` (weights after every epoch, optimizer
state, log, progress), resume. After every epoch, ``RobustEval`` adds the PGD robust accuracy
on the held-out test images to the epoch's log row (``robust_accuracy``, ``robust_loss``);
``val_accuracy``/``val_loss`` are the clean ones, and ``accuracy``/``loss`` are measured on
the adversarial training batches.

Under TensorFlow's ``MirroredStrategy`` (``--devices``) each replica crafts the attack on its
share of the global batch; its random start is its rows of the global batch's draw
(``replica_rows``), so the adversarial batch does not depend on the number of replicas. Under
JAX's ``DataParallel`` the step is one SPMD program over the global batch: nothing to do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from darekit import backend as B
from darekit import distribute, io, layout, linf, training
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


def _start(x0: Any, eps: float, seed: Any, rows: tuple[Any, Any] | None) -> Any:
    """The uniform random start of ``x0``; ``rows``: this replica's slice of the global
    batch's draw (TF's ``MirroredStrategy`` only, ``distribute.replica_rows``)."""
    if rows is None:
        return linf.random_start(x0, eps, seed)
    offset, total = rows
    n = ops.cast(ops.shape(x0)[0], offset.dtype)
    u = B.stateless_uniform((total, *ops.shape(x0)[1:]), seed)[offset:offset + n]
    return ops.clip(x0 + (u * (eps + eps) - eps), 0.0, 1.0)


def craft(call: linf.Call, x: Any, y: Any, cfg: PGDConfig, seed: Any,
          rows: tuple[Any, Any] | None = None) -> Any:
    """PGD adversarial examples of ``x`` ``(B, H, W, C)`` in [0, 1] for labels ``y`` ``(B,)``
    against ``call(x) -> logits`` (a model as a pure function, in inference mode:
    ``darekit.linf``). ``seed`` (2 integers) draws the random start statelessly, so a batch's
    attack depends only on the seed; ``rows`` as in ``_start``. Meant to run inside a compiled
    function (the step loop unrolls); the result carries no gradient."""
    x0 = ops.convert_to_tensor(x, "float32")
    start = _start(x0, cfg.eps, seed, rows) if cfg.random_start else None
    return linf.pgd(call, x0, y, cfg.eps, cfg.step_size, cfg.steps, start=start)


def linf_pgd(model: keras.Model, x: Any, y: Any, cfg: PGDConfig, seed: Any,
             rows: tuple[Any, Any] | None = None, *,
             state: tuple[list, list] | None = None) -> Any:
    """``craft`` against ``model`` in inference mode with the weights ``state``
    (``B.model_state(model)`` when ``None``: pass them in explicitly inside a JAX step)."""
    state = B.model_state(model) if state is None else state
    return craft(lambda z: B.stateless_logits(model, state, z), x, y, cfg, seed, rows)


def pgd_function(model: keras.Model, cfg: PGDConfig):
    """``f(x, y, seed) -> x_adv``: ``craft`` compiled once for ``model`` (its current weights
    are passed at each call); ``seed``: 2 integers (``B.seed_array``). XLA unless TF's op
    determinism forbids it (``B.xla_allowed``)."""
    return B.model_function(model, lambda call, x, y, seed: craft(call, x, y, cfg, seed),
                            jit_compile=B.xla_allowed(True))


def robust_function(model: keras.Model, cfg: PGDConfig):
    """``f(x, y, seed) -> (clean predictions, PGD predictions, PGD loss)`` per input, compiled
    once for ``model`` (current weights at each call)."""
    def fn(call, x, y, seed):
        adv = call(craft(call, x, y, cfg, seed))
        return ops.argmax(call(x), axis=-1), ops.argmax(adv, axis=-1), B.sparse_ce(y, adv)
    return B.model_function(model, fn, jit_compile=B.xla_allowed(True))


def robust_evaluation(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: PGDConfig, *,
                      batch_size: int = 256, seed: int = 0, attack=None) -> dict[str, float]:
    """Clean and PGD accuracy (and PGD loss) of ``model`` on ``(x, y)``, batched; batch ``b``'s
    random start is drawn from ``(seed, b)``.

    ``attack``: a ``robust_function(model, cfg)`` to reuse (avoids compiling every call).
    Under XLA (always on JAX) a short last batch is padded to a bucket size (``B.bucket``), so
    that few shapes compile; padded rows are dropped.
    """
    attack = attack or robust_function(model, cfg)
    y = np.asarray(y).astype(np.int32 if B.name() == "jax" else np.int64)
    correct = robust = 0
    loss = 0.0
    for b, i in enumerate(range(0, len(x), batch_size)):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        n = len(xb)
        if B.needs_buckets(B.xla_allowed(True)):
            m = B.bucket(n, batch_size)
            xb, yb = B.pad_rows(xb, m), B.pad_rows(yb, m)
        clean, adv, ce = (B.to_numpy(t)[:n] for t in attack(xb, yb, B.seed_array(seed, b)))
        correct += int(np.sum(clean == yb[:n]))
        robust += int(np.sum(adv == yb[:n]))
        loss += float(np.sum(ce, dtype=np.float64))
    n = max(len(x), 1)
    return {"clean_accuracy": correct / n, "robust_accuracy": robust / n, "robust_loss": loss / n}


class PGDTrainer(keras.Model):
    """A functional model trained on the PGD adversarial examples of every batch.

    Built on an architecture's inputs and outputs (``PGDTrainer.wrap(model, cfg, seed)``), it
    shares that model's layers, so its weights file is the architecture's own and
    ``Run.load_model`` reads it back as a plain classifier. Its ``train_step`` has the form of
    the backend: ``train_step(self, data)`` on TensorFlow, ``train_step(self, state, data)``
    returning ``(logs, state)`` on JAX; both craft with the weights of the step.
    """

    def __init__(self, *args: Any, pgd: PGDConfig, seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pgd, self.pgd_seed = pgd, int(seed)

    @classmethod
    def wrap(cls, model: keras.Model, pgd: PGDConfig, seed: int = 0) -> PGDTrainer:
        return cls(model.inputs, model.outputs, pgd=pgd, seed=seed, name=model.name)

    def _seed(self, iterations: Any) -> Any:
        # (run seed, optimizer step): the random starts of a resumed run equal the original's.
        return ops.stack([ops.convert_to_tensor(self.pgd_seed, "int32"),
                          ops.cast(iterations, "int32")])

    if keras.backend.backend() == "jax":
        def train_step(self, state, data):
            trainable, non_trainable, optimizer_variables, _ = state
            x, y = data[0], data[1]
            i = next(k for k, v in enumerate(self.optimizer.variables)
                     if v is self.optimizer.iterations)
            x_adv = linf_pgd(self, x, y, self.pgd, self._seed(optimizer_variables[i]),
                             state=(trainable, non_trainable))
            return super().train_step(state, (x_adv, y))
    else:
        def train_step(self, data):
            x, y = data[0], data[1]
            x_adv = linf_pgd(self, x, y, self.pgd, self._seed(self.optimizer.iterations),
                             rows=distribute.replica_rows(x))
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
            self._attack = robust_function(self.model, self.cfg)
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
