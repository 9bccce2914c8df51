"""A compiled L-inf gradient-attack engine (FGSM, BIM, PGD, PGD on the margin) with one
epsilon per input.

Foolbox 3 (``darekit.attacks``) runs a fixed-epsilon attack at one scalar epsilon per call, so a
minimal-epsilon bisection, where every input sits at its own midpoint, would need one Foolbox call
per distinct epsilon. ``LinfEngine`` takes an epsilon *vector* ``(N,)`` and attacks every input at
its own budget in one batched, compiled pass:

- ``LinfGradient``: the attack (steps, step size relative to epsilon or absolute, random start,
  loss: Foolbox's cross-entropy or, for ``pgd-margin``, C&W's margin), read from the registry
  (``LinfGradient.from_spec("bim")``), so its parameters are Foolbox's.
- ``LinfEngine(model, attack)(x, y, eps, seed) -> (x_adv, success)``.
- ``FGSMLine(model, x, y)``: FGSM's direction ``sign(grad)`` does not depend on epsilon, so the
  minimal FGSM epsilon of an input is a search along one line: one gradient per input, then
  forward passes only. ``FGSMLine(idx, eps)`` equals ``LinfEngine(FGSM)(x[idx], y[idx], eps)``.
- ``Work``: counters of per-input gradient and forward passes, for benchmarks.

Foolbox is the reference: at equal epsilons the engine performs Foolbox's operations in Foolbox's
order on the same float32 values (``LinfBaseGradientDescent.run`` then ``FixedEpsilonAttack``'s
``clip_perturbation`` and misclassification check), so FGSM and BIM agree with Foolbox to float32
rounding (in practice bit for bit; the gradient is computed in our graph rather than through
Foolbox's eager tape, which may round a near-zero gradient entry differently). Two deliberate
differences:

- PGD's random start is drawn statelessly (``darekit.backend.stateless_uniform``) from
  ``(seed, batch index)`` rather than the backend's global RNG, so a call is reproducible (same
  distribution as Foolbox's, not the same draws; TensorFlow and JAX draw different numbers).
- ``x_adv`` is additionally clipped to [0, 1], as ``run_attack`` stores Foolbox's result
  (a no-op up to float rounding); ``success`` is computed, as in Foolbox, on the image before
  that clip.

The attack is ``darekit.linf`` (written once for TensorFlow and JAX) over the model as a pure
function of its current weights (``darekit.backend.model_function``). The parity above is
TensorFlow's in exact mode (``jit_compile=False``); on JAX everything runs under XLA, with the
same operations, so results agree with TensorFlow's to float32 rounding.

Epsilons are taken as float64: Foolbox forms the step size ``rel_stepsize * epsilon`` in Python
float64 and TensorFlow rounds it to float32; the engine does the same per input. Pass epsilons as
float64 (Python floats, a float64 array) for bit-level parity with a Foolbox call at that epsilon.
"""

from __future__ import annotations

import collections
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import foolbox as fb
import keras
import numpy as np
from foolbox.attacks.gradient_descent_base import BaseGradientDescent, LinfBaseGradientDescent
from keras import ops

from darekit import backend as B
from darekit import linf
from darekit.attacks import get_spec
from darekit.errors import DareError

__all__ = ["Adversarials", "FGSMLine", "LinfEngine", "LinfGradient", "Work"]


