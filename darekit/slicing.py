"""Stage 1: NNSlicer's contribution analysis and DARE's per-class slices (``dare/nnslicer.py``).

For every class c, up to ``max_per_class`` correctly classified ``x_train`` images of class c are
profiled and sliced with criterion "the logit of c" (NNSlicer, FSE 2020; see
``research/nnslicer.md`` section 3 for the rules):

1. Reference: the mean activation of every neuron over the class's profiling images
   (``reference="class"``, as the NNSlicer code does) or over all profiling images (``"all"``).
2. Forward analysis: ``dx = x_in - mean`` for every layer input on the way back.
3. Backward analysis from ``CONTRIB[logit_c] = 1`` over the model's layer graph (a DAG), in
   reverse topological order: a layer is processed once every layer that reads its output has
   been, and a tensor read by several layers (a residual fan-out) receives the sum of the
   contributions they send it (NNSlicer's merge). The walk covers the layers on a path from a
   sliced layer to the logits and stops at the sliced layers. The rules:

   - Weighted sums. For each traced output neuron n the synapse terms are ``v_i = w_in * dx_i``;
     the largest-|v| synapses whose partial sum reproduces ``dy_n = sum_i v_i`` within ``eps``
     are kept (NNSlicer's ``arg_abs_approx`` with its ``bar``, ``select_synapses``) and each
     kept input receives ``sign(v_i) * sign(dy_n) * sign(CONTRIB_n)``:
     - ``Dense`` and ``Conv2D`` (strided too, ``same`` or ``valid``; a window is clipped at
       the border, padded cells are no synapses; the bias is left out of ``dy``);
     - ``Add``: unit weights, elementwise; the synapses of an output element are the inputs'
       ``dx`` at that position, so the contribution flows to the branches that explain it;
     - ``GlobalAveragePooling2D``: the H*W positions of a channel, weight ``1 / (H*W)``.
     All three are exact: reference means are linear, so ``dy = sum_i v_i`` holds exactly.
   - Built-in activations: a ``Dense`` or ``Conv2D`` with ``activation="relu"`` is its weighted
     sum after the ReLU rule below; ``relu(z) > 0`` iff ``z > 0``, so gating on its output is
     gating on the pre-activation, exactly as a separate ``ReLU`` layer does.
   - ``MaxPooling2D`` (non-overlapping) copies a window's contribution to its maximum (all
     tied maxima); ``Flatten`` and ``Reshape`` reshape; ``BatchNormalization`` and ``Dropout``
     pass contributions through (a per-channel scale is a single synapse: ``sign(v) sign(dy)
     = +1``, NNSlicer's rule); ``ReLU`` (and ``Activation("relu")``) passes them through
     (``relu="pass"``, the NNSlicer code) or gates them on active units (``relu="gate"``).
     These are NNSlicer's rules as its code has them.

   Refused up front (``check_sliceable``), every offending layer named in one line: any other
   layer type (no rule here, e.g. ``AveragePooling2D``; NNSlicer has none for
   ``Concatenate``), ``keras.ops`` calls on symbolic tensors (``a + b``: use ``layers.Add``),
   built-in activations and ``Activation`` layers other than relu and linear (no exact rule:
   NNSlicer passes any activation through, which ``relu="gate"`` could not mirror), a
   ``ReLU`` with ``max_value``, ``negative_slope`` or ``threshold`` (idem), overlapping or
   ``same``-padded max-pooling, grouped convolutions, ``channels_first`` layers, ``Dense`` on
   inputs of rank > 2, ``Add`` with broadcasting, nested models, layers returning several
   tensors, and a softmax on the logits (the criterion is a logit). Only the layers between
   the sliced layers and the logits are checked: the ones before are never walked.
4. Aggregation: a neuron's score is ``sum_x |CONTRIB|``; a conv channel's score sums its spatial
   positions. Per class and layer, the slice is the smallest set of units whose scores cover a
   fraction ``per`` of the layer's total (``cover_mask``).

Everything is vectorised: all traced (input, neuron) pairs of a layer are processed as one
matrix, in chunks. ``mode="approx"`` replaces step 3 by gradient x delta,
``|dx * d logit_c / dx|`` at each sliced layer: one backward pass, no sorting.

The logits are the output of the layer named ``logits`` (every registered architecture has
one), else the model's single output. ``find_trace_layers`` finds the sliced layers of a CNN
from its graph (see there); the registered architectures declare the same ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np
from keras import ops

from darekit import backend as B
from darekit import io, layout
from darekit.config import option
from darekit.errors import DareError
from darekit.models import LOGITS
from darekit.rundir import Run

REFERENCES = ("class", "all")
RELU_RULES = ("pass", "gate")
_CHUNK = 1 << 22  # elements of one synapse matrix chunk (16 MiB of float32)


@dataclass(frozen=True)
class SliceConfig:
    """Options of ``dare/nnslicer.py``; each field carries its default and its help
    (``darekit.config.option``), from which the command line is generated.

    The sliced layers are not an option here: they are the run's (``Run.trace_layers``), the
    same ones that activation traces and DARE's regression model use.
    """

    per: float = option(0.95, "fraction of each layer's aggregated |contribution| the slice "
                        "covers, in (0, 1] (larger per, larger slice)")
    max_per_class: int = option(200, "K, the correctly classified x_train images profiled "
                                "per class")
    eps: float = option(0.2, "NNSlicer's sum_precision_error: a neuron's kept synapses "
                        "reproduce its change within eps (relative), in (0, 1)")
    bar: float = option(0.01, "NNSlicer's threshold_bar_ratio: near-ties of the last kept "
                        "synapse enter too, in [0, 1)")
    reference: str = option("class", "reference activations: the mean over the class's "
                            "profiling images or over all classes'", choices=REFERENCES)
    mode: str = option("exact", "exact NNSlicer backward analysis, or gradient x delta "
                       "(approx: one backward pass, no sorting)", choices=lambda: tuple(MODES))
    relu: str = option("pass", "ReLUs (layers and built-in activations) pass contributions "
                       "through (the NNSlicer code) or gate them on active units",
                       choices=RELU_RULES)
    batch_size: int = option(32, "images per backward batch")
    seed: int = option(0, "picks which K images of a class are profiled")

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
Rule = Callable[[keras.layers.Layer, Sequence[np.ndarray], Sequence[np.ndarray], np.ndarray,
                 np.ndarray, SliceConfig], list[np.ndarray]]
"""``rule(layer, xs, refs, y, c_out, cfg) -> [contrib_in of each input]``: the layer's inputs
``xs`` ``[(B, ...)]``, their reference means ``refs`` (broadcastable to ``xs``), its output
``y`` ``(B, ...)`` and the contributions on it ``c_out`` ``(B, ...)``."""


def _weighted_sum(patches: np.ndarray, kernel: np.ndarray, c_out: np.ndarray,
                  cfg: SliceConfig, valid: np.ndarray | None = None) -> np.ndarray:
    """Shared weighted-sum rule on flattened receptive fields.

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


