"""Stage 1: NNSlicer's contribution analysis and DARE's per-class slices (``dare/nnslicer.py``).

For every class c, up to ``max_per_class`` correctly classified ``x_train`` images of class c are
profiled and sliced with criterion "the logit of c" (NNSlicer, FSE 2020; see
``research/nnslicer.md`` section 3 for the rules):

1. Reference: the mean activation of every neuron over the class's profiling images
   (``reference="class"``, as the NNSlicer code does) or over all profiling images (``"all"``).
2. Forward analysis: ``dx = x_in - mean`` for every layer input on the way back.
3. Backward analysis from ``CONTRIB[logit_c] = 1``. A weighted-sum op (Dense, Conv2D) computes
   for each traced output neuron n the synapse terms ``v_i = w_in * dx_i``, keeps the largest-|v|
   synapses whose partial sum reproduces ``dy_n = sum_i v_i`` within ``eps`` (NNSlicer's
   ``arg_abs_approx`` with its ``bar``) and adds ``sign(v_i) * sign(dy_n) * sign(CONTRIB_n)`` to
   each kept input. Max-pooling copies a window's contribution to its maximum (all tied maxima);
   Flatten reshapes; BatchNormalization, Dropout and ReLU pass contributions through (ReLU can
   gate them on active units, ``relu="gate"``).
4. Aggregation: a neuron's score is ``sum_x |CONTRIB|``; a conv channel's score sums its spatial
   positions. Per class and layer, the slice is the smallest set of units whose scores cover a
   fraction ``per`` of the layer's total (``cover_mask``).

Everything is vectorised: all traced (input, neuron) pairs of a layer are processed as one
matrix, in chunks. ``mode="approx"`` replaces step 3 by gradient x delta,
``|dx * d logit_c / dx|`` at each sliced layer: one backward pass, no sorting.
Only sequential chains are supported (VGG, AlexNet, smallcnn); the analysis walks back from
``logits`` to the earliest sliced layer and stops there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from darekit import io, layout
from darekit.errors import DareError
from darekit.models import LOGITS, get_architecture
from darekit.rundir import Run


@dataclass(frozen=True)
class SliceConfig:
    """Options of ``dare/nnslicer.py``; defaults as ``docs/method.md`` gives them.

    Attributes:
        per: fraction of each layer's aggregated |contribution| the slice covers, in (0, 1].
        max_per_class: K, the correctly classified ``x_train`` images profiled per class.
        eps: NNSlicer's ``sum_precision_error`` (kept synapses reproduce dy within eps).
        bar: NNSlicer's ``threshold_bar_ratio`` (near-ties of the last kept synapse enter).
        reference: ``"class"`` (class-conditional means) or ``"all"``.
        mode: ``"exact"`` (NNSlicer's backward analysis) or ``"approx"`` (gradient x delta).
        relu: ``"pass"`` (NNSlicer code: identity) or ``"gate"`` (active units only).
        batch_size: images per backward batch.
        seed: picks which K images of a class are profiled.
    """

    per: float = 0.95
    max_per_class: int = 200
    eps: float = 0.2
    bar: float = 0.01
    reference: str = "class"
    mode: str = "exact"
    relu: str = "pass"
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.per <= 1:
            raise DareError(f"--per must lie in (0, 1]; received {self.per}")
        if not 0 < self.eps < 1 or not 0 <= self.bar < 1:
            raise DareError(f"--eps must lie in (0, 1) and --bar in [0, 1); "
                            f"received {self.eps}, {self.bar}")
        if self.max_per_class < 1 or self.batch_size < 1:
            raise DareError("--max-per-class and --batch-size must be positive; received "
                            f"{self.max_per_class}, {self.batch_size}")
        for name, allowed in (("reference", REFERENCES), ("mode", MODES), ("relu", RELU_RULES)):
            if getattr(self, name) not in allowed:
                raise DareError(f"--{name} must be one of {list(allowed)}; "
                                f"received {getattr(self, name)!r}")


REFERENCES = ("class", "all")
RELU_RULES = ("pass", "gate")
_CHUNK = 1 << 22  # elements of one synapse matrix chunk (16 MiB of float32)


# --------------------------------------------------------------------------- selection
def select_synapses(v: np.ndarray, eps: float, bar: float,
                    valid: np.ndarray | None = None) -> np.ndarray:
    """NNSlicer's ``arg_abs_approx`` per row: which synapses of each neuron are kept.

    Args:
        v: ``(P, n)`` synapse terms ``w_i * dx_i`` of P neurons.
        valid: ``(P, n)`` bool, the synapses that exist (a conv window clipped at the border
            has fewer); None: all.
    Returns:
        ``(P, n)`` bool: the largest-|v| synapses whose signed partial sum is within
        ``eps * |dy|`` of ``dy = v.sum(1)``, plus near-ties (``bar``); empty rows where
        ``dy`` is ~0 (the neuron drops out of the slice).
    """
    p, n = v.shape
    if valid is None:
        valid = np.ones(v.shape, dtype=bool)
    rows = np.arange(p)
    a = np.where(valid, np.abs(v), -1.0)  # missing synapses sort last
    nvalid = valid.sum(axis=1)
    s = np.where(valid, v, 0.0).sum(axis=1)
    order = np.argsort(-a, axis=1, kind="stable")
    sv = np.take_along_axis(np.where(valid, v, 0.0), order, axis=1)
    hit = np.abs(np.cumsum(sv, axis=1) - s[:, None]) < eps * np.abs(s)[:, None]
    hit[rows, np.maximum(nvalid - 1, 0)] = True  # the full sum equals dy up to rounding
    k = np.argmax(hit, axis=1)
    thr = np.abs(sv[rows, k]) * (1 - bar)
    keep = valid & (np.abs(v) > thr[:, None])
    smallest = np.abs(sv[rows, np.maximum(nvalid - 1, 0)])
    dead = (np.abs(s) < smallest) | (np.abs(s) < 1e-3 * np.abs(sv[:, 0])) | (s == 0)
    keep[dead] = False
    single = (1.0 / np.maximum(nvalid, 1) >= 1 - eps) & (nvalid > 0)
    if single.any():  # a single synapse always explains its neuron: keep its argmax
        best = np.argmax(np.where(valid, v, -np.inf), axis=1)
        keep[single] = np.arange(n)[None, :] == best[single, None]
    return keep


def _signed(v: np.ndarray, c: np.ndarray, cfg: SliceConfig,
            valid: np.ndarray | None = None) -> np.ndarray:
    """``sign(v_i) sign(dy) sign(CONTRIB_n)`` on kept synapses, 0 elsewhere: ``(P, n)``."""
    keep = select_synapses(v, cfg.eps, cfg.bar, valid)
    sign = np.sign(v) * (np.sign(v.sum(axis=1)) * np.sign(c))[:, None]
    return np.where(keep, sign, 0.0).astype(np.float32)


def _accumulate(rows: np.ndarray, vals: np.ndarray, out: np.ndarray) -> None:
    """``out[rows[i]] += vals[i]`` for sorted ``rows`` (one reduceat, no Python loop)."""
    if len(rows) == 0:
        return
    uniq, start = np.unique(rows, return_index=True)
    out[uniq] += np.add.reduceat(vals, start, axis=0)


# --------------------------------------------------------------------------- layer rules
Rule = Callable[[keras.layers.Layer, np.ndarray, np.ndarray, np.ndarray, SliceConfig],
                np.ndarray]
"""``rule(layer, x_in (B, ...), mean_in (B or 1, ...), contrib_out (B, ...), cfg)
-> contrib_in (B, ...)``."""


def _weighted_sum(patches: np.ndarray, kernel: np.ndarray, c_out: np.ndarray,
                  cfg: SliceConfig, valid: np.ndarray | None = None) -> np.ndarray:
    """Shared Dense/Conv rule on flattened receptive fields.

    ``patches (R, F)``: the dx of each output position's receptive field; ``kernel (F, O)``;
    ``c_out (R, O)``; ``valid (R, F)``: which field cells lie inside the image (None: all).
    Returns the contributions on the receptive fields, ``(R, F)``.
    """
    rows, cols = np.nonzero(c_out)
    g = np.zeros(patches.shape, dtype=np.float32)
    step = max(1, _CHUNK // patches.shape[1])
    for i in range(0, len(rows), step):
        r, j = rows[i:i + step], cols[i:i + step]
        v = patches[r] * kernel[:, j].T
        _accumulate(r, _signed(v, c_out[r, j], cfg, None if valid is None else valid[r]), g)
    return g


def _dense(layer, x_in, ref_in, c_out, cfg):
    if layer.activation is not keras.activations.linear:
        raise DareError(f"Dense layer {layer.name!r} has a built-in activation; slicing "
                        "needs separate activation layers")
    dx = (x_in - ref_in).astype(np.float32)
    return _weighted_sum(dx, np.asarray(layer.kernel), c_out, cfg)


def _extract(x: tf.Tensor, layer: keras.layers.Conv2D) -> tf.Tensor:
    kh, kw = layer.kernel_size
    (sh, sw), (dh, dw) = layer.strides, layer.dilation_rate
    return tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                    rates=[1, dh, dw, 1], padding=layer.padding.upper())


def _conv(layer, x_in, ref_in, c_out, cfg):
    if layer.data_format != "channels_last" or layer.groups != 1:
        raise DareError(f"Conv2D {layer.name!r}: only channels_last, groups=1 is supported")
    dx = tf.constant((x_in - ref_in).astype(np.float32))
    patches = _extract(dx, layer).numpy()
    b, ho, wo, f = patches.shape
    # Windows are clipped at the border, as NNSlicer does: padded cells are no synapses.
    inside = _extract(tf.ones((1, *dx.shape[1:])), layer).numpy().reshape(ho * wo, f) > 0
    valid = np.tile(inside, (b, 1))
    kernel = np.asarray(layer.kernel).reshape(f, -1)  # (kh*kw*Cin, Cout), the patches' order
    g = _weighted_sum(patches.reshape(-1, f), kernel, c_out.reshape(b * ho * wo, -1), cfg,
                      valid)
    with tf.GradientTape() as tape:  # the adjoint of extract_patches scatters fields back
        tape.watch(dx)
        p = _extract(dx, layer)
    return tape.gradient(p, dx, output_gradients=tf.constant(g.reshape(p.shape))).numpy()


def _maxpool(layer, x_in, ref_in, c_out, cfg):
    (ph, pw), (sh, sw) = layer.pool_size, layer.strides
    if (ph, pw) != (sh, sw) or layer.padding != "valid":
        raise DareError(f"MaxPooling2D {layer.name!r}: only non-overlapping valid pooling "
                        "is supported")
    b, ho, wo, ch = c_out.shape
    win = x_in[:, :ho * ph, :wo * pw].reshape(b, ho, ph, wo, pw, ch)
    at_max = win == win.max(axis=(2, 4), keepdims=True)  # every tied maximum, as NNSlicer
    c_in = np.zeros(x_in.shape, dtype=np.float32)
    c_in[:, :ho * ph, :wo * pw] = (at_max * c_out[:, :, None, :, None, :]).reshape(
        b, ho * ph, wo * pw, ch)
    return c_in


def _relu(layer, x_in, ref_in, c_out, cfg):
    return c_out * (x_in > 0) if cfg.relu == "gate" else c_out


def _identity(layer, x_in, ref_in, c_out, cfg):
    return c_out


def _flatten(layer, x_in, ref_in, c_out, cfg):
    return c_out.reshape(x_in.shape)


RULES: dict[type, Rule] = {
    keras.layers.Dense: _dense,
    keras.layers.Conv2D: _conv,
    keras.layers.MaxPooling2D: _maxpool,
    keras.layers.BatchNormalization: _identity,  # a positive-or-negative per-channel scale:
    keras.layers.Dropout: _identity,             # one synapse, so sign(v) sign(dy) = +1
    keras.layers.ReLU: _relu,
    keras.layers.Flatten: _flatten,
}


def rule_for(layer: keras.layers.Layer) -> Rule:
    for kind, rule in RULES.items():
        if isinstance(layer, kind):
            return rule
    if isinstance(layer, keras.layers.Activation) and layer.activation.__name__ == "relu":
        return _relu
    raise DareError(f"slicing does not support layer {layer.name!r} "
                    f"({type(layer).__name__}); supported: {[k.__name__ for k in RULES]}")


# --------------------------------------------------------------------------- the chain
@dataclass
class Chain:
    """The layers from the earliest sliced layer to ``logits`` of a sequential model.

    ``layers[0]`` is the earliest sliced layer; ``head`` maps images to its output.
    """

    model: keras.Model
    layers: list[keras.layers.Layer]
    trace_layers: tuple[str, ...]
    head: keras.Model = field(repr=False)

    @classmethod
    def of(cls, model: keras.Model, trace_layers: Sequence[str],
           logits: str = LOGITS) -> Chain:
        order = [layer.name for layer in model.layers]
        missing = [n for n in (*trace_layers, logits) if n not in order]
        if missing:
            raise DareError(f"model {model.name} has no layer(s) {missing}")
        first = min(order.index(n) for n in trace_layers)
        layers = model.layers[first:order.index(logits) + 1]
        for prev, layer in zip(layers, layers[1:], strict=False):
            if layer.input is not prev.output:  # a branch or a skip connection
                raise DareError(f"slicing needs a sequential chain; {layer.name!r} does not "
                                f"take {prev.name!r}'s output (model {model.name})")
            rule_for(layer)  # fail now on an unsupported layer, not half-way
        head = keras.Model(model.inputs[0], layers[0].output)
        return cls(model, layers, tuple(trace_layers), head)

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs of every chain layer, ``[(B, ...)]`` (inference mode)."""
        h = self.head(x, training=False)
        outs = [h]
        for layer in self.layers[1:]:
            h = layer(h, training=False)
            outs.append(h)
        return [np.asarray(o) for o in outs]

    def index(self, name: str) -> int:
        return [layer.name for layer in self.layers].index(name)


def contributions(chain: Chain, acts: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                  classes: np.ndarray, cfg: SliceConfig) -> dict[str, np.ndarray]:
    """NNSlicer's backward analysis for a batch (``mode="exact"``).

    Args:
        chain: the model's chain; ``acts``: ``chain.forward(x)``; ``refs``: the reference
            mean of each chain output, broadcastable to ``acts``; ``classes``: ``(B,)`` the
            criterion class (logit) of each input.
    Returns:
        ``{trace layer: (B, *output shape)}`` integer-valued signed contributions.
    """
    c = np.zeros(acts[-1].shape, dtype=np.float32)
    c[np.arange(len(classes)), classes] = 1.0
    out: dict[str, np.ndarray] = {}
    for i in range(len(chain.layers) - 1, -1, -1):
        layer = chain.layers[i]
        if layer.name in chain.trace_layers:
            out[layer.name] = c
        if i == 0:
            break
        c = rule_for(layer)(layer, acts[i - 1], refs[i - 1], c, cfg)
    return out


def approx_contributions(chain: Chain, x: np.ndarray, refs: Sequence[np.ndarray],
                         classes: np.ndarray, cfg: SliceConfig) -> dict[str, np.ndarray]:
    """Gradient x delta, ``(a - mean) * d logit_c / d a`` at each sliced layer ``(B, ...)``."""
    idx = {name: chain.index(name) for name in chain.trace_layers}
    with tf.GradientTape() as tape:
        h = chain.head(x, training=False)
        tape.watch(h)
        outs = [h]
        for layer in chain.layers[1:]:
            h = layer(h, training=False)
            outs.append(h)
        logit = tf.reduce_sum(h * tf.one_hot(classes, h.shape[-1]))
    grads = tape.gradient(logit, [outs[i] for i in idx.values()])
    return {name: (np.asarray(outs[i]) - refs[i]) * np.asarray(g)
            for (name, i), g in zip(idx.items(), grads, strict=True)}


def _exact(chain, x, acts, refs, classes, cfg):
    return contributions(chain, acts, refs, classes, cfg)


def _approx(chain, x, acts, refs, classes, cfg):
    return approx_contributions(chain, x, refs, classes, cfg)


MODES: dict[str, Callable[..., dict[str, np.ndarray]]] = {"exact": _exact, "approx": _approx}


def unit_scores(contrib: np.ndarray) -> np.ndarray:
    """``(B, units)``: |contribution| per neuron; conv maps ``(B, H, W, C)`` sum per channel."""
    a = np.abs(contrib)
    return a.sum(axis=tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a


def cover_mask(scores: np.ndarray, per: float) -> np.ndarray:
    """The smallest set of units whose ``scores`` ``(..., units)`` cover ``per`` of the total.

    Units are ranked by score (ties: lower index first); zero-score units never enter.
    Works on the last axis; returns a bool array of the same shape.
    """
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(s, order, axis=-1), axis=-1)
    total = cum[..., -1:]
    # k = number of units needed: the first rank where the cumulative sum reaches per*total.
    k = np.sum(cum < per * total * (1 - 1e-12), axis=-1, keepdims=True) + 1
    k = np.where(total > 0, k, 0)
    keep_sorted = np.arange(s.shape[-1]) < k
    mask = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask & (s > 0)


# --------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class SliceResult:
    """Aggregated scores ``{layer: (num_classes, units)}`` and how they were obtained."""

    scores: Mapping[str, np.ndarray]
    images: np.ndarray  # (num_classes,) profiled images per class
    seconds: float
    config: SliceConfig

    def masks(self, per: float | None = None) -> dict[str, np.ndarray]:
        """``{layer: (num_classes, units) bool}``, the slice of every class."""
        p = self.config.per if per is None else per
        return {name: cover_mask(s, p) for name, s in self.scores.items()}

    @property
    def images_per_second(self) -> float:
        return float(self.images.sum() / self.seconds) if self.seconds > 0 else float("nan")


def profiling_indices(model: keras.Model, x: np.ndarray, y: np.ndarray, num_classes: int,
                      k: int, seed: int, batch_size: int = 512) -> list[np.ndarray]:
    """Per class, up to ``k`` seeded indices of images the model classifies correctly."""
    pred = np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1)
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(np.flatnonzero((y == c) & (pred == c)))[:k])
            for c in range(num_classes)]