# ---------------------------------------------------------------------------- the attack
@dataclass(frozen=True)
class LinfGradient:
    """An L-inf signed-gradient attack, as Foolbox's ``LinfBaseGradientDescent`` runs it.

    ``steps`` steps of ``x += stepsize * sign(grad loss)``, each projected on the eps-ball and
    [0, 1]; ``stepsize = rel_stepsize * eps`` per input, or ``abs_stepsize`` when given;
    ``loss``: a key of ``darekit.linf.LOSSES`` (``ce``, Foolbox's; ``margin``, C&W's).
    FGSM is ``LinfGradient(1, 1.0, False)``; BIM and PGD differ in ``random_start``;
    ``pgd-margin`` is PGD with ``loss="margin"``.
    """

    steps: int
    rel_stepsize: float
    random_start: bool
    abs_stepsize: float | None = None
    loss: str = "ce"

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 1:
            raise DareError(f"steps must be a positive integer; received {self.steps}")
        if not math.isfinite(self.rel_stepsize) or self.rel_stepsize < 0:
            raise DareError(f"rel_stepsize must be >= 0; received {self.rel_stepsize}")
        if self.abs_stepsize is not None and not (math.isfinite(self.abs_stepsize)
                                                  and self.abs_stepsize >= 0):
            raise DareError(f"abs_stepsize must be >= 0 or None; received {self.abs_stepsize}")
        if self.loss not in linf.LOSSES:
            raise DareError(f"loss must be one of {sorted(linf.LOSSES)}; received {self.loss!r}")

    @classmethod
    def fgsm(cls) -> LinfGradient:
        """Foolbox's ``LinfFastGradientAttack``: one step of size epsilon from the clean input."""
        return cls(steps=1, rel_stepsize=1.0, random_start=False)

    @classmethod
    def from_foolbox(cls, attack: fb.attacks.base.Attack) -> LinfGradient:
        """The parameters of a Foolbox L-inf gradient attack (FGSM, BIM, PGD).

        Only plain signed-gradient descent is supported, on the cross-entropy or on a loss
        that the attack's class declares as ``linf_loss`` (a key of ``darekit.linf.LOSSES``,
        e.g. ``pgd-margin``'s): an attack that overrides the optimizer (Adam variants), the
        gradient, or the loss without declaring it is a ``DareError``.
        """
        loss = _loss_of(type(attack))
        plain = loss is not None and all(
            getattr(type(attack), name) is getattr(BaseGradientDescent, name)
            for name in ("get_optimizer", "value_and_grad"))
        if not (isinstance(attack, LinfBaseGradientDescent) and plain):
            raise DareError(f"LinfEngine runs plain L-inf gradient attacks (FGSM, BIM, PGD, "
                            f"PGD on the margin); received {attack!r}")
        return cls(steps=int(attack.steps), rel_stepsize=float(attack.rel_stepsize),
                   random_start=bool(attack.random_start),
                   abs_stepsize=None if attack.abs_stepsize is None
                   else float(attack.abs_stepsize), loss=loss)

    @classmethod
    def from_spec(cls, name: str, params: Mapping[str, Any] | None = None) -> LinfGradient:
        """The registered attack ``name`` (``fgsm``, ``bim``, ``pgd``) with ``params`` overriding
        its defaults, exactly as ``darekit.attacks.get_attack(name, **params)`` builds it."""
        return cls.from_foolbox(get_spec(name).build(**dict(params or {})))

    def stepsizes(self, eps: np.ndarray) -> np.ndarray:
        """Per-input step sizes ``(N,)`` float32 for epsilons ``(N,)``.

        Foolbox computes ``rel_stepsize * epsilon`` in Python float64 and TensorFlow rounds the
        product to float32; rounding ``float32(eps)`` first would differ in the last bit.
        """
        eps = np.asarray(eps, np.float64)
        if self.abs_stepsize is not None:
            return np.full(eps.shape, self.abs_stepsize, np.float32)
        return (self.rel_stepsize * eps).astype(np.float32)


def _loss_of(cls: type) -> str | None:
    """The ``darekit.linf.LOSSES`` key of a Foolbox gradient attack's loss: ``ce`` for
    Foolbox's own ``get_loss_fn``; else the ``linf_loss`` declared by the class that defines
    the ``get_loss_fn`` in use (``None``: an undeclared loss the engine cannot run)."""
    if cls.get_loss_fn is BaseGradientDescent.get_loss_fn:
        return "ce"
    owner = next(c for c in cls.__mro__ if "get_loss_fn" in vars(c))
    loss = vars(owner).get("linf_loss")
    return loss if loss in linf.LOSSES else None


@dataclass
class Work:
    """Work done, counted per input (a batch of B inputs counts B).

    ``gradients``: forward + backward passes (one per input per attack step);
    ``forwards``: forward-only passes (the misclassification check after an attack);
    ``batches``: calls of a compiled function.
    """

    gradients: int = 0
    forwards: int = 0
    batches: int = 0

    def reset(self) -> None:
        self.gradients = self.forwards = self.batches = 0


