"""C&W L2 and DeepFool L2, compiled, on every Keras backend: Foolbox 3.3.4's algorithms.

Foolbox drives every step with eager eagerpy ops (on a GPU under JAX its PGD ran at 117 img/s
against 74,300 for a jitted loop). These functions run the same algorithms with the same
operations in the same order, but each inner loop is one compiled call of the model as a pure
function of its current weights (``darekit.backend.model_function``):

- ``carlini_wagner_l2``: Foolbox's ``L2CarliniWagnerAttack`` (tanh-space Adam with betas 0.9,
  0.999 and epsilon 1e-8, the hinge loss on the best other logit plus the squared L2 distance,
  the binary / exponential search over the constant, abort_early every ``ceil(steps / 10)``
  steps on the batch's summed loss, the best adversarial per input), with darekit's twist of
  ``attacks._CarliniWagnerL2``: an input with no adversarial found comes back unchanged (not
  as Foolbox's black image). One compiled call runs the steps between two abort_early checks;
  the check itself and the binary search run on the host, in float64 as in Foolbox.
- ``deepfool_l2``: Foolbox's ``L2DeepFoolAttack`` (the top ``candidates`` classes of the clean
  logits, the nearest linearised boundary, ``(distance + 1e-4)`` along its gradient, the
  accumulated step scaled by ``1 + overshoot``, inputs left as they are once adversarial). The
  whole loop is one compiled call; the ``candidates - 1`` gradients of a step come from one
  model pass over the batch repeated ``candidates - 1`` times.

Untargeted only (``Misclassification`` of ``y``), bounds [0, 1], inputs ``(N, H, W, C)``.
Batches are padded to ``B.BUCKETS`` where the backend compiles per shape and the padding is
small (``MAX_PAD_FRACTION``); padded rows never change a real row's result (C&W's abort_early
sums the real rows' loss only; Foolbox on a padded batch would sum the padding too). Under
TensorFlow without XLA the results agree with Foolbox's up to float rounding
(``test/test_l2_attacks.py`` measures how closely).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from darekit import backend as B
from darekit.errors import DareError

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Foolbox's AdamOptimizer defaults (gradient_descent_base.py), which its C&W uses.
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


def _compiled(model: keras.Model, key: tuple, build: Callable[[], Callable],
              jit_compile: bool) -> Callable:
    """One compiled model function per model, configuration and mode (``key``)."""
    fns = _COMPILED.setdefault(model, {})
    key = (*key, bool(jit_compile))
    if key not in fns:
        fns[key] = B.model_function(model, build(), jit_compile=jit_compile)
    return fns[key]


# Padding a batch to its bucket costs compute on every one of the attack's hundreds of steps;
# not padding costs one compilation per new shape. A call here sees at most two shapes
# (``batch_size`` and the remainder), and an evaluation's calls repeat them for every model, so
# a batch is padded only where that wastes little: 100 test images padded to 128 made C&W and
# DeepFool 1.3x slower than Foolbox on the quick AlexNet (TF CPU, XLA).
MAX_PAD_FRACTION = 0.125
"""Pad a batch to its bucket only if that adds at most this fraction of its rows."""


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, jit_compile: bool):
    """Yield ``(start, n, x padded, y padded)`` per batch of at most ``batch_size`` rows."""
    if batch_size < 1:
        raise DareError(f"batch_size must be positive; received {batch_size}")
    pad = B.needs_buckets(jit_compile)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        n = len(xb)
        m = B.bucket(n, batch_size) if pad else n
        if m - n > MAX_PAD_FRACTION * n:
            m = n
        yield i, n, B.pad_rows(xb, m), B.pad_rows(yb, m)


def _check_inputs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int32).reshape(-1)
    if len(x) != len(y):
        raise DareError(f"cannot attack {len(x)} images with {len(y)} labels")
    if len(x) and not (x.min() >= 0.0 and x.max() <= 1.0):
        raise DareError("inputs must lie in [0, 1]")
    return x, y


def _flat_sq_norm(a: Any, keep: int = 1) -> Any:
    """``sum(a ** 2)`` over all axes after the first ``keep`` (eagerpy's ``flatten(a, keep)
    .square().sum(-1)``)."""
    shape = ops.shape(a)
    return ops.sum(ops.square(ops.reshape(a, (*shape[:keep], -1))), axis=-1)


def _expand(v: Any, like: Any) -> Any:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcastable against ``like`` (``atleast_kd``)."""
    return ops.reshape(v, (-1,) + (1,) * (len(ops.shape(like)) - 1))


