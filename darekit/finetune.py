"""Fine-tuning building blocks shared by DARE, its ablations and adversarial fine-tuning.

- ``accuracy``: clean accuracy of a classifier, batched.
- ``weight_snapshot`` / ``relative_change``: how far each layer's weights moved (relative L2),
  so a run whose weights did not move is reported as such.
- ``EpochLog``: a callback logging, after every epoch, the *classifier's* clean accuracy on
  named sets and the relative weight change per layer, into a CSV written atomically.
- ``finetune_ce``: cross-entropy fine-tuning of a classifier on ``(x, y)`` (DARE-SL and the
  adversarial fine-tuning baselines).

``FinetuneConfig.devices`` / ``precision`` (``darekit.distribute``) say where the stages that
load the classifier build and tune it; ``finetune_ce`` compiles and fits under the strategy its
model was built under.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from darekit import distribute, io
from darekit.config import option
from darekit.errors import DareError

EvalSets = Mapping[str, tuple[np.ndarray, np.ndarray]]


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Fraction of ``x`` ``(N, H, W, C)`` that ``model`` (logits) classifies as ``y`` ``(N,)``."""
    if len(x) == 0:
        return float("nan")
    pred = np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1)
    return float(np.mean(pred == y))


def weight_snapshot(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """Copies of every layer's trainable weights, by layer name."""
    return {layer.name: [w.numpy().copy() for w in layer.trainable_weights]
            for layer in model.layers if layer.trainable_weights}


def relative_change(before: Mapping[str, list[np.ndarray]], model: keras.Model
                    ) -> dict[str, float]:
    """``||w - w0|| / ||w0||`` per layer (all the layer's trainable weights together)."""
    out = {}
    for name, ws0 in before.items():
        ws = model.get_layer(name).trainable_weights
        with np.errstate(over="ignore", invalid="ignore"):  # diverged weights: inf, reported
            num = sum(float(np.sum((w.numpy() - w0) ** 2))
                      for w, w0 in zip(ws, ws0, strict=True))
        den = sum(float(np.sum(w0 ** 2)) for w0 in ws0)
        out[name] = float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))
    return out


def diverged(model: keras.Model, rows: list[dict[str, Any]]) -> bool:
    """Whether a fine-tuning run diverged: weights that became NaN or inf, or so large that
    their relative change overflows (seen on smallcnn: finite weights, chance accuracy)."""
    finite = all(np.isfinite(w).all() for w in model.get_weights())
    return not (finite and np.isfinite(rows[-1].get("max_rel_change", 0.0)))


def tensorboard(enabled: bool, log_dir: Any) -> list[keras.callbacks.Callback]:
    """``[keras.callbacks.TensorBoard(log_dir)]`` when ``enabled``, else ``[]``."""
    return [keras.callbacks.TensorBoard(log_dir=str(log_dir))] if enabled else []


class EpochLog(keras.callbacks.Callback):
    """Log the classifier's accuracy on ``eval_sets`` and its weight change, every epoch.

    ``classifier`` may differ from the model being trained (DARE trains a regression model
    sharing the classifier's layers); row 0 is the state before fine-tuning.
    """

    def __init__(self, classifier: keras.Model, eval_sets: EvalSets, path: str | Path | None,
                 extra: Mapping[str, Any] | None = None):
        super().__init__()
        self.classifier, self.eval_sets = classifier, dict(eval_sets)
        self.path = Path(path) if path is not None else None
        self.extra = dict(extra or {})
        self.before = weight_snapshot(classifier)
        self.rows: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()

    def _row(self, epoch: int, logs: Mapping[str, Any] | None) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, **self.extra}
        row.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"})
        for name, (x, y) in self.eval_sets.items():
            row[f"{name}_accuracy"] = accuracy(self.classifier, x, y)
        change = relative_change(self.before, self.classifier)
        row["max_rel_change"] = max(change.values(), default=0.0)
        row.update({f"rel_change/{k}": v for k, v in change.items()})
        return row

    def on_train_begin(self, logs=None):
        self.rows = [self._row(0, None)]
        self._write()

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = self._row(epoch + 1, logs)
        row["seconds"] = round(time.perf_counter() - self._t0, 3)
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            io.write_csv(self.path, self.rows)


@dataclass(frozen=True)
class FinetuneConfig:
    """Cross-entropy fine-tuning options (DARE-SL and adversarial fine-tuning share them)."""

    epochs: int = option(5, "fine-tuning epochs")
    batch_size: int = option(32, distribute.BATCH_HELP)
    lr: float = option(1e-3, "learning rate")
    optimizer: str = option("sgd", "optimizer", choices=lambda: sorted(FT_OPTIMIZERS))
    momentum: float = option(0.0, "SGD momentum")
    seed: int = option(0, "seeds shuffling and dropout")
    devices: str | None = distribute.devices_option()
    precision: str = distribute.precision_option()
    tensorboard: bool = distribute.tensorboard_option()

    def __post_init__(self) -> None:
        distribute.check_options(self)
        if self.epochs < 1 or self.batch_size < 1:
            raise DareError(f"--epochs and --batch-size must be positive; received "
                            f"{self.epochs}, {self.batch_size}")
        if not self.lr > 0:
            raise DareError(f"--lr must be positive; received {self.lr}")
        if self.optimizer not in FT_OPTIMIZERS:
            raise DareError(f"--optimizer must be one of {sorted(FT_OPTIMIZERS)}; "
                            f"received {self.optimizer!r}")


@contextlib.contextmanager
def frozen_batchnorm(model: keras.Model) -> Iterator[list[keras.layers.Layer]]:
    """Freeze ``model``'s ``BatchNormalization`` layers while fine-tuning (Keras 3: a frozen BN
    layer runs in inference mode, so its statistics are not re-estimated on the small
    fine-tuning set); each layer's ``trainable`` is restored on exit. Yields the layers."""
    bn = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    before = [la.trainable for la in bn]
    for la in bn:
        la.trainable = False
    try:
        yield bn
    finally:
        for la, t in zip(bn, before, strict=True):
            la.trainable = t


FT_OPTIMIZERS = {
    "sgd": lambda c: keras.optimizers.SGD(c.lr, momentum=c.momentum),
    "adam": lambda c: keras.optimizers.Adam(c.lr),
}


def finetune_ce(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: FinetuneConfig, *,
                eval_sets: EvalSets, log_path: str | Path | None = None, verbose: int = 1,
                extra: Mapping[str, Any] | None = None,
                callbacks: Sequence[keras.callbacks.Callback] = ()) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place with cross-entropy on ``(x, y)``; return the epoch log rows.
    ``callbacks`` are added to ``fit``'s (e.g. ``tensorboard(...)``).

    Batch-norm layers stay in inference mode (their statistics are not re-estimated on the
    small fine-tuning set); dropout stays active, as in ordinary training.

    ``model`` is compiled and fitted under the strategy it was built under (build it inside
    ``distribute.distribution(cfg.devices, cfg.precision).scope()`` to tune on those devices
    and in that precision); ``cfg.batch_size`` is the global batch.
    """
    with frozen_batchnorm(model), distribute.model_scope(model):
        model.compile(optimizer=FT_OPTIMIZERS[cfg.optimizer](cfg),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        distribute.build_optimizer(model)  # keras-team/keras#23085
        log = EpochLog(model, eval_sets, log_path, extra)
        keras.utils.set_random_seed(cfg.seed)
        model.fit(x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True,
                  callbacks=[*callbacks, log], verbose=verbose)
    return log.rows