def _built_in_relu(layer, y, c_out, cfg):
    """The ReLU rule of a built-in ``activation="relu"``, applied on the layer's output:
    ``relu(z) > 0`` iff ``z > 0``, so gating on ``y`` is gating on the pre-activation."""
    if cfg.relu == "gate" and layer.activation is keras.activations.relu:
        return c_out * (y > 0)
    return c_out


def _dense(layer, xs, refs, y, c_out, cfg):
    c_out = _built_in_relu(layer, y, c_out, cfg)
    dx = (xs[0] - refs[0]).astype(np.float32)
    return [_weighted_sum(dx, np.asarray(layer.kernel), c_out, cfg)]


def _conv_geometry(layer: keras.layers.Conv2D, h: int, w: int
                   ) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
    """``(ho, wo, (top, bottom), (left, right))``: output size and zero padding of ``layer``
    on an ``h x w`` map (TensorFlow's and XLA's ``same``: the odd cell goes after)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.strides, layer.dilation_rate
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1  # dilated extent of the kernel
    if layer.padding == "same":
        ho, wo = -(-h // sh), -(-w // sw)
        ph, pw = max((ho - 1) * sh + ekh - h, 0), max((wo - 1) * sw + ekw - w, 0)
        return ho, wo, (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)
    return (h - ekh) // sh + 1, (w - ekw) // sw + 1, (0, 0), (0, 0)


def _windows(layer: keras.layers.Conv2D, ho: int, wo: int):
    """For each kernel cell (a, b), row-major: the strided slices of the padded map it reads."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.strides, layer.dilation_rate
    for a in range(kh):
        for b in range(kw):
            yield (slice(a * dh, a * dh + (ho - 1) * sh + 1, sh),
                   slice(b * dw, b * dw + (wo - 1) * sw + 1, sw))


def _extract(x: np.ndarray, layer: keras.layers.Conv2D) -> np.ndarray:
    """The receptive field of every output position of ``layer``: ``(B, Ho, Wo, kh*kw*C)``
    from ``x`` ``(B, H, W, C)``, cells ordered (row, column, channel) like the kernel's
    ``(kh, kw, C, O)`` reshaped to ``(kh*kw*C, O)`` (``tf.image.extract_patches``' order).
    Zero padding for ``same``. NumPy: the values are copied, so every backend gets the same."""
    b, h, w, ch = x.shape
    ho, wo, pad_h, pad_w = _conv_geometry(layer, h, w)
    xp = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    cells = [xp[:, r, c, :] for r, c in _windows(layer, ho, wo)]
    return np.stack(cells, axis=3).reshape(b, ho, wo, len(cells) * ch)