def _pick(a: Any, idx: Any) -> Any:
    """``a[rows, idx]`` for ``a`` ``(B, K)`` and ``idx`` ``(B,)``."""
    return ops.take_along_axis(a, ops.expand_dims(ops.cast(idx, "int32"), -1), axis=-1)[:, 0]


def _misclassified(logits: Any, y: Any) -> Any:
    """Foolbox's ``Misclassification``: ``argmax(logits) != y`` (first index on ties)."""
    return ops.not_equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), y)


# ---------------------------------------------------------------------------- C&W
def _to_attack_space(x: Any) -> Any:
    """Foolbox's ``_to_attack_space`` for bounds (0, 1): [0, 1] -> about (-inf, inf)."""
    x = (x - 0.5) / 0.5
    x = x * 0.999999
    return ops.arctanh(x)


def _to_model_space(w: Any) -> Any:
    """Foolbox's ``_to_model_space`` for bounds (0, 1)."""
    return ops.tanh(w) * 0.5 + 0.5


def _cw_chunk(confidence: float, stepsize: float, abort_early: bool) -> Callable:
    """The compiled body: ``n`` steps of Foolbox's C&W inner loop from step ``t0``, the first
    of which is an abort_early check against ``threshold`` (when ``abort_early``)."""

    def chunk(call, x, y, consts, mask, delta, m, v, best, best_norm, found, t0, n,
              threshold, bc1, bc2):
        x_attack = _to_attack_space(x)
        reconstructed = _to_model_space(x_attack)

        def loss_fn(delta):
            xm = _to_model_space(x_attack + delta)
            logits = call(xm)
            onehot = ops.one_hot(y, ops.shape(logits)[-1], dtype=logits.dtype)
            # best_other_classes: logits - onehot * inf, argmax
            other = ops.argmax(ops.where(onehot > 0, -np.inf, logits), axis=-1)
            is_adv_loss = _pick(logits, y) - _pick(logits, other)
            is_adv_loss = is_adv_loss + confidence
            is_adv_loss = ops.maximum(0.0, is_adv_loss)
            is_adv_loss = is_adv_loss * consts
            squared_norms = _flat_sq_norm(xm - reconstructed)
            # Foolbox sums the whole batch; padded rows (mask False) are left out, so that the
            # abort_early decision is the one Foolbox takes on the real rows alone.
            zero = ops.zeros_like(is_adv_loss)
            loss = (ops.sum(ops.where(mask, is_adv_loss, zero))
                    + ops.sum(ops.where(mask, squared_norms, zero)))
            return loss, (xm, logits)

        vg = B.value_and_grad_aux(loss_fn)

        def is_adversarial(logits):
            if confidence != 0:
                logits = logits + ops.one_hot(y, ops.shape(logits)[-1],
                                              dtype=logits.dtype) * confidence
            return _misclassified(logits, y)

        def cond(i, delta, m, v, best, best_norm, found, stopped, first_loss):
            return ops.logical_and(i < n, ops.logical_not(stopped))

        def body(i, delta, m, v, best, best_norm, found, stopped, first_loss):
            t = t0 + i  # Adam's t - 1
            (loss, (perturbed, logits)), gradient = vg(delta)
            # AdamOptimizer.__call__, operation by operation (bias corrections in float64 on
            # the host, cast to float32 as eagerpy does with a Python float).
            m = BETA1 * m + (1 - BETA1) * gradient
            v = BETA2 * v + (1 - BETA2) * ops.power(gradient, 2)
            m_hat = m / ops.take(bc1, t)
            v_hat = v / ops.take(bc2, t)
            delta = delta - stepsize * m_hat / (ops.sqrt(v_hat) + ADAM_EPS)
            first_loss = ops.where(i == 0, loss, first_loss)
            if abort_early:  # the chunk starts at a check: no progress -> stop, record nothing
                ok = ops.logical_or(i > 0, loss <= threshold)
            else:
                ok = ops.convert_to_tensor(True)
            found_iter = ops.logical_and(is_adversarial(logits), ok)
            found = ops.logical_or(found, found_iter)
            norms = ops.sqrt(_flat_sq_norm(perturbed - x))
            new_best = ops.logical_and(norms < best_norm, found_iter)
            best = ops.where(_expand(new_best, best), perturbed, best)
            best_norm = ops.where(new_best, norms, best_norm)
            return (i + 1, delta, m, v, best, best_norm, found, ops.logical_not(ok),
                    first_loss)

        out = ops.while_loop(
            cond, body,
            (ops.convert_to_tensor(0, "int32"), delta, m, v, best, best_norm, found,
             ops.convert_to_tensor(False), ops.convert_to_tensor(np.float32(np.inf))))
        return out[1:]

    return chunk


