"""Stage 2: augmentation by delta debugging over the training history (``dare/get_ats.py``).

As ``docs/method.md`` (Stage 2) describes:

1. Each historical model M_k (k = 1..E) takes a disjoint, seeded share of ``x_validation`` and
   gives each of its inputs a direction ``delta = eps_mine * sign(grad_x CE(M_k(x), y))``.
2. Inputs the final model M_E misclassifies clean are skipped (ddmin needs ``test([])`` to
   pass); inputs M_E still classifies correctly at ``x + delta`` are not collected.
3. For the rest, ddmin over the perturbation's 4x4-pixel patches (all channels together) with
   ``test(S) = "M_E misclassifies clip(x + delta|S, 0, 1)"`` gives a 1-minimal S*; the
   collected input is ``x' = clip(x + delta|S*, 0, 1)``. All inputs' ddmin runs advance
   together: one batched M_E call per round (``ddmin.ddmin_batched``).
4. Regression data: the target of x' is M_E's activation traces of the sliced layers on the
   clean x (``traces.get_ats``); the clean x joins with the same target as an anchor.
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from darekit import backend as B
from darekit import io, layout
from darekit.config import option
from darekit.data import DATASETS, dataset_spec
from darekit.ddmin import Subset, ddmin_batched
from darekit.errors import DareError
from darekit.rundir import Run
from darekit.traces import get_ats

TARGET = "target/"  # key prefix of the per-layer targets in data.npz
ORDERS = ("gain", "grid")


@dataclass(frozen=True)
class MineConfig:
    """Options of ``dare/get_ats.py`` (Stage 2)."""

    eps_mine: float | None = option(
        None, "L-inf size of the historical models' directions",
        default_text=lambda: "1.5x the dataset's L-inf budget: " + ", ".join(
            f"{name} {spec.mining_eps:.4g}" for name, spec in sorted(DATASETS.items())))
    patch: int = option(4, "side of the square pixel patches ddmin works on")
    max_inputs: int | None = option(None, "mine a seeded subset of N x_validation inputs",
                                    default_text="all of x_validation")
    anchors: bool = option(True, "add each collected input's clean x with the same target")
    batch_size: int = option(256, "images per model call")
    seed: int = option(0, "seeds the history's shares of x_validation and the subset")
    order: str = option("gain", "order of the patches given to ddmin: by the final model's "
                        "first-order loss gain, or row-major (same 1-minimal guarantee; "
                        "fewer queries with gain)", choices=ORDERS)
    progress: bool = option(True, "progress bars (the history's directions, then ddmin)")

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise DareError(f"--order must be one of {list(ORDERS)}; received {self.order!r}")
        if self.eps_mine is not None and not 0 < self.eps_mine <= 1:
            raise DareError(f"--eps-mine must lie in (0, 1]; received {self.eps_mine}")
        if self.patch < 1 or self.batch_size < 1:
            raise DareError(f"--patch and --batch-size must be positive; received "
                            f"{self.patch}, {self.batch_size}")
        if self.max_inputs is not None and self.max_inputs < 1:
            raise DareError(f"--max-inputs must be positive; received {self.max_inputs}")

    def resolved(self, dataset: str) -> MineConfig:
        """The config with ``eps_mine`` filled in from the dataset's default."""
        if self.eps_mine is not None:
            return self
        return replace(self, eps_mine=dataset_spec(dataset).mining_eps)


# --------------------------------------------------------------------------- model calls
class LabelPredictor:
    """``model``'s predicted labels, compiled once, its weights passed on each call. On
    TensorFlow one trace serves any batch size (no padding: the last ddmin rounds have few
    active inputs and must stay cheap); on JAX every batch is padded to a power of two
    (``B.FINE_BUCKETS``: a new shape compiles again there), so a round of 3 inputs costs a
    4-row call, not a 32-row one. On the dry profile's VGG16 (fake CIFAR-10, JAX, CPU) ddmin
    asked 2,526 queries in 326 rounds, which cost 3,587 rows; padded to 32, at least 10,432."""

    def __init__(self, model: keras.Model, batch_size: int):
        self.batch_size = batch_size
        self.calls = 0  # model calls (batches), for the statistics
        self.rows = 0  # rows those calls computed, padding included
        # No XLA on TensorFlow: the labels stay those of the graph-mode predictor before the
        # port (JAX always compiles with XLA).
        self._fn = B.model_function(model, lambda call, x: ops.argmax(call(x), axis=-1),
                                    jit_compile=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=np.int64)
        for i in range(0, len(x), self.batch_size):
            n, xb = _bucketed(x[i:i + self.batch_size], self.batch_size, fine=True)
            out[i:i + n] = B.to_numpy(self._fn(ops.convert_to_tensor(xb)))[:n]
            self.calls += 1
            self.rows += len(xb)
        return out