# ---------------------------------------------------------------------------- compiled pieces
# The L-inf step is darekit.linf's (Foolbox's operations in Foolbox's order); these add
# Foolbox's final check (FixedEpsilonAttack.__call__).
def _finish(call: linf.Call, x: Any, x0: Any, y: Any, eps: Any) -> tuple[Any, Any, Any]:
    """FixedEpsilonAttack.__call__: clip the perturbation to eps, check misclassification.
    Also returns the logit margin of the result (for searches that interpolate)."""
    xpc = linf.project(x, x0, eps)
    logits = call(xpc)
    success = ops.not_equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), y)
    return ops.clip(xpc, 0.0, 1.0), success, B.margin(logits, y)


class Adversarials(NamedTuple):
    """``x_adv`` ``(N, H, W, C)`` float32; ``success`` ``(N,)`` bool (``x_adv`` misclassified);
    ``margin`` ``(N,)`` float32: ``z_y - max_{j != y} z_j`` at ``x_adv`` (negative: fooled)."""

    x_adv: np.ndarray
    success: np.ndarray
    margin: np.ndarray


# ---------------------------------------------------------------------------- helpers
def _check_inputs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float32)
    # int32 labels: JAX runs in 32 bits (int64 would be truncated with a warning); TensorFlow's
    # cross-entropy gives the same values for either.
    y = np.asarray(y).astype(np.int32, copy=False)
    if x.ndim < 2 or y.shape != (len(x),):
        raise DareError(f"cannot attack inputs {x.shape} with labels {y.shape}")
    return x, y


def _check_eps(eps: np.ndarray | float, n: int) -> np.ndarray:
    """``(n,)`` float64 epsilons (a scalar is broadcast); each finite and >= 0."""
    e = np.asarray(eps, np.float64)
    if e.ndim == 0:
        e = np.full(n, float(e))
    if e.shape != (n,):
        raise DareError(f"expected one epsilon or {n}; received shape {e.shape}")
    if not np.all(np.isfinite(e) & (e >= 0)):
        raise DareError("every epsilon must be finite and >= 0")
    return e


BUCKETS = B.BUCKETS
"""Padded batch sizes (``darekit.backend.BUCKETS``): XLA compiles once per shape, and a
bisection's open sets take every size. Batches are padded on JAX always, on TensorFlow with
XLA only (exact mode keeps TensorFlow's results as they were)."""


def _padded(n: int, batch_size: int, jit: bool) -> int:
    return B.bucket(n, batch_size) if B.needs_buckets(jit) else n


_pad = B.pad_rows


def _tensors(*arrays: np.ndarray) -> list[Any]:
    return [ops.convert_to_tensor(a) for a in arrays]


class _Compiled:
    """The engine's pieces as compiled functions of the model's current weights
    (``B.model_function``): exact graphs on TensorFlow (Foolbox's operations in Foolbox's
    order), or XLA-compiled ones (``jit``: about 2.4x faster on a CPU for AlexNet, float
    results that may differ from Foolbox's in the last bits, so a gradient entry near 0 may
    change sign). JAX always compiles with XLA. ``traces`` counts the traces of each piece
    (a Python side effect runs once per trace on both backends)."""

    def __init__(self, model: keras.Model, shape: tuple[int, ...], jit: bool):
        del shape  # the functions trace per input shape; one object per image shape is kept
        self.traces: collections.Counter[str] = collections.Counter()

        def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def traced(*args: Any) -> Any:
                self.traces[name] += 1
                return fn(*args)
            return traced

        def compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            return B.model_function(model, counted(name, fn), jit_compile=jit)

        def step_on(loss: str) -> Callable[..., Any]:
            def step(call, x, x0, y, eps, stepsize):
                return linf.step(x, x0, linf.gradient_sign(call, x, y, loss),
                                 linf.per_input(stepsize, x0), linf.per_input(eps, x0))
            return step

        def finish(call, x, x0, y, eps):
            return _finish(call, x, x0, y, linf.per_input(eps, x0))

        def direction(call, x0, y):
            return ops.cast(linf.gradient_sign(call, x0, y), "int8")

        def line(call, x0, d, y, eps, stepsize):
            e = linf.per_input(eps, x0)
            x = linf.step(x0, x0, ops.cast(d, "float32"), linf.per_input(stepsize, x0), e)
            return _finish(call, x, x0, y, e)

        # Never XLA on TensorFlow: its stateless RNG draws other numbers from the same seed
        # under XLA, and the draw must not depend on the compilation mode.
        self.start = B.jit(counted("start", lambda x0, eps, seed: linf.random_start(
            x0, linf.per_input(eps, x0), seed)), jit_compile=False)
        self.finish = compiled("finish", finish)
        self.direction, self.line = compiled("direction", direction), compiled("line", line)
        # One compiled step per loss, built on first use ("step" keeps its name for "ce").
        self._compile_step = lambda loss: compiled(
            "step" if loss == "ce" else f"step-{loss}", step_on(loss))
        self._steps: dict[str, Callable[..., Any]] = {}
        self.step = self.step_on("ce")

    def step_on(self, loss: str) -> Callable[..., Any]:
        """The compiled attack step ascending ``linf.LOSSES[loss]``."""
        if loss not in self._steps:
            self._steps[loss] = self._compile_step(loss)
        return self._steps[loss]