def carlini_wagner_l2(model: keras.Model, x: np.ndarray, y: np.ndarray, *,
                      binary_search_steps: int = 9, steps: int = 10000,
                      stepsize: float = 1e-2, confidence: float = 0.0,
                      initial_const: float = 1e-3, abort_early: bool = True,
                      batch_size: int = 256, jit_compile: bool = False) -> np.ndarray:
    """Foolbox 3.3.4's ``L2CarliniWagnerAttack`` (untargeted; its defaults) on ``model``
    (logits, [0, 1] inputs), compiled: ``x`` ``(N, ...)``, labels ``y`` ``(N,)`` -> the
    smallest adversarial found per input ``(N, ...)`` float32, or the input itself where none
    was found (darekit's ``_CarliniWagnerL2``). Batches of ``batch_size`` run independently,
    as Foolbox's calls per batch do. ``jit_compile``: XLA on TensorFlow (JAX always)."""
    x, y = _check_inputs(x, y)
    out = x.copy()
    if len(x) == 0 or binary_search_steps < 1:
        return out
    chunk = _compiled(model, ("cw", float(confidence), float(stepsize), bool(abort_early)),
                      lambda: _cw_chunk(float(confidence), float(stepsize), bool(abort_early)),
                      jit_compile)
    steps = int(steps)
    # Adam's bias corrections 1 - beta ** t as Foolbox computes them (Python floats), then
    # float32 as eagerpy casts a Python scalar.
    t = range(1, max(steps, 1) + 1)
    bc1 = ops.convert_to_tensor(np.array([1 - BETA1 ** i for i in t], np.float32))
    bc2 = ops.convert_to_tensor(np.array([1 - BETA2 ** i for i in t], np.float32))
    every = int(math.ceil(steps / 10)) if abort_early else steps  # Foolbox's check period
    i32 = lambda v: ops.convert_to_tensor(np.int32(v))

    for start, n, xb, yb in _batches(x, y, batch_size, jit_compile):
        rows = len(xb)
        xt, yt = ops.convert_to_tensor(xb), ops.convert_to_tensor(yb)
        mask = ops.convert_to_tensor(np.arange(rows) < n)
        consts = initial_const * np.ones((rows,))
        lower_bounds = np.zeros((rows,))
        upper_bounds = np.inf * np.ones((rows,))
        best = ops.zeros_like(xt)
        best_norm = ops.convert_to_tensor(np.full((rows,), np.inf, np.float32))
        for search_step in range(binary_search_steps):
            if search_step == binary_search_steps - 1 and binary_search_steps >= 10:
                consts = np.minimum(upper_bounds, 1e10)  # the last step repeats the search
            delta = ops.zeros_like(xt)
            m, v = ops.zeros_like(xt), ops.zeros_like(xt)
            found = ops.convert_to_tensor(np.zeros((rows,), bool))
            consts_ = ops.convert_to_tensor(consts.astype(np.float32))
            threshold = np.float32(np.inf)
            s = 0
            while s < steps:
                k = min(every, steps - s)
                delta, m, v, best, best_norm, found, stopped, first = chunk(
                    xt, yt, consts_, mask, delta, m, v, best, best_norm, found, i32(s),
                    i32(k), ops.convert_to_tensor(threshold), bc1, bc2)
                if abort_early:
                    if bool(B.to_numpy(stopped)):
                        break  # no progress since the last check: Foolbox stops Adam
                    # Foolbox: loss <= 0.9999 * loss.item(), the product cast to float32.
                    threshold = np.float32(0.9999 * float(B.to_numpy(first)))
                s += k
            found_np = B.to_numpy(found).astype(bool)
            upper_bounds = np.where(found_np, consts, upper_bounds)
            lower_bounds = np.where(found_np, lower_bounds, consts)
            consts = np.where(np.isinf(upper_bounds), consts * 10,
                              (lower_bounds + upper_bounds) / 2)
        norms = B.to_numpy(best_norm)[:n]
        advs = B.to_numpy(best)[:n]
        out[start:start + n] = np.where(np.isinf(norms).reshape((-1,) + (1,) * (x.ndim - 1)),
                                        x[start:start + n], advs)
    return out


# ---------------------------------------------------------------------------- DeepFool
DEEPFOOL_LOSSES = ("logits", "crossentropy")