def _bucketed(xb: np.ndarray, batch_size: int, fine: bool = False) -> tuple[int, np.ndarray]:
    """``(len(xb), xb)`` as float32, padded to a ``B.bucket`` size on JAX (rows dropped)."""
    n, xb = len(xb), np.asarray(xb, np.float32)
    if B.needs_buckets(False):
        xb = B.pad_rows(xb, B.bucket(n, batch_size, fine=fine))
    return n, xb


def input_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray,
                    batch_size: int = 256) -> np.ndarray:
    """``grad_x CE(model(x), y)`` per input, ``(N, H, W, C)`` float32 (inference mode)."""
    grad = _GRADIENTS.get(model)
    if grad is None:
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
        # Compiled without XLA on TensorFlow, as before the port: the directions are signs of
        # these gradients, and XLA's fusions could flip the sign of a near-zero component.
        # One function per model object, of its current weights: loading other weights into
        # the model (``_OneModel``) reuses its compilations.
        grad = _GRADIENTS[model] = B.model_function(
            model, lambda call, xb, yb: B.grad(lambda z: ce(yb, call(z)))(xb),
            jit_compile=False)
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, len(x), batch_size):
        n, xb = _bucketed(x[i:i + batch_size], batch_size)
        yb = B.pad_rows(np.asarray(y[i:i + batch_size]), len(xb))
        out[i:i + n] = B.to_numpy(grad(ops.convert_to_tensor(xb),
                                       ops.convert_to_tensor(yb)))[:n]
    return out


def fgsm_directions(model: keras.Model, x: np.ndarray, y: np.ndarray, eps: float,
                    batch_size: int = 256) -> np.ndarray:
    """``eps * sign(grad_x CE(model(x), y))``, ``(N, H, W, C)`` float32."""
    return (eps * np.sign(input_gradients(model, x, y, batch_size))).astype(np.float32)