def _scatter(g: np.ndarray, layer: keras.layers.Conv2D, shape: tuple[int, ...]) -> np.ndarray:
    """The adjoint of ``_extract``: every field cell of ``g`` ``(B, Ho, Wo, kh*kw*C)`` added
    back onto the input position it came from, ``(B, H, W, C)`` (padding dropped)."""
    b, h, w, ch = shape
    ho, wo, pad_h, pad_w = _conv_geometry(layer, h, w)
    g = g.reshape(b, ho, wo, -1, ch)
    out = np.zeros((b, h + sum(pad_h), w + sum(pad_w), ch), np.float32)
    for i, (r, c) in enumerate(_windows(layer, ho, wo)):
        out[:, r, c, :] += g[:, :, :, i, :]
    return out[:, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w]


def _conv(layer, xs, refs, y, c_out, cfg):
    c_out = _built_in_relu(layer, y, c_out, cfg)
    dx = (xs[0] - refs[0]).astype(np.float32)
    patches = _extract(dx, layer)
    b, ho, wo, f = patches.shape
    # Windows are clipped at the border, as NNSlicer does: padded cells are no synapses.
    inside = _extract(np.ones((1, *dx.shape[1:]), np.float32), layer).reshape(ho * wo, f) > 0
    valid = np.tile(inside, (b, 1))
    kernel = np.asarray(layer.kernel).reshape(f, -1)  # (kh*kw*Cin, Cout), the patches' order
    g = _weighted_sum(patches.reshape(-1, f), kernel, c_out.reshape(b * ho * wo, -1), cfg,
                      valid)
    # g holds small integers (sums of +-1), so the scatter's float32 sums are exact.
    return [_scatter(g.reshape(patches.shape), layer, dx.shape)]


def _add(layer, xs, refs, y, c_out, cfg):
    # Unit weights: the k synapses of each output element are the inputs' dx there.
    k = len(xs)
    dx = np.stack([(x - r).astype(np.float32) for x, r in zip(xs, refs, strict=True)], -1)
    g = _weighted_sum(dx.reshape(-1, k), np.ones((k, 1), np.float32), c_out.reshape(-1, 1),
                      cfg).reshape(dx.shape)
    return [g[..., i] for i in range(k)]


def _global_avg_pool(layer, xs, refs, y, c_out, cfg):
    # One neuron per (image, channel); its H*W synapses have weight 1 / (H*W).
    dx = (xs[0] - refs[0]).astype(np.float32)
    b, h, w, ch = dx.shape
    fields = dx.transpose(0, 3, 1, 2).reshape(b * ch, h * w)
    kernel = np.full((h * w, 1), 1.0 / (h * w), np.float32)
    g = _weighted_sum(fields, kernel, c_out.reshape(b * ch, 1), cfg)
    return [g.reshape(b, ch, h, w).transpose(0, 2, 3, 1)]


def _maxpool(layer, xs, refs, y, c_out, cfg):
    x_in = xs[0]
    ph, pw = layer.pool_size
    b, ho, wo, ch = c_out.shape
    win = x_in[:, :ho * ph, :wo * pw].reshape(b, ho, ph, wo, pw, ch)
    at_max = win == win.max(axis=(2, 4), keepdims=True)  # every tied maximum, as NNSlicer
    c_in = np.zeros(x_in.shape, dtype=np.float32)
    c_in[:, :ho * ph, :wo * pw] = (at_max * c_out[:, :, None, :, None, :]).reshape(
        b, ho * ph, wo * pw, ch)
    return [c_in]


def _relu(layer, xs, refs, y, c_out, cfg):
    return [c_out * (xs[0] > 0) if cfg.relu == "gate" else c_out]


def _identity(layer, xs, refs, y, c_out, cfg):
    return [c_out]


def _reshape(layer, xs, refs, y, c_out, cfg):
    return [c_out.reshape(xs[0].shape)]


def _activation(layer, xs, refs, y, c_out, cfg):
    return (_relu if layer.activation is keras.activations.relu else _identity)(
        layer, xs, refs, y, c_out, cfg)


