"""Stage 3: transformation, tuning and synchronization (``dare/dare.py``) and its ablations.

One pipeline, ``run_dare``, with the variant as a parameter (``VARIANTS``):

- ``dare``: the regression model R (``traces.trace_model``: the classifier's own layer objects,
  outputting the activation traces of the sliced layers) is fine-tuned on Stage 2's data with
  the squared error summed over the slice of each input's class, averaged over the batch (SGD,
  batch-norm in inference mode). R and the classifier share weights; ``synchronize`` copies and
  verifies them anyway, and the saved classifier is re-read and compared with R.
- ``dare-s``: the same with every neuron of the sliced layers (the mask is all ones).
- ``dare-sl``: no regression model: the classifier is fine-tuned with cross-entropy on the same
  inputs and anchors with their true labels (``finetune.finetune_ce``); no slice.

Every run logs per epoch the classifier's clean accuracy on ``x_validation`` and the test set
and the relative weight change per layer (``finetune.EpochLog``); a run whose weights did not
move is flagged (``moved: false``, status ``no-op``), warned about and, like a divergence,
not saved: it is not a result.

``--devices`` / ``--precision`` (``darekit.distribute``): ``run_dare`` loads the classifier and
tunes it inside that strategy and dtype policy (``--batch-size`` is then the global batch), and
records them in the summary; the saved classifier is a plain float32 model either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import keras
import numpy as np

from darekit import distribute, io, layout
from darekit.config import by_architecture, option
from darekit.errors import DareError
from darekit.finetune import (
    EpochLog,
    EvalSets,
    FinetuneConfig,
    diverged,
    finetune_ce,
    frozen_batchnorm,
    tensorboard,
)
from darekit.mining import MineResult, load_mined
from darekit.rundir import Run
from darekit.seeding import set_seed
from darekit.traces import trace_model


@dataclass(frozen=True)
class Variant:
    """A DARE variant: which of slicing and model transformation it keeps."""

    name: str
    use_slice: bool
    use_transform: bool
    summary: str


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dare", use_slice=True, use_transform=True,
            summary="regression model R, loss on the slice of the input's class"),
    Variant("dare-s", use_slice=False, use_transform=True,
            summary="regression model R, loss on all neurons of the sliced layers"),
    Variant("dare-sl", use_slice=False, use_transform=False,
            summary="no regression model: cross-entropy on the same inputs and anchors"),
)}


@dataclass(frozen=True)
class DareConfig:
    """Options of ``dare/dare.py``, ``dare/dare-s.py`` and ``dare/dare-sl.py``."""

    variant: str = option("dare", cli=False)  # a key of VARIANTS: each script fixes its own
    lr: float | None = option(
        None, "SGD learning rate", default_text=lambda: "dare, dare-s: "
        + by_architecture("dare_lr", "dare_lr")() + f"; dare-sl: {FinetuneConfig().lr:g} "
        "(cross-entropy fine-tuning, as the adversarial baselines)")
    epochs: int = option(5, "fine-tuning epochs")
    batch_size: int = option(32, distribute.BATCH_HELP)
    loss: str = option("mean", "DARE and DARE-S: the squared error over a sample's slice is "
                       "averaged (mean: the usable lr does not depend on the model or the "
                       "slice size) or summed (sum: the first reading of the method)",
                       choices=lambda: list(LOSSES))
    seed: int = option(0, "seeds shuffling and dropout")
    min_rel_change: float = option(1e-6, "largest relative weight change below which the "
                                   "weights 'did not move' (the run is then not a result)")
    verbose: int = option(2, "Keras progress output", choices=(0, 1, 2))
    devices: str | None = distribute.devices_option()
    precision: str = distribute.precision_option()
    tensorboard: bool = distribute.tensorboard_option()

    def __post_init__(self) -> None:
        distribute.check_options(self)
        if self.variant not in VARIANTS:
            raise DareError(f"unknown variant {self.variant!r}; expected one of {list(VARIANTS)}")
        if self.loss not in LOSSES:
            raise DareError(f"--loss must be one of {list(LOSSES)}; received {self.loss!r}")
        if self.lr is not None and not self.lr > 0:
            raise DareError(f"--lr must be positive; received {self.lr}")
        if self.epochs < 1 or self.batch_size < 1:
            raise DareError(f"--epochs and --batch-size must be positive; received "
                            f"{self.epochs}, {self.batch_size}")

    def resolved(self, regression_lr: float) -> DareConfig:
        """The config with ``lr`` filled in when it is None: ``regression_lr`` (the model's
        ``Run.dare_lr``) for DARE and DARE-S; for DARE-SL, whose loss is the cross-entropy,
        the cross-entropy fine-tuning rate (``FinetuneConfig.lr``, as adversarial
        fine-tuning)."""
        if self.lr is not None:
            return self
        use_transform = VARIANTS[self.variant].use_transform
        return replace(self, lr=regression_lr if use_transform else FinetuneConfig().lr)


# --------------------------------------------------------------------------- loss and masks
def masked_sse(y_true, y_pred):
    """Per-sample squared error summed over the masked units:
    ``sum(mask * (pred - target)^2, -1)``.

    ``y_true`` ``(B, 2U)`` packs the target ``[:, :U]`` and the 0/1 mask ``[:, U:]``
    (Keras passes one array per output); ``y_pred`` ``(B, U)``. Keras averages it over the batch
    and sums it over R's outputs (the sliced layers).
    """
    u = keras.ops.shape(y_pred)[-1]
    target, mask = y_true[:, :u], y_true[:, u:]
    return keras.ops.sum(mask * keras.ops.square(y_pred - target), axis=-1)


def masked_mse(y_true, y_pred):
    """Per-sample squared error averaged over the masked units (``masked_sse`` divided by the
    slice size of the sample's class): the loss scale, hence the usable learning rate, no
    longer grows with the layer width and the slice (DARE-S, whose "slice" is every unit, saw
    a loss up to 3x DARE's and diverged at a rate DARE survived)."""
    u = keras.ops.shape(y_pred)[-1]
    mask = y_true[:, u:]
    return masked_sse(y_true, y_pred) / keras.ops.maximum(keras.ops.sum(mask, axis=-1), 1.0)


LOSSES = {"mean": masked_mse, "sum": masked_sse}
"""How DARE's regression loss reduces the squared error over a sample's slice, per layer."""


def sample_masks(masks: Mapping[str, np.ndarray] | None, y: np.ndarray,
                 units: Mapping[str, int]) -> dict[str, np.ndarray]:
    """``{layer: (N, units) float32}``: the slice of each sample's class (all ones if None)."""
    if masks is None:
        return {n: np.ones((len(y), u), np.float32) for n, u in units.items()}
    return {n: masks[n][y].astype(np.float32) for n in units}


def load_masks(run: Run, units: Mapping[str, int], num_classes: int) -> dict[str, np.ndarray]:
    """``slice/masks.npz``, checked against the model's sliced layers."""
    path = run.file(layout.MASKS)
    if not path.is_file():
        raise DareError(f"run {run.path} has no {layout.MASKS}; run dare/nnslicer.py --run-dir "
                        f"{run.path} first (or dare/dare-s.py, which needs no slice)")
    masks = io.read_npz(path)
    for name, u in units.items():
        if name not in masks or masks[name].shape != (num_classes, u):
            got = masks[name].shape if name in masks else "missing"
            raise DareError(f"{layout.MASKS} does not fit layer {name!r} ({num_classes} classes x "
                            f"{u} units; found {got}); rerun dare/nnslicer.py")
    return {n: masks[n].astype(bool) for n in units}


def regression_loss(r: keras.Model, x: np.ndarray, targets: Sequence[np.ndarray],
                    masks: Sequence[np.ndarray], reduction: str = "mean") -> float:
    """DARE's loss on a batch, computed directly: mean over x of the per-layer masked squared
    error (averaged over, or summed over, each sample's slice), summed over the layers."""
    outs = r(x, training=False)
    outs = outs if isinstance(outs, list | tuple) else [outs]
    scale = (lambda m: np.maximum(m.sum(-1), 1.0)) if reduction == "mean" else \
        (lambda m: 1.0)
    per_sample = sum(np.sum(m * (np.asarray(o) - t) ** 2, axis=-1) / scale(m)
                     for o, t, m in zip(outs, targets, masks, strict=True))
    return float(np.mean(per_sample))


# --------------------------------------------------------------------------- synchronization
def synchronize(source: keras.Model, target: keras.Model) -> list[str]:
    """Give ``target`` the weights of every layer it shares by name with ``source``; verify.

    With shared layer objects (``trace_model``) the copy is a no-op, but the check is not.
    Returns the names of the synchronised layers.
    """
    done = []
    for layer in source.layers:
        if not layer.weights or layer.name not in {t.name for t in target.layers}:
            continue
        dest = target.get_layer(layer.name)
        if dest is not layer:
            dest.set_weights(layer.get_weights())
        for a, b in zip(dest.get_weights(), layer.get_weights(), strict=True):
            if not np.array_equal(a, b):
                raise DareError(f"synchronization failed on layer {layer.name!r}")
        done.append(layer.name)
    return done


def weights_equal(a: keras.Model, b: keras.Model, names: Sequence[str]) -> bool:
    """Whether layers ``names`` hold bit-identical weights in ``a`` and ``b``."""
    return all(np.array_equal(u, v)
               for n in names
               for u, v in zip(a.get_layer(n).get_weights(), b.get_layer(n).get_weights(),
                               strict=True))


# --------------------------------------------------------------------------- trainers
@dataclass(frozen=True)
class Tuned:
    rows: list[dict[str, Any]]
    regression_model: keras.Model | None


def tune_regression(model: keras.Model, mined: MineResult, masks: Mapping[str, np.ndarray] | None,
                    layers: Sequence[str], cfg: DareConfig, eval_sets: EvalSets,
                    log_path: Any, callbacks: Sequence[keras.callbacks.Callback] = ()) -> Tuned:
    """DARE / DARE-S: fine-tune R (sharing ``model``'s layers) on the masked regression loss.

    R is built, compiled and fitted under the strategy ``model`` was built under."""
    with distribute.model_scope(model):
        r = trace_model(model, layers)
    units = {n: int(o.shape[-1]) for n, o in zip(layers, r.outputs, strict=True)}
    m = sample_masks(masks, mined.y, units)
    y_true = [np.concatenate([mined.targets[n], m[n]], axis=1) for n in layers]
    with frozen_batchnorm(model), distribute.model_scope(model):
        r.compile(optimizer=keras.optimizers.SGD(cfg.lr), loss=[LOSSES[cfg.loss]] * len(layers))
        distribute.build_optimizer(r)  # keras-team/keras#23085
        log = EpochLog(model, eval_sets, log_path, {"variant": cfg.variant})
        r.fit(mined.x, y_true, epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True,
              callbacks=[*callbacks, keras.callbacks.TerminateOnNaN(), log], verbose=cfg.verbose)
    return Tuned(log.rows, r)


def tune_classifier(model: keras.Model, mined: MineResult, cfg: DareConfig,
                    eval_sets: EvalSets, log_path: Any,
                    callbacks: Sequence[keras.callbacks.Callback] = ()) -> Tuned:
    """DARE-SL: cross-entropy fine-tuning of the classifier itself (no R, no slice)."""
    ft = FinetuneConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                        devices=cfg.devices, precision=cfg.precision)
    rows = finetune_ce(model, mined.x, mined.y, ft, eval_sets=eval_sets, log_path=log_path,
                       verbose=cfg.verbose, extra={"variant": cfg.variant}, callbacks=callbacks)
    return Tuned(rows, None)


# --------------------------------------------------------------------------- the pipeline
OK, DIVERGED, NOOP = "ok", "diverged", "no-op"
NOT_RESULTS = (DIVERGED, NOOP)
"""Statuses of a tuning run that is not a result: no model is saved and the evaluation and
the report show the status instead of figures."""


def empty_slice_classes(masks: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """``{layer: [classes]}`` whose slice in ``layer`` is empty (an all-false mask row): NNSlicer
    profiled no image of the class (none was classified correctly), so DARE's loss is zero on
    that class's inputs there and they teach nothing."""
    return {name: [int(c) for c in np.flatnonzero(~np.asarray(m, bool).any(axis=-1))]
            for name, m in masks.items() if not np.asarray(m, bool).any(axis=-1).all()}


@dataclass(frozen=True)
class DareResult:
    """A tuned classifier. ``status``: ``ok``; ``diverged`` (the weights became NaN/inf:
    ``model`` then holds them and must not be used); or ``no-op`` (the weights did not move
    beyond ``cfg.min_rel_change``: ``model`` is the original, and the run is not a result).
    ``rows``: the per-epoch log."""

    model: keras.Model
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    regression_model: keras.Model | None  # R (None for DARE-SL)
    status: str = OK


def tune(model: keras.Model, mined: MineResult, cfg: DareConfig, *,
         masks: Mapping[str, np.ndarray] | None = None, layers: Sequence[str] = (),
         eval_sets: EvalSets | None = None, log_path: Any = None,
         callbacks: Sequence[keras.callbacks.Callback] = ()) -> DareResult:
    """Stage 3 on any model: fine-tune ``model`` in place with ``cfg.variant`` on Stage 2's
    data ``mined``; ``cfg.lr`` must be set.

    DARE needs ``masks`` (``{layer: (classes, units) bool}``, Stage 1) and ``layers`` (the
    sliced layers, the regression model's outputs); DARE-S needs ``layers``; DARE-SL neither.
    ``eval_sets`` (``{name: (x, y)}``) are logged per epoch, to ``log_path`` (CSV) if given;
    ``callbacks`` join ``fit``'s (e.g. ``finetune.tensorboard(...)``).
    A run whose weights become NaN or inf is returned with ``status="diverged"``, one whose
    weights did not move (largest relative change <= ``cfg.min_rel_change``) with
    ``status="no-op"``: neither is a result. Classes with an empty slice are warned about.
    ``cfg.seed`` seeds the shuffling; dropout masks come from the seeds ``model``'s layers drew
    when it was built: call ``seeding.set_seed`` before building it for a repeatable run.
    """
    t0 = time.perf_counter()
    variant = VARIANTS[cfg.variant]
    if cfg.lr is None:
        raise DareError("tune() needs cfg.lr (DareConfig.resolved(...) takes a default)")
    if len(mined.y) == 0:
        raise DareError("the mined data holds no collected inputs; nothing to fine-tune on")
    layers = tuple(layers)
    if variant.use_transform:
        if not layers:
            raise DareError(f"{variant.name} needs the sliced layers (layers=...)")
        missing = set(layers) - set(mined.targets)
        if missing:
            raise DareError(f"the mined data has no targets for {sorted(missing)}; mine with "
                            "the same layers")
    if variant.use_slice and masks is None:
        raise DareError(f"{variant.name} needs the slice (masks=...); DARE-S needs none")
    if variant.use_slice:
        empty = empty_slice_classes({n: masks[n] for n in layers if n in masks})
        present = set(np.unique(mined.y).tolist())
        for name, classes in empty.items():
            hit = sorted(present & set(classes))
            share = f" ({int(np.isin(mined.y, hit).sum())} of {len(mined.y)} samples)" \
                if hit else ""
            io.warn(f"{variant.name}: classes {classes} have an empty slice in layer {name!r} "
                    "(slicing profiled no correctly classified image of them); the loss "
                    f"ignores that layer for their inputs{share}")
    eval_sets = dict(eval_sets or {})
    set_seed(cfg.seed)
    if variant.use_transform:
        tuned = tune_regression(model, mined, masks if variant.use_slice else None, layers,
                                cfg, eval_sets, log_path, callbacks)
    else:
        tuned = tune_classifier(model, mined, cfg, eval_sets, log_path, callbacks)
    finite = not diverged(model, tuned.rows)
    last = tuned.rows[-1]
    moved = bool(finite and last["max_rel_change"] > cfg.min_rel_change)
    status = DIVERGED if not finite else OK if moved else NOOP
    summary = {
        "variant": asdict(variant), "status": status, "lr": cfg.lr,
        "samples": int(len(mined.y)), "anchors": int(mined.anchor.sum()),
        "moved": moved,
        "max_rel_change": last["max_rel_change"],
        "rel_change": {k[len("rel_change/"):]: v for k, v in last.items()
                       if k.startswith("rel_change/")},
        "accuracy_before": {k: tuned.rows[0][f"{k}_accuracy"] for k in eval_sets},
        "accuracy_after": {k: last[f"{k}_accuracy"] for k in eval_sets},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if finite and variant.use_transform:
        summary["synchronized_layers"] = synchronize(tuned.regression_model, model)
    if status == NOOP:
        summary["why"] = (f"the weights did not move (largest relative change "
                          f"{last['max_rel_change']:.3g} <= {cfg.min_rel_change:g}); try a "
                          "larger lr")
        io.warn(f"{variant.name} at lr {cfg.lr:g}: {summary['why']}; this run is not a "
                "result")
    return DareResult(model, summary, tuned.rows, tuned.regression_model, summary["status"])


def tune_run(run: Run, cfg: DareConfig, log: Callable[[str], Any] = print,
             log_path: Any = None) -> DareResult:
    """Fine-tune (a fresh copy of) the run's final classifier with ``cfg``; save nothing but
    the per-epoch log (``log_path``, default ``dare/<variant>_log.csv``).

    The classifier is loaded and tuned under ``cfg.devices`` / ``cfg.precision``; the result's
    ``model`` is a plain float32 classifier (no strategy) with the tuned weights, and its
    summary records the distribution."""
    variant = VARIANTS[cfg.variant]
    cfg = cfg.resolved(run.dare_lr)
    dist = distribute.distribution(cfg.devices, cfg.precision)
    dist.check_batch(cfg.batch_size)
    layers = run.trace_layers
    mined = load_mined(run)
    log_path = log_path or run.file(layout.dare_log(variant.name))
    log(f"{variant.name}: {variant.summary}; {len(mined.y)} samples, lr {cfg.lr:g}, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}")
    log(dist.summary(cfg.batch_size))
    with dist.scope():  # the classifier, and R sharing its layers, live on --devices
        # Seeded before the model is built: its dropout layers draw their seeds then, so the
        # run depends on cfg.seed alone, not on what ran earlier in this process.
        set_seed(cfg.seed)
        model = run.load_model()
        units = {n: int(model.get_layer(n).output.shape[-1]) for n in layers}
        masks = load_masks(run, units, int(model.output.shape[-1])) if variant.use_slice \
            else None
        result = tune(model, mined, cfg, masks=masks, layers=layers,
                      eval_sets=run.eval_sets(), log_path=log_path,
                      callbacks=tensorboard(cfg.tensorboard,
                                            run.file(layout.tensorboard_for(log_path))))
    if dist.replicas > 1 or dist.precision != "float32":
        result = replace(result, model=distribute.plain_copy(result.model, run.build_model))
    return replace(result, summary={**result.summary, "log": str(log_path),
                                    "distribution": dist.describe(cfg.batch_size)})


def save_result(run: Run, cfg: DareConfig, result: DareResult,
                log: Callable[[str], Any] = print) -> DareResult:
    """Save a tuned classifier as ``models/<variant>`` (checked against the tuned weights) and
    its summary as ``dare/<variant>.json``; a result that is not one (``diverged``, ``no-op``)
    saves no model (and removes an older one) and its summary says which, and why."""
    variant = VARIANTS[cfg.variant]
    cfg = cfg.resolved(run.dare_lr)
    summary, model = dict(result.summary), result.model
    if result.status in NOT_RESULTS:
        run.remove_model(variant.name)
        run.write_config(layout.dare_summary(variant.name), "dare",
                         {**asdict(cfg), "summary": summary})
        what = "diverged" if result.status == DIVERGED else "was a no-op"
        why = "the weights became NaN/inf" if result.status == DIVERGED else summary["why"]
        log(f"{variant.name} {what} at lr {cfg.lr:g} ({why}; log {summary.get('log')}); "
            "nothing was saved: this run is not a result")
        return replace(result, summary=summary)
    path = run.save_model(model, variant.name)
    saved = run.load_named(variant.name)
    reference = model if result.regression_model is None else result.regression_model
    check = summary.get("synchronized_layers") or [la.name for la in model.layers if la.weights]
    if not weights_equal(saved, reference, check):
        raise DareError(f"the saved classifier {path} does not carry the tuned weights")
    summary.update({"model_file": str(path), "saved_matches_tuned": True})
    run.write_config(layout.dare_summary(variant.name), "dare",
                     {**asdict(cfg), "summary": summary})
    acc0, acc1 = summary["accuracy_before"], summary["accuracy_after"]
    log(f"{variant.name}: validation accuracy {acc0['validation']:.4f} -> "
        f"{acc1['validation']:.4f}, test {acc0['test']:.4f} -> {acc1['test']:.4f}; "
        f"largest relative weight change {summary['max_rel_change']:.3g}; saved {path}")
    return replace(result, summary=summary)


def run_dare(run: Run, cfg: DareConfig, log: Callable[[str], Any] = print) -> DareResult:
    """Fine-tune the run's final classifier with ``cfg.variant``; save ``models/<variant>``.

    Writes ``dare/<variant>_log.csv`` (per epoch) and ``dare/<variant>.json`` (summary, with
    ``status``). A run that diverges, or whose weights did not move, saves no model: its
    summary says ``diverged`` or ``no-op`` (with the learning rate and the log), the
    evaluation and the report show it as such, and the result is returned for the caller to
    decide (the scripts stop with an error and a non-zero exit, a study goes on).
    """
    return save_result(run, cfg, tune_run(run, cfg, log), log)