def slice_model(model: keras.Model, x: np.ndarray, y: np.ndarray,
                trace_layers: Sequence[str], cfg: SliceConfig,
                log: Callable[[str], Any] | None = None) -> SliceResult:
    """Per-class NNSlicer scores of ``trace_layers`` from ``x`` ``(N, H, W, C)``, ``y`` ``(N,)``."""
    t0 = time.perf_counter()
    chain = Chain.of(model, trace_layers)
    num_classes = int(model.output.shape[-1])
    picks = profiling_indices(model, x, y, num_classes, cfg.max_per_class, cfg.seed)
    bs = cfg.batch_size

    def batches(idx):
        for i in range(0, len(idx), bs):
            yield x[idx[i:i + bs]]

    # Pass 1: reference means of every chain output, per class (running sums, float64).
    sums: list[list[np.ndarray] | None] = [None] * num_classes
    for c, idx in enumerate(picks):
        for xb in batches(idx):
            acts = [a.sum(0, dtype=np.float64) for a in chain.forward(xb)]
            sums[c] = acts if sums[c] is None else [s + a for s, a in zip(sums[c], acts,
                                                                         strict=True)]
    counts = np.array([len(i) for i in picks])
    if counts.sum() == 0:
        raise DareError("the model classifies none of the profiling images correctly")
    class_means = [None if s is None else [a / n for a in s] for s, n in zip(sums, counts,
                                                                            strict=True)]
    present = [m for m in class_means if m is not None]
    all_means = [sum(m[i] * n for m, n in zip(class_means, counts, strict=True) if m is not None)
                 / counts.sum() for i in range(len(present[0]))]

    # Pass 2: backward analysis, aggregated per class.
    scores = {n: np.zeros((num_classes, int(model.get_layer(n).output.shape[-1])))
              for n in trace_layers}
    analyse = MODES[cfg.mode]
    for c, idx in enumerate(picks):
        if not len(idx):
            continue
        refs = [r.astype(np.float32) for r in (class_means[c] if cfg.reference == "class"
                                               else all_means)]
        for xb in batches(idx):
            acts = chain.forward(xb)
            contrib = analyse(chain, xb, acts, refs, np.full(len(xb), c), cfg)
            for name in trace_layers:
                scores[name][c] += unit_scores(contrib[name]).sum(0)
        if log is not None:
            log(f"class {c}: {len(idx)} images, {time.perf_counter() - t0:.1f}s")
    return SliceResult(scores, counts, time.perf_counter() - t0, cfg)