RULES: dict[type, Rule] = {
    keras.layers.Dense: _dense,
    keras.layers.Conv2D: _conv,
    keras.layers.Add: _add,
    keras.layers.GlobalAveragePooling2D: _global_avg_pool,
    keras.layers.MaxPooling2D: _maxpool,
    keras.layers.BatchNormalization: _identity,  # a positive-or-negative per-channel scale:
    keras.layers.Dropout: _identity,             # one synapse, so sign(v) sign(dy) = +1
    keras.layers.ReLU: _relu,
    keras.layers.Activation: _activation,
    keras.layers.Flatten: _reshape,
    keras.layers.Reshape: _reshape,
}


def _kind(layer: Any) -> type | None:
    for kind in RULES:
        if isinstance(layer, kind):
            return kind
    return None


def _activation_problem(activation: Any) -> str | None:
    if activation is keras.activations.linear or activation is keras.activations.relu:
        return None
    name = getattr(activation, "__name__", repr(activation))
    return f"activation {name!r} (only relu or linear have an exact rule)"


def _why_not(layer: Any, node: Any) -> str | None:
    """Why the analysis cannot pass this call of ``layer``; None when it can."""
    if isinstance(layer, keras.Model):
        return "a nested model (slicing needs its layers in the outer graph)"
    if not isinstance(layer, keras.layers.Layer):  # e.g. ``a + b`` on symbolic tensors
        return "no contribution rule (a keras.ops call; use the layer, e.g. keras.layers.Add)"
    kind = _kind(layer)
    if kind is None:
        return "no contribution rule"
    if len(node.outputs) != 1:
        return "returns several tensors"
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt != "channels_last":
        return f"data_format {fmt!r} (only channels_last)"
    if kind in (keras.layers.Dense, keras.layers.Conv2D, keras.layers.Activation):
        problem = _activation_problem(layer.activation)
        if problem:
            return problem
    if kind is keras.layers.Dense and len(node.input_tensors[0].shape) != 2:
        return f"input of rank {len(node.input_tensors[0].shape)} (only (batch, units))"
    if kind is keras.layers.Conv2D and layer.groups != 1:
        return f"groups={layer.groups} (only 1)"
    if kind is keras.layers.MaxPooling2D and (tuple(layer.pool_size) != tuple(layer.strides)
                                              or layer.padding != "valid"):
        return "overlapping or same-padded pooling (only non-overlapping valid pooling)"
    if kind is keras.layers.ReLU and (layer.max_value is not None or layer.negative_slope != 0
                                      or layer.threshold != 0):
        return "max_value, negative_slope or threshold set (only the plain ReLU)"
    if kind is keras.layers.Add:
        shapes = {tuple(t.shape[1:]) for t in node.input_tensors}
        if len(shapes) != 1:
            return f"broadcasting inputs {sorted(shapes)} (only equal shapes)"
    return None


def rule_for(layer: keras.layers.Layer) -> Rule:
    """The contribution rule of ``layer``'s type (``check_sliceable`` checks its settings)."""
    kind = _kind(layer)
    if kind is None or isinstance(layer, keras.Model):
        raise DareError(f"slicing does not support layer {layer.name!r} "
                        f"({type(layer).__name__}); supported: {_SUPPORTED}")
    return RULES[kind]


_SUPPORTED = ", ".join(k.__name__ for k in RULES)


# --------------------------------------------------------------------------- the layer graph
def _node_of(t: Any) -> Any:
    op, index, _ = t._keras_history
    return op._inbound_nodes[index]