def patch_ids(height: int, width: int, patch: int) -> np.ndarray:
    """``(H, W)`` int: the patch each pixel belongs to (row-major grid of ``patch`` squares)."""
    rows = np.arange(height) // patch
    cols = np.arange(width) // patch
    return rows[:, None] * (-(-width // patch)) + cols[None, :]


# --------------------------------------------------------------------------- ddmin on patches
@dataclass(frozen=True)
class Minimized:
    """Result of ``minimize_deltas`` for n inputs."""

    patches: list[np.ndarray]  # per input, the patch ids of S*
    masks: np.ndarray  # (n, H, W) bool, the pixels of S*
    queries: np.ndarray  # (n,) ddmin queries of each input
    rounds: int  # batched model calls rounds (one per ddmin step of the longest run)


def minimize_deltas(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
                    delta: np.ndarray, patch: int,
                    priority: np.ndarray | None = None,
                    finished: Callable[[int], Any] | None = None) -> Minimized:
    """ddmin over each input's perturbation patches, all inputs batched together.

    Every ``x + delta`` must already be misclassified (``predict(x+delta) != y``) and every
    clean ``x`` classified correctly; patches where ``delta`` is zero are not items.

    Args:
        predict: labels of a batch of images ``(B, H, W, C) -> (B,)``.
        x, delta: ``(n, H, W, C)``; ``y``: ``(n,)``.
        priority: ``(n, H, W)`` per-pixel scores; each input's patches are listed to ddmin in
            decreasing order of their summed score (None: grid order). ddmin splits its list
            into contiguous parts, so putting the likely culprits together saves queries.
        finished: called after each round with how many inputs' searches ended in it.
    """
    n, h, w = x.shape[:3]
    grid = patch_ids(h, w, patch)
    n_patches = int(grid.max()) + 1
    nonzero = np.zeros((n, n_patches), dtype=bool)
    np.logical_or.at(nonzero.T, grid.ravel(), np.any(delta != 0, axis=-1).reshape(n, h * w).T)
    items = [np.flatnonzero(row) for row in nonzero]
    if priority is not None:
        score = np.zeros((n, n_patches))
        np.add.at(score.T, grid.ravel(), priority.reshape(n, h * w).T)
        items = [it[np.argsort(-score[i, it], kind="stable")] for i, it in enumerate(items)]
    if any(len(it) == 0 for it in items):
        raise DareError("an input with a zero perturbation cannot be misclassified")
    rounds = 0

    def pixel_masks(pairs: Sequence[tuple[int, Subset]]) -> np.ndarray:
        on = np.zeros((len(pairs), n_patches), dtype=bool)
        for q, (i, s) in enumerate(pairs):
            on[q, items[i][list(s)]] = True
        return on[:, grid]  # (Q, H, W)

    def test_batch(pairs: list[tuple[int, Subset]]) -> np.ndarray:
        nonlocal rounds
        rounds += 1
        idx = np.array([i for i, _ in pairs])
        xq = np.clip(x[idx] + delta[idx] * pixel_masks(pairs)[..., None], 0.0, 1.0)
        return predict(xq.astype(np.float32)) != y[idx]

    subsets, queries = ddmin_batched([len(it) for it in items], test_batch, known_failing=True,
                                     finished=finished)
    pairs = list(enumerate(subsets))
    masks = pixel_masks(pairs) if pairs else np.zeros((0, h, w), bool)
    return Minimized([np.sort(items[i][list(s)]) for i, s in pairs], masks, queries, rounds)


# --------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class MineResult:
    """The regression data of ``ats/data.npz`` and the statistics of ``ats/stats.json``."""

    x: np.ndarray  # (M, H, W, C) collected inputs, then their anchors
    y: np.ndarray  # (M,) true labels
    targets: dict[str, np.ndarray]  # {layer: (M, units)} M_E's traces on the clean inputs
    anchor: np.ndarray  # (M,) bool
    epoch: np.ndarray  # (M,) the historical epoch whose direction mined the input
    index: np.ndarray  # (M,) index into x_validation
    patches: np.ndarray  # (M,) |S*| (0 for anchors)
    stats: dict[str, Any]


def _distribution(v: np.ndarray) -> dict[str, float]:
    if len(v) == 0:
        return {"count": 0}
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return {"count": int(len(v)), "mean": float(v.mean()), "min": float(q[0]),
            "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "max": float(q[4])}


HistoryModel = keras.Model | str | os.PathLike | Callable[[], keras.Model]
"""One model of a training history: a model, a checkpoint file (``.keras``, or
``.weights.h5`` of the final model's architecture), or a function that loads one."""


_GRADIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _OneModel:
    """The historical models as weights loaded into one model object: the input gradient is
    then compiled once for the whole history, not once per epoch (on JAX a compilation per
    epoch is seconds each for a VGG on a GPU, 40 of them per run). A model whose weights do not
    fit the first one's (another architecture in the history) is used as it is."""

    def __init__(self) -> None:
        self.model: keras.Model | None = None

    @staticmethod
    def _shapes(model: keras.Model) -> list[tuple[int, ...]]:
        return [tuple(w.shape) for w in model.weights]

    def __call__(self, model: keras.Model) -> keras.Model:
        if self.model is None:
            try:
                self.model = keras.models.clone_model(model)
            except Exception:  # a model Keras cannot clone (subclassed): one per epoch
                return model
        if self._shapes(self.model) != self._shapes(model):
            return model
        self.model.set_weights(model.get_weights())
        return self.model


def load_history_model(item: HistoryModel, like: keras.Model) -> keras.Model:
    """The model ``item`` stands for; a ``.weights.h5`` file is loaded into a copy of
    ``like``'s architecture. A ``.keras`` checkpoint of a model with a softmax output (what
    ``ModelCheckpoint`` saves of such a model) is read up to its logits: the directions are
    gradients of the cross-entropy on logits."""
    if isinstance(item, keras.Model):
        return item
    if callable(item):
        return item()
    path = Path(item)
    if not path.is_file():
        raise DareError(f"history checkpoint {path} does not exist")
    if path.name.endswith(".keras"):
        from darekit.importer import as_logits

        return as_logits(keras.saving.load_model(path, compile=False))
    model = keras.models.clone_model(like)
    model.load_weights(str(path))
    return model


def mine(history: Sequence[HistoryModel], final_model: keras.Model, x_validation: np.ndarray,
         y_validation: np.ndarray, layers: Sequence[str], cfg: MineConfig, *,
         epochs: Sequence[int] | None = None, log: Callable[[str], Any] = print) -> MineResult:
    """Stage 2 on any model: mine ``x_validation`` ``(N, H, W, C)`` with ``history`` (the
    models of every epoch, oldest first; loaded one at a time) against ``final_model``, and
    build the regression data on the traces of ``layers``.

    ``cfg.eps_mine`` must be set (``MineConfig.resolved(dataset)`` takes the dataset's);
    ``epochs`` labels the history (default 1..E) in the statistics.
    """
    t0 = time.perf_counter()
    if cfg.eps_mine is None:
        raise DareError("mine() needs cfg.eps_mine; MineConfig(...).resolved(dataset) "
                        "takes the dataset's default")
    if not history:
        raise DareError("mining needs at least one historical model")
    if len(x_validation) != len(y_validation) or len(x_validation) == 0:
        raise DareError(f"cannot mine {len(x_validation)} inputs with "
                        f"{len(y_validation)} labels")
    epochs = list(range(1, len(history) + 1)) if epochs is None else [int(e) for e in epochs]
    if len(epochs) != len(history):
        raise DareError(f"{len(epochs)} epoch labels for {len(history)} historical models")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(x_validation))
    if cfg.max_inputs is not None:
        order = np.sort(order[:cfg.max_inputs])
    x_all, y_all = x_validation[order], y_validation[order]
    shares = np.array_split(rng.permutation(len(order)), len(epochs))

    delta = np.empty_like(x_all)
    mined_by = np.empty(len(order), dtype=np.int64)
    bar = tqdm(total=len(order), desc="mining: directions", unit="img", leave=False,
               disable=not cfg.progress)
    one = _OneModel()
    for item, epoch, share in zip(history, epochs, shares, strict=True):
        bar.set_postfix_str(f"epoch {epoch}")
        model_k = one(load_history_model(item, final_model))
        delta[share] = fgsm_directions(model_k, x_all[share], y_all[share], cfg.eps_mine,
                                       cfg.batch_size)
        mined_by[share] = epoch
        del model_k
        bar.update(len(share))
    bar.close()
    t_grad = time.perf_counter() - t0

    final = final_model
    predict = LabelPredictor(final, cfg.batch_size)
    clean_ok = predict(x_all) == y_all
    fails = np.zeros(len(order), dtype=bool)
    fails[clean_ok] = predict(np.clip(x_all[clean_ok] + delta[clean_ok], 0, 1)) != y_all[clean_ok]
    cand = np.flatnonzero(fails)
    log(f"{len(order)} inputs, {clean_ok.sum()} classified correctly by epoch {epochs[-1]}, "
        f"{len(cand)} misclassified at x + delta; ddmin over {cfg.patch}x{cfg.patch} patches")
    t1 = time.perf_counter()
    priority = None
    if cfg.order == "gain":
        grads = input_gradients(final, x_all[cand], y_all[cand], cfg.batch_size)
        priority = (delta[cand] * grads).sum(axis=-1)
    bar = tqdm(total=len(cand), desc="mining: ddmin", unit="img", leave=False,
               disable=not cfg.progress)
    mini = minimize_deltas(predict, x_all[cand], y_all[cand], delta[cand], cfg.patch, priority,
                           finished=bar.update)
    bar.close()
    t_ddmin = time.perf_counter() - t1
    x_mined = np.clip(x_all[cand] + delta[cand] * mini.masks[..., None], 0, 1).astype(np.float32)

    clean_targets = get_ats(final, x_all[cand], layers, cfg.batch_size)
    k = 2 if cfg.anchors else 1
    sizes = np.array([len(p) for p in mini.patches], dtype=np.int64)
    result = MineResult(
        x=np.concatenate([x_mined] + [x_all[cand]] * (k - 1)),
        y=np.tile(y_all[cand], k),
        targets={n: np.tile(t, (k, 1)) for n, t in clean_targets.items()},
        anchor=np.repeat([False, True][:k], len(cand)),
        epoch=np.tile(mined_by[cand], k),
        index=np.tile(order[cand], k),
        patches=np.concatenate([sizes] + [np.zeros_like(sizes)] * (k - 1)),
        stats={},
    )
    n_grid = int(patch_ids(*x_all.shape[1:3], cfg.patch).max()) + 1
    screening = len(order) + int(clean_ok.sum())  # the clean and the x + delta queries
    result.stats.update({
        "inputs": int(len(order)),
        "clean_correct": int(clean_ok.sum()),
        "failures": int(len(cand)),
        "failure_rate": float(len(cand) / max(int(clean_ok.sum()), 1)),
        "collected": int(len(cand)),
        "anchors": int(len(cand) if cfg.anchors else 0),
        "samples": int(len(result.y)),
        "patches_per_image": n_grid,
        "s_star_size": _distribution(sizes),
        "s_star_fraction_of_patches": float(sizes.mean() / n_grid) if len(sizes) else None,
        "ddmin_queries_per_collected_input": _distribution(mini.queries),
        "model_queries_per_input": float((screening + mini.queries.sum()) / len(order)),
        "ddmin_rounds": mini.rounds,
        "model_calls": predict.calls,
        "model_rows": predict.rows,  # > the queries where batches were padded (JAX)
        "mining_epochs": {int(e): int(np.sum(mined_by == e)) for e in epochs},
        "collected_by_epoch": {int(e): int(np.sum(mined_by[cand] == e)) for e in epochs},
        "final_epoch": int(epochs[-1]),
        "seconds": {"gradients": round(t_grad, 3), "ddmin": round(t_ddmin, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    })
    return result


def run_mining(run: Run, cfg: MineConfig, log: Callable[[str], Any] = print) -> MineResult:
    """Stage 2 on ``run`` (its history, final model, ``x_validation`` but the held-out images
    of ``holdout.npz`` if any, and trace layers); writes ``ats/data.npz`` and ``stats.json``."""
    cfg = cfg.resolved(run.dataset_name)
    epochs = run.history_epochs()
    data = run.data()
    # Validation images held out for the learning-rate selection (tuning) are never mined.
    keep = np.arange(len(data.y_validation))
    if run.file(layout.HOLDOUT).is_file():
        keep = np.setdiff1d(keep, io.read_npz(run.file(layout.HOLDOUT))["idx"])
        log(f"{len(data.y_validation) - len(keep)} validation images are held out "
            f"({layout.HOLDOUT}); mining the other {len(keep)}")
    result = mine([functools.partial(run.load_model, e) for e in epochs], run.load_model(),
                  data.x_validation[keep], data.y_validation[keep], run.trace_layers, cfg,
                  epochs=epochs, log=log)
    result = replace(result, index=keep[result.index])  # indices into the whole x_validation
    io.write_npz(run.file(layout.MINED), x=result.x, y=result.y, anchor=result.anchor,
                 epoch=result.epoch, index=result.index, patches=result.patches,
                 **{TARGET + n: t for n, t in result.targets.items()})
    io.write_json(run.file(layout.MINED_STATS), {"mine": asdict(cfg), "stats": result.stats,
                                                 "run": str(run.path)})
    return result


def load_mined(run: Run) -> MineResult:
    """Read ``ats/`` back (``DareError`` if Stage 2 has not run)."""
    path = run.file(layout.MINED)
    if not path.is_file():
        raise DareError(f"run {run.path} has no {layout.MINED}; run dare/get_ats.py --run-dir "
                        f"{run.path} first")
    z = io.read_npz(path)
    stats_path = run.file(layout.MINED_STATS)
    stats = io.read_json(stats_path)["stats"] if stats_path.is_file() else {}
    targets = {k[len(TARGET):]: v for k, v in z.items() if k.startswith(TARGET)}
    return MineResult(z["x"], z["y"], targets, z["anchor"], z["epoch"], z["index"],
                      z["patches"], stats)