def _deepfool_run(candidates: int, overshoot: float, loss: str) -> Callable:
    """The compiled DeepFool loop for a batch (at most ``steps``, a runtime argument so that
    ``run_attack``'s staged runs share one compilation)."""
    c1 = candidates - 1

    def run(call, x0, y, mask, steps):
        logits0 = call(x0)
        classes = ops.cast(ops.flip(ops.argsort(logits0, axis=-1), axis=-1)[:, :candidates],
                           "int32")
        n = ops.shape(x0)[0]
        reps = (c1,) + (1,) * (len(ops.shape(x0)) - 1)
        # The stacked batch: block k - 1 holds every input with the k-th class as its target.
        ik = ops.reshape(ops.transpose(classes[:, 1:]), (-1,))
        i0 = ops.tile(classes[:, 0], (c1,))

        def loss_fn(xs):
            logits = call(xs)
            if loss == "logits":
                l0, lk = _pick(logits, i0), _pick(logits, ik)
            else:
                l0, lk = -B.sparse_ce(i0, logits), -B.sparse_ce(ik, logits)
            per = lk - l0
            return ops.sum(per), per

        vg = B.value_and_grad_aux(loss_fn)

        def cond(step, x, p_total, is_adv):
            done = ops.all(ops.logical_or(is_adv, ops.logical_not(mask)))
            return ops.logical_and(step < steps, ops.logical_not(done))

        def body(step, x, p_total, is_adv):
            (_, per), g = vg(ops.tile(x, reps))
            losses = ops.transpose(ops.reshape(per, (c1, n)))                 # (n, c1)
            grads = ops.transpose(ops.reshape(g, (c1, n, -1)), (1, 0, 2))     # (n, c1, D)
            distances = ops.abs(losses) / (ops.sqrt(ops.sum(ops.square(grads), axis=-1))
                                           + 1e-8)
            best = ops.cast(ops.argmin(distances, axis=1), "int32")
            distances = _pick(distances, best)
            grads = ops.take_along_axis(grads, ops.reshape(best, (-1, 1, 1)), axis=1)[:, 0]
            distances = distances + 1e-4  # for numerical stability (Foolbox)
            p_step = _expand(distances / (ops.sqrt(_flat_sq_norm(grads)) + 1e-8),
                             grads) * grads
            p_total = p_total + ops.reshape(p_step, ops.shape(x))
            x = ops.where(_expand(is_adv, x), x, x0 + (1.0 + overshoot) * p_total)
            x = ops.clip(x, 0.0, 1.0)
            return step + 1, x, p_total, _misclassified(call(x), y)

        out = ops.while_loop(cond, body, (ops.convert_to_tensor(0, "int32"), x0,
                                          ops.zeros_like(x0), _misclassified(logits0, y)))
        return out[1]

    return run


def deepfool_l2(model: keras.Model, x: np.ndarray, y: np.ndarray, *, steps: int = 50,
                candidates: int | None = 10, overshoot: float = 0.02, loss: str = "logits",
                batch_size: int = 256, jit_compile: bool = False) -> np.ndarray:
    """Foolbox 3.3.4's ``L2DeepFoolAttack`` (its defaults) on ``model`` (logits, [0, 1]
    inputs), compiled: ``x`` ``(N, ...)``, labels ``y`` ``(N,)`` -> the perturbed inputs
    ``(N, ...)`` float32 (an input misclassified from the start comes back as it is; one not
    fooled within ``steps`` comes back where the last step left it). ``loss``: ``"logits"``
    or ``"crossentropy"``. ``jit_compile``: XLA on TensorFlow (JAX always)."""
    if loss not in DEEPFOOL_LOSSES:
        raise DareError(f"expected loss to be 'logits' or 'crossentropy', got {loss!r}")
    x, y = _check_inputs(x, y)
    out = x.copy()
    classes = int(model.output_shape[-1])
    cand = classes if candidates is None else min(int(candidates), classes)
    if cand < 2:
        raise DareError(f"DeepFool needs at least 2 candidate classes; received {candidates} "
                        f"for a model with {classes} outputs")
    if len(x) == 0 or steps < 1:
        return out
    run = _compiled(model, ("deepfool", cand, float(overshoot), loss),
                    lambda: _deepfool_run(cand, float(overshoot), loss), jit_compile)
    for start, n, xb, yb in _batches(x, y, batch_size, jit_compile):
        mask = ops.convert_to_tensor(np.arange(len(xb)) < n)
        adv = run(ops.convert_to_tensor(xb), ops.convert_to_tensor(yb), mask,
                  ops.convert_to_tensor(np.int32(steps)))
        out[start:start + n] = B.to_numpy(adv)[:n]
    return out