class _Functions:
    """One ``_Compiled`` per image shape, built on first use.

    Shared by every engine of the same model object and mode (``functions(model, jit)``):
    the compiled graphs read the model's variables, so loading other weights into the same
    model (the methods of one evaluation) reuses them, XLA compilations included.
    """

    def __init__(self, model: keras.Model, jit: bool):
        self.model, self.jit = model, jit
        self._by_shape: dict[tuple[int, ...], _Compiled] = {}

    def __call__(self, shape: tuple[int, ...]) -> _Compiled:
        if shape not in self._by_shape:
            self._by_shape[shape] = _Compiled(self.model, shape, self.jit)
        return self._by_shape[shape]

    def values(self):
        return self._by_shape.values()


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def functions(model: keras.Model, jit: bool) -> _Functions:
    """The compiled pieces of ``model`` in one mode, created once per model object."""
    by_mode = _SHARED.setdefault(model, {})
    if jit not in by_mode:
        by_mode[jit] = _Functions(model, jit)
    return by_mode[jit]


def _concat(outs: list[list[np.ndarray]], n: int) -> Adversarials:
    return Adversarials(*(np.concatenate(parts)[:n] if parts else None
                          for parts in zip(*outs, strict=True)))


# ---------------------------------------------------------------------------- the engine
class LinfEngine:
    """``attack`` on ``model`` (logits, [0, 1] inputs) with one epsilon per input.

    ``engine(x, y, eps, seed) -> (x_adv, success)``, batched by ``batch_size``;
    ``engine.attack_all(...)`` also returns the logit margins. Each step is one call of a
    compiled function (TensorFlow: one relaxed trace serves every batch size; JAX and XLA:
    batches padded to ``BUCKETS``, one compilation per bucket). ``jit_compile``: XLA on
    TensorFlow (see ``_Compiled``); off, the engine reproduces Foolbox bit for bit. JAX
    always compiles. ``engine.work`` counts the passes done.
    """

    def __init__(self, model: keras.Model, attack: LinfGradient, batch_size: int = 256,
                 jit_compile: bool = False):
        if batch_size < 1:
            raise DareError(f"batch_size must be positive; received {batch_size}")
        self.model, self.attack, self.batch_size = model, attack, int(batch_size)
        self.jit_compile = bool(jit_compile)
        self.work = Work()
        self._functions = functions(model, self.jit_compile)

    def attack_all(self, x: np.ndarray, y: np.ndarray, eps: np.ndarray | float,
                   seed: int = 0) -> Adversarials:
        """Attack ``x`` ``(N, H, W, C)`` float32 in [0, 1] with labels ``y`` ``(N,)``, input
        ``i`` at budget ``eps[i]`` (``eps``: ``(N,)`` or a scalar, >= 0, read as float64).

        ``x_adv`` satisfies ``||x_adv - x||_inf <= eps`` and lies in [0, 1]; ``success`` is
        Foolbox's (an input misclassified to begin with counts). With a random start, batch
        ``b`` draws from ``(seed, b)``: the same call gives the same result.
        """
        x, y = _check_inputs(x, y)
        eps = _check_eps(eps, len(x))
        stepsize, eps32 = self.attack.stepsizes(eps), eps.astype(np.float32)
        if len(x) == 0:
            return Adversarials(x.copy(), np.zeros(0, bool), np.zeros(0, np.float32))
        f = self._functions(tuple(x.shape[1:]))
        outs = []
        for b, i in enumerate(range(0, len(x), self.batch_size)):
            j = slice(i, i + self.batch_size)
            n = len(x[j])
            m = _padded(n, self.batch_size, self.jit_compile)
            x0, yb, e, s = _tensors(*(_pad(a[j], m) for a in (x, y, eps32, stepsize)))
            xa = f.start(x0, e, B.seed_array(seed, b)) if self.attack.random_start else x0
            step = f.step_on(self.attack.loss)
            for _ in range(self.attack.steps):
                xa = step(xa, x0, yb, e, s)
            outs.append([B.to_numpy(o)[:n] for o in f.finish(xa, x0, yb, e)])
            self.work.gradients += n * self.attack.steps
            self.work.forwards += n
            self.work.batches += 1
        return _concat(outs, len(x))

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: np.ndarray | float,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(x_adv, success)`` of ``attack_all``."""
        out = self.attack_all(x, y, eps, seed)
        return out.x_adv, out.success


class FGSMLine:
    """FGSM on fixed inputs ``x`` ``(N, H, W, C)``, ``y`` ``(N,)`` at any epsilons.

    FGSM's adversarial at epsilon is ``x0 + eps * sign(grad(x0))`` projected on the eps-ball and
    [0, 1]: the direction does not depend on epsilon. The constructor computes it once (one
    gradient per input, kept as int8); each call is then forward passes only. Results equal
    ``LinfEngine(model, LinfGradient.fgsm())`` at the same epsilons bit for bit (same ops; the
    per-input gradient does not depend on the batch it is computed in).
    """

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray,
                 batch_size: int = 256, jit_compile: bool = False):
        if batch_size < 1:
            raise DareError(f"batch_size must be positive; received {batch_size}")
        self.model, self.batch_size = model, int(batch_size)
        self.jit_compile = bool(jit_compile)
        self.x, self.y = _check_inputs(x, y)
        self.attack = LinfGradient.fgsm()
        self.work = Work()
        self._f = functions(model, self.jit_compile)(tuple(self.x.shape[1:]))
        parts = []
        for i in range(0, len(self.x), self.batch_size):
            j = slice(i, i + self.batch_size)
            n = len(self.x[j])
            m = _padded(n, self.batch_size, self.jit_compile)
            d = self._f.direction(*_tensors(_pad(self.x[j], m), _pad(self.y[j], m)))
            parts.append(B.to_numpy(d)[:n])
            self.work.gradients += n
            self.work.batches += 1
        self.direction = (np.concatenate(parts) if parts
                          else np.zeros(self.x.shape, np.int8))
        """``(N, H, W, C)`` int8 in {-1, 0, 1}: ``sign(grad)`` at the clean inputs."""

    def __len__(self) -> int:
        return len(self.x)

    def __call__(self, idx: np.ndarray, eps: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """FGSM adversarials of inputs ``idx`` ``(M,)`` (indices into ``x``) at ``eps`` ``(M,)``
        (or a scalar): ``x_adv`` ``(M, H, W, C)`` float32 and ``success`` ``(M,)`` bool."""
        out = self.attack_all(idx, eps)
        return out.x_adv, out.success

    def attack_all(self, idx: np.ndarray, eps: np.ndarray | float) -> Adversarials:
        """As ``__call__``, with the logit margins."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self.x) or idx.max() >= len(self.x)):
            raise DareError(f"indices out of range for {len(self.x)} inputs")
        eps = _check_eps(eps, len(idx))
        stepsize, eps32 = self.attack.stepsizes(eps), eps.astype(np.float32)
        if len(idx) == 0:
            return Adversarials(np.zeros((0, *self.x.shape[1:]), np.float32),
                                np.zeros(0, bool), np.zeros(0, np.float32))
        outs = []
        for i in range(0, len(idx), self.batch_size):
            j = slice(i, i + self.batch_size)
            k = idx[j]
            n = len(k)
            m = _padded(n, self.batch_size, self.jit_compile)
            args = (_pad(self.x[k], m), _pad(self.direction[k], m), _pad(self.y[k], m),
                    _pad(eps32[j], m), _pad(stepsize[j], m))
            outs.append([B.to_numpy(o)[:n] for o in self._f.line(*_tensors(*args))])
            self.work.forwards += n
            self.work.batches += 1
        return _concat(outs, len(idx))