def mask_jaccard(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean Jaccard index over classes of two mask sets ``{layer: (classes, units)}``."""
    out = {}
    for name in a:
        inter = (a[name] & b[name]).sum(-1)
        union = (a[name] | b[name]).sum(-1)
        out[name] = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))
    return out


def run_slicing(run: Run, cfg: SliceConfig, log: Callable[[str], Any] = print) -> SliceResult:
    """Slice the run's final model on its ``x_train``; write ``slice/`` (masks, scores, summary)."""
    arch = get_architecture(run.model_name)
    model = run.load_model()
    data = run.data()
    result = slice_model(model, data.x_train, data.y_train, arch.trace_layers, cfg, log=log)
    masks = result.masks()
    io.write_npz(run.file(layout.MASKS), **masks)
    io.write_npz(run.file(layout.SCORES), **{k: np.asarray(v) for k, v in result.scores.items()},
                 images=result.images)
    rows = [{"layer": name, "class": c, "units": m.shape[1], "slice_size": int(m[c].sum()),
             "fraction": round(float(m[c].mean()), 4)}
            for name, m in masks.items() for c in range(m.shape[0])]
    io.write_csv(run.file(layout.SLICE_SUMMARY_CSV), rows)
    summary = {
        "mode": cfg.mode, "per": cfg.per, "images_per_class": result.images,
        "seconds": round(result.seconds, 3), "images_per_second": result.images_per_second,
        "layers": {name: {"units": int(m.shape[1]), "slice_size": m.sum(1).tolist(),
                          "mean_fraction": float(m.mean())} for name, m in masks.items()},
    }
    io.write_json(run.file(layout.SLICE_SUMMARY), {"slice": asdict(cfg), "summary": summary,
                                      "run": str(run.path)})
    return result