class _ModelGraph:
    """Every layer call (Keras ``Node``) the logits depend on, in topological order.

    The logits are the output of the layer named ``logits`` when the model has one (called
    once), else the model's single output. Tensors get string keys: the producing layer's
    name, or ``name@call:output`` for a layer called several times in the graph or returning
    several tensors.
    """

    def __init__(self, model: keras.Model):
        try:
            outputs, inputs = list(model.outputs), list(model.inputs)
        except (AttributeError, ValueError, TypeError):
            outputs = inputs = []
        if not outputs or not inputs:
            raise DareError(f"model {model.name!r} has no graph (build it on a keras.Input)")
        self.model, self.inputs = model, inputs
        named = [n for n in self._topological(outputs) if n.operation.name == LOGITS]
        if len(named) == 1 and len(named[0].outputs) == 1:
            self.logits_tensor = named[0].outputs[0]
        elif len(outputs) == 1:
            self.logits_tensor = outputs[0]
        else:
            raise DareError(f"model {model.name!r} has {len(outputs)} outputs and no layer "
                            f"named {LOGITS!r}: slicing needs one logits output")
        self.nodes = self._topological([self.logits_tensor])
        calls: dict[int, int] = {}
        for node in self.nodes:
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        self.key: dict[int, str] = {}     # id(KerasTensor) -> key
        self.tensor: dict[str, Any] = {}  # key -> KerasTensor
        self.producer: dict[str, Any] = {}
        self.by_layer: dict[str, list[str]] = {}
        for node in self.nodes:
            op = node.operation
            for i, t in enumerate(node.outputs):
                key = op.name
                if calls[id(op)] > 1 or len(node.outputs) > 1:
                    key = f"{op.name}@{op._inbound_nodes.index(node)}:{i}"
                self.key[id(t)], self.tensor[key], self.producer[key] = key, t, node
                self.by_layer.setdefault(op.name, []).append(key)
        self.logits = self.key[id(self.logits_tensor)]

    @staticmethod
    def _topological(outputs: Sequence[Any]) -> list:
        """Post-order DFS from the nodes of ``outputs``: producers before consumers (no
        recursion, so any depth)."""
        order, seen = [], set()
        stack = [(_node_of(t), False) for t in reversed(outputs)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((_node_of(t), False) for t in reversed(node.input_tensors))
        return order

    def inputs_of(self, node: Any) -> tuple[str, ...]:
        return tuple(self.key[id(t)] for t in node.input_tensors)

    def outputs_of(self, node: Any) -> tuple[str, ...]:
        return tuple(self.key[id(t)] for t in node.outputs)


@dataclass(frozen=True)
class Step:
    """One layer call on the analysed part of the graph: ``output = layer(*inputs)``."""

    layer: keras.layers.Layer
    node: Any
    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class _Plan:
    graph: _ModelGraph
    trace: dict[str, str]  # trace layer -> tensor key
    steps: tuple[Step, ...]
    frontier: tuple[str, ...]
    needs: frozenset[str]
    problems: tuple[str, ...]


def _softmax(layer: Any) -> bool:
    act = getattr(layer, "activation", None)
    return (isinstance(layer, keras.layers.Softmax)
            or getattr(act, "__name__", "") in ("softmax", "log_softmax"))


def _plan(model: keras.Model, trace_layers: Sequence[str]) -> _Plan:
    """The analysed part of ``model``'s graph and everything that stops the analysis."""
    g = _ModelGraph(model)
    problems: list[str] = []
    if len(g.inputs) != 1:
        problems.append(f"the model has {len(g.inputs)} inputs (slicing needs one)")
    out_node = g.producer[g.logits]
    softmax = _softmax(out_node.operation)
    if softmax:
        problems.append(f"the output layer {out_node.operation.name!r} applies a softmax "
                        "(slicing needs logits: build the model without it; the loss can "
                        "take logits)")
    if len(g.logits_tensor.shape) != 2:
        problems.append(f"the logits {g.logits!r} have shape {tuple(g.logits_tensor.shape)} "
                        "(slicing needs (batch, classes))")
    if not trace_layers:
        problems.append("no layers to slice were given")
    trace: dict[str, str] = {}
    names = {layer.name for layer in model.layers} | {
        t._keras_history.operation.name for t in g.inputs}
    for name in trace_layers:
        keys = g.by_layer.get(name, [])
        if len(keys) == 1:
            trace[name] = keys[0]
        elif keys:
            problems.append(f"trace layer {name!r} is called or outputs {len(keys)} times in "
                            "the graph (slicing needs one tensor)")
        elif name in names:
            problems.append(f"trace layer {name!r} is not on a path to the logits "
                            f"{g.logits!r}")
        else:
            problems.append(f"trace layer {name!r} is missing")
    # Forward over the topological order: the calls that read a tensor downstream of a trace
    # layer are exactly those between the trace layers and the logits (all reach the logits).
    down = set(trace.values())
    steps: list[Step] = []
    unsupported = False
    for node in g.nodes:
        ins = g.inputs_of(node)
        if node.is_input or not down.intersection(ins):
            continue
        layer = node.operation
        steps.append(Step(layer, node, ins, g.outputs_of(node)[0]))
        down.update(g.outputs_of(node))
        why = _why_not(layer, node)
        if why and not (softmax and node is out_node):  # said above
            problems.append(f"layer {layer.name!r} ({type(layer).__name__}): {why}")
            unsupported |= why.startswith("no contribution rule")
    if unsupported:
        problems.append(f"rules exist for {_SUPPORTED}")
    made = {s.output for s in steps}
    frontier = dict.fromkeys(k for k in (*[k for s in steps for k in s.inputs],
                                         *trace.values(), g.logits) if k not in made)
    return _Plan(g, trace, tuple(steps), tuple(frontier), frozenset(down), tuple(problems))


def check_sliceable(model: keras.Model, trace_layers: Sequence[str]) -> None:
    """Raise ``DareError`` (one line) naming every layer between ``trace_layers`` and the
    logits that the contribution analysis cannot pass, and why, and every trace layer that is
    missing or not on a path to the logits; return None when ``model`` can be sliced."""
    _refuse(model, _plan(model, trace_layers).problems)


def _refuse(model: keras.Model, problems: Sequence[str]) -> None:
    if problems:
        raise DareError(f"model {model.name!r} cannot be sliced: " + "; ".join(problems))


@dataclass
class Graph:
    """The part of a model's layer graph that slicing walks.

    ``steps``: every layer call on a path from a trace layer to the logits, in topological
    order; ``frontier``: the tensors those calls read that no step produces (the trace layers
    nearest the input, and side inputs such as a residual shortcut from further back), which
    ``head`` computes from the images; ``trace``: trace layer -> tensor key; ``needs``: the
    tensors contributions flow to (downstream of a trace layer).
    """

    model: keras.Model
    steps: tuple[Step, ...]
    trace: dict[str, str]
    logits: str
    frontier: tuple[str, ...]
    needs: frozenset[str]
    tensors: dict[str, Any] = field(repr=False)
    head: keras.Model = field(repr=False)
    _forward: Callable | None = field(default=None, init=False, repr=False)
    _gradients: Callable | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, model: keras.Model, trace_layers: Sequence[str]) -> Graph:
        """The graph between ``trace_layers`` and the logits; ``check_sliceable`` first."""
        plan = _plan(model, trace_layers)
        _refuse(model, plan.problems)
        g = plan.graph
        tensors = {k: g.tensor[k] for k in (*plan.frontier, *(s.output for s in plan.steps))}
        head = keras.Model(g.inputs[0], [g.tensor[k] for k in plan.frontier])
        return cls(model, plan.steps, plan.trace, g.logits, plan.frontier, plan.needs, tensors,
                   head)

    @property
    def trace_layers(self) -> tuple[str, ...]:
        return tuple(self.trace)

    @property
    def num_classes(self) -> int:
        return int(self.tensors[self.logits].shape[-1])

    def units(self, name: str) -> int:
        """Units of trace layer ``name`` (channels of a conv map)."""
        return int(self.tensors[self.trace[name]].shape[-1])

    def logits_model(self) -> keras.Model:
        """``model`` itself when it outputs the logits only, else images -> logits."""
        if [id(t) for t in self.model.outputs] == [id(self.tensors[self.logits])]:
            return self.model
        return keras.Model(self.model.inputs[0], self.tensors[self.logits])

    def run(self, x: Any, offsets: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every tensor of the analysed part for images ``x`` ``(B, H, W, C)``, in inference
        mode: ``head`` up to the frontier, then the steps. ``offsets`` ``{tensor key: value}``
        are added to those tensors where they are made, so a gradient with respect to a zero
        offset is the gradient with respect to the tensor (a pure function of the input,
        differentiable on every backend). Reads the layers' variables: call it eagerly or
        inside ``pure`` (which binds them to values passed as arguments)."""
        offsets = offsets or {}
        outs = self.head(x, training=False)
        if len(self.frontier) == 1:
            outs = [outs]
        values: dict[int, Any] = {}  # id(KerasTensor) -> value, as Node.fill_in wants
        for key, value in zip(self.frontier, outs, strict=True):
            values[id(self.tensors[key])] = value + offsets[key] if key in offsets else value
        for step in self.steps:
            args, kwargs = step.node.arguments.fill_in(values)
            out = step.layer(*args, **{**kwargs, "training": False})
            if step.output in offsets:
                out = out + offsets[step.output]
            values[id(self.tensors[step.output])] = out
        return {key: values[id(t)] for key, t in self.tensors.items()}

    def pure(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(*args)``, which may call ``run``, as a function of the model's current weights:
        they are passed as arguments on each call (``B.model_state``) and bound to the layers'
        variables by a ``keras.StatelessScope``. Compiled on JAX (a ``jax.jit`` must not close
        over the weights; pad the batch to ``B.bucket`` sizes); eager on TensorFlow, as before
        the port, so its numbers stay bit for bit what they were."""
        variables = [*self.model.trainable_variables, *self.model.non_trainable_variables]

        def bound(state, *args):
            values = [*state[0], *state[1]]
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return fn(*args)

        compiled = B.jit(bound) if B.name() == "jax" else bound
        return lambda *args: compiled(B.model_state(self.model), *args)

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``{tensor key: (B, ...)}`` for every tensor of the analysed part."""
        if self._forward is None:
            self._forward = self.pure(lambda xb: self.run(xb))
        n, xb = _padded(x)
        out = self._forward(xb)  # a jax.jit returns its dicts with sorted keys
        return {key: B.to_numpy(out[key])[:n] for key in self.tensors}

    def trace_gradients(self, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
        """``{trace layer: d logit_c / d a}`` ``(B, ...)`` for images ``x``, class ``classes``
        ``(B,)`` each: one backward pass from the sum of the criterion logits."""
        keys = list(self.trace.values())
        shapes = [tuple(self.tensors[k].shape[1:]) for k in keys]
        sizes = [int(np.prod(s)) for s in shapes]
        ends = np.cumsum(sizes).tolist()
        if self._gradients is None:
            def grads(xb, onehot):
                # One zero offset per traced tensor, flattened side by side into z (B, sum):
                # d logit / d z is the gradient at every traced tensor in one backward pass.
                def logit(z):
                    offsets = {k: ops.reshape(z[:, e - n:e], (-1, *s))
                               for k, s, n, e in zip(keys, shapes, sizes, ends, strict=True)}
                    return ops.sum(self.run(xb, offsets)[self.logits] * onehot)

                return B.grad(logit)(ops.zeros((ops.shape(xb)[0], ends[-1]), "float32"))

            self._gradients = self.pure(grads)
        n, xb = _padded(x)
        onehot = np.eye(self.num_classes, dtype=np.float32)[B.pad_rows(np.asarray(classes),
                                                                        len(xb))]
        g = B.to_numpy(self._gradients(xb, onehot))[:n]
        return {name: g[:, e - k:e].reshape(n, *s)
                for name, s, k, e in zip(self.trace, shapes, sizes, ends, strict=True)}


def _padded(x: np.ndarray) -> tuple[int, np.ndarray]:
    """``(len(x), x)``, ``x`` float32 padded to a ``B.BUCKETS`` size on JAX (each new batch
    shape compiles again there; the padded rows are valid images whose results are dropped)."""
    x = np.asarray(x, np.float32)
    n = len(x)
    if B.needs_buckets(False):
        x = B.pad_rows(x, B.bucket(n, B.BUCKETS[-1]))
    return n, x


def contributions(graph: Graph, acts: Mapping[str, np.ndarray], refs: Mapping[str, np.ndarray],
                  classes: np.ndarray, cfg: SliceConfig) -> dict[str, np.ndarray]:
    """NNSlicer's backward analysis for a batch (``mode="exact"``).

    Args:
        graph: the model's graph; ``acts``: ``graph.forward(x)``; ``refs``: the reference
            mean of each of those tensors, broadcastable to ``acts``; ``classes``: ``(B,)`` the
            criterion class (logit) of each input.
    Returns:
        ``{trace layer: (B, *output shape)}`` integer-valued signed contributions.
    """
    trace_keys = set(graph.trace.values())
    c = {graph.logits: np.zeros(acts[graph.logits].shape, dtype=np.float32)}
    c[graph.logits][np.arange(len(classes)), classes] = 1.0
    for step in reversed(graph.steps):  # every consumer of a tensor comes before its producer
        c_out = c.get(step.output)
        if step.output not in trace_keys:
            c.pop(step.output, None)  # complete now, and needed no more
        if c_out is None or not c_out.any():
            continue
        c_in = rule_for(step.layer)(step.layer, [acts[k] for k in step.inputs],
                                    [refs[k] for k in step.inputs], acts[step.output], c_out,
                                    cfg)
        for key, ci in zip(step.inputs, c_in, strict=True):
            if key in graph.needs:  # a fan-out: the contributions of all consumers add up
                c[key] = ci if key not in c else c[key] + ci
    return {name: c[key] if key in c else np.zeros(acts[key].shape, np.float32)
            for name, key in graph.trace.items()}


def approx_contributions(graph: Graph, x: np.ndarray, refs: Mapping[str, np.ndarray],
                         classes: np.ndarray, cfg: SliceConfig,
                         acts: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Gradient x delta, ``(a - mean) * d logit_c / d a`` at each sliced layer ``(B, ...)``
    (``acts``: ``graph.forward(x)`` if the caller has it)."""
    acts = graph.forward(x) if acts is None else acts
    grads = graph.trace_gradients(x, classes)
    return {name: (acts[k] - refs[k]) * grads[name] for name, k in graph.trace.items()}


def _exact(graph, x, acts, refs, classes, cfg):
    return contributions(graph, acts, refs, classes, cfg)


def _approx(graph, x, acts, refs, classes, cfg):
    return approx_contributions(graph, x, refs, classes, cfg, acts)


MODES: dict[str, Callable[..., dict[str, np.ndarray]]] = {"exact": _exact, "approx": _approx}


# --------------------------------------------------------------------------- trace layers
def _relu_output(layer: Any) -> bool:
    """Whether ``layer``'s output is a ReLU's: a ReLU layer, or a built-in relu."""
    if isinstance(layer, keras.layers.ReLU):
        return True
    return (isinstance(layer, (keras.layers.Activation, keras.layers.Dense, keras.layers.Conv2D))
            and layer.activation is keras.activations.relu)


def find_trace_layers(model: keras.Model) -> tuple[str, ...]:
    """The layers to slice and trace in a functional or Sequential CNN, in topological order.

    - The last conv block: the conv ReLU outputs ``(B, H, W, C)`` at the feature extractor's
      final spatial resolution, i.e. after its last-but-one downsampling (the last one, a pool
      or a global pool, ends the extractor). In a residual net (some of them follow an ``Add``)
      only those: the outputs of the last stage's blocks.
    - The hidden Dense ReLU outputs ``(B, units)`` (never the logits layer).

    A ReLU output is a ``ReLU`` or ``Activation("relu")`` layer, or a ``Dense`` or ``Conv2D``
    with a built-in relu. Only layers on a path to the logits count. Whether the analysis can
    pass every layer after them is ``check_sliceable``'s question.
    """
    g = _ModelGraph(model)
    logits_layer = g.producer[g.logits].operation
    relus = [node for node in g.nodes
             if not node.is_input and node.operation is not logits_layer
             and _relu_output(node.operation) and len(g.by_layer[node.operation.name]) == 1]
    conv = [n for n in relus if len(n.outputs[0].shape) == 4]
    dense = [n for n in relus if len(n.outputs[0].shape) == 2]
    if conv:
        sizes = [n.outputs[0].shape[1:3] for n in conv]
        if any(None in s for s in sizes):
            raise DareError(f"model {model.name!r} has conv maps of unknown size; finding its "
                            "last conv block needs a fixed input size")
        last_size = min(h * w for h, w in sizes)
        conv = [n for n, (h, w) in zip(conv, sizes, strict=True) if h * w == last_size]
        after_add = [n for n in conv if isinstance(g.producer[g.inputs_of(n)[0]].operation,
                                                   keras.layers.Add)]
        conv = after_add or conv
    chosen = {id(n) for n in (*conv, *dense)}
    found = tuple(n.operation.name for n in relus if id(n) in chosen)
    if not found:
        raise DareError(f"model {model.name!r} has no ReLU outputs on the way to its logits "
                        "to slice")
    return found


# --------------------------------------------------------------------------- aggregation
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
    """Per-class NNSlicer scores of ``trace_layers`` from ``x`` ``(N, H, W, C)``, ``y`` ``(N,)``.

    ``model``: any functional or Sequential CNN that ``check_sliceable`` accepts (checked
    before any work). Returns scores ``{layer: (num_classes, units)}``.
    """
    t0 = time.perf_counter()
    graph = Graph.of(model, trace_layers)
    num_classes = graph.num_classes
    picks = profiling_indices(graph.logits_model(), x, y, num_classes, cfg.max_per_class,
                              cfg.seed)
    bs = cfg.batch_size

    def batches(idx):
        for i in range(0, len(idx), bs):
            yield x[idx[i:i + bs]]

    # Pass 1: reference means of every analysed tensor, per class (running sums, float64).
    sums: list[dict[str, np.ndarray] | None] = [None] * num_classes
    for c, idx in enumerate(picks):
        for xb in batches(idx):
            acts = {k: a.sum(0, dtype=np.float64) for k, a in graph.forward(xb).items()}
            prev = sums[c]
            sums[c] = acts if prev is None else {k: prev[k] + a for k, a in acts.items()}
    counts = np.array([len(i) for i in picks])
    if counts.sum() == 0:
        raise DareError("the model classifies none of the profiling images correctly")
    class_means = [None if s is None else {k: a / n for k, a in s.items()}
                   for s, n in zip(sums, counts, strict=True)]
    all_means = {k: sum(m[k] * n for m, n in zip(class_means, counts, strict=True)
                        if m is not None) / counts.sum()
                 for k in graph.tensors}

    # Pass 2: backward analysis, aggregated per class.
    scores = {n: np.zeros((num_classes, graph.units(n))) for n in graph.trace}
    analyse = MODES[cfg.mode]
    for c, idx in enumerate(picks):
        if not len(idx):
            continue
        means = class_means[c] if cfg.reference == "class" else all_means
        refs = {k: r.astype(np.float32) for k, r in means.items()}
        for xb in batches(idx):
            acts = graph.forward(xb)
            contrib = analyse(graph, xb, acts, refs, np.full(len(xb), c), cfg)
            for name in graph.trace:
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
    """Slice the run's final model on its ``x_train`` at ``run.trace_layers``; write
    ``slice/`` (masks, scores, summary)."""
    model = run.load_model()
    data = run.data()
    result = slice_model(model, data.x_train, data.y_train, run.trace_layers, cfg, log=log)
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
