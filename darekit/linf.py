"""The L-inf signed-gradient attack, written once for every backend (FGSM, BIM, PGD).

Pure functions of ``call(x) -> logits`` (a model as a pure function, ``darekit.backend``), meant
to run inside a compiled function. The evaluation engine (``darekit.engine``, one epsilon per
input), PGD adversarial training (``darekit.adv_training``) and the GPU benchmarks use them.
Each mirrors one line of Foolbox 3 (``gradient_descent_base.py``) with the same operations in
the same order, so the engine's float32 results agree with Foolbox's.

Shapes: ``x``, ``x0`` ``(B, H, W, C)`` in [0, 1]; ``y`` ``(B,)`` integer labels; ``eps`` and
``stepsize`` broadcast against ``x`` (a scalar, or ``(B, 1, 1, 1)`` from ``per_input``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras import ops

from darekit import backend as B

Call = Callable[[Any], Any]


def per_input(v: Any, x: Any) -> Any:
    """``(B,)`` -> ``(B, 1, ..., 1)``: broadcastable against ``x`` ``(B, H, W, C)``."""
    return ops.reshape(v, (-1,) + (1,) * (len(ops.shape(x)) - 1))


def project(x: Any, x0: Any, eps: Any) -> Any:
    """``x0 + clip(x - x0, -eps, eps)``: Foolbox's ``project`` and ``clip_perturbation``."""
    return x0 + ops.clip(x - x0, -eps, eps)


def step(x: Any, x0: Any, direction: Any, stepsize: Any, eps: Any) -> Any:
    """One iteration of Foolbox's loop, given the signed gradient ``direction``."""
    x = x + stepsize * direction   # GDOptimizer: stepsize * gradient (times sign 1.0)
    x = project(x, x0, eps)
    return ops.clip(x, 0.0, 1.0)


LOSSES: dict[str, Callable[[Any, Any], Any]] = {
    # Foolbox's loss: the cross-entropy, which raises every wrong class at once.
    "ce": lambda logits, y: B.sparse_ce(y, logits),
    # Carlini-Wagner's margin: pushes the best wrong class past the true one, which is what
    # flips the label (on a linear model the CE ascent stops short of the L-inf optimum).
    "margin": lambda logits, y: -B.margin(logits, y),
}
"""Per-example losses ``(B,)`` that the attack ascends."""


def gradient_sign(call: Call, x: Any, y: Any, loss: str = "ce") -> Any:
    """``sign(d/dx sum_i loss(call(x)_i, y_i))`` ``(B, H, W, C)``."""
    fn = LOSSES[loss]
    return ops.sign(B.grad(lambda z: ops.sum(fn(call(z), y)))(x))


def random_start(x0: Any, eps: Any, seed: Any) -> Any:
    """Foolbox's start ``x0 + uniform(-eps, eps)`` clipped to [0, 1], drawn statelessly from
    ``seed`` ``(2,)`` (same distribution as Foolbox's, not the same draws)."""
    u = B.stateless_uniform(ops.shape(x0), seed)
    return ops.clip(x0 + (u * (eps + eps) - eps), 0.0, 1.0)


def pgd(call: Call, x0: Any, y: Any, eps: Any, stepsize: Any, steps: int, *,
        start: Any | None = None, loss: str = "ce") -> Any:
    """``steps`` signed-gradient steps from ``start`` (``x0`` when ``None``; ``random_start``
    for PGD), each projected on the eps-ball and [0, 1]. The loop unrolls (``steps`` is a
    Python int); the result carries no gradient."""
    x = x0 if start is None else start
    for _ in range(int(steps)):
        x = step(x, x0, gradient_sign(call, x, y, loss), stepsize, eps)
    return B.stop_gradient(x)
