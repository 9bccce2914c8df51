"""Linear multi-class classifiers whose minimal adversarial perturbations are known in closed
form, and inputs chosen by where those minima fall.

For ``z = x W + b`` (``W`` ``(d, K)``) and an input of class ``y``, the smallest change that
makes class ``j`` win is ``(z_y - z_j) / ||w_y - w_j||_q`` with ``q`` the dual norm (``q = 1``
for L-inf, ``q = 2`` for L2); the minimal perturbation is the smallest over ``j``. Inputs lie
in [0.4, 0.6] and every epsilon searched stays below 0.4, so the box [0, 1] never binds and
the formulas are exact.

``disjoint(...)``: every class reads its own block of pixels. Then the signed gradient of the
cross-entropy raises every other class and lowers the true one at full rate, so FGSM, BIM and
PGD all reach the L-inf optimum: their exact minimal epsilon is the closed form.
``dense(...)``: a random ``W``; FGSM's minimal epsilon along its own direction is still a
closed form (the logits are linear along the line), the L-inf optimum a lower bound for any
attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np


@dataclass(frozen=True, eq=False)
class Linear:
    model: keras.Model
    w: np.ndarray  # (d, K) float64
    b: np.ndarray  # (K,)
    shape: tuple[int, int, int]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float64) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=1)

    def _pairwise(self, x: np.ndarray, ord: float) -> np.ndarray:
        """``(N, K)``: the minimal change that makes each class j win (inf for j = y)."""
        z = self.logits(x)
        y = np.argmax(z, axis=1)
        margin = z[np.arange(len(x)), y][:, None] - z                        # (N, K)
        diff = self.w[:, y].T[:, :, None] - self.w[None, :, :]               # (N, d, K)
        with np.errstate(invalid="ignore", divide="ignore"):  # j = y: 0 / 0, set below
            dist = margin / np.linalg.norm(diff, ord=ord, axis=1)
        dist[np.arange(len(x)), y] = np.inf
        return dist

    def linf_optimum(self, x: np.ndarray) -> np.ndarray:
        """``(N,)``: the smallest L-inf perturbation that changes the prediction."""
        return self._pairwise(x, 1).min(axis=1)

    def l2_optimum(self, x: np.ndarray) -> np.ndarray:
        """``(N,)``: the smallest L2 perturbation that changes the prediction."""
        return self._pairwise(x, 2).min(axis=1)

    def fgsm_minimum(self, x: np.ndarray) -> np.ndarray:
        """``(N,)``: the smallest epsilon at which FGSM's fixed direction
        ``sign(grad_x CE)`` changes the prediction (inf if it never does)."""
        z = self.logits(x)
        y = np.argmax(z, axis=1)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(x)), y] -= 1
        d = np.sign(p @ self.w.T)                                            # (N, d)
        rate = d @ self.w                                                    # (N, K)
        rise = rate - rate[np.arange(len(x)), y][:, None]
        margin = z[np.arange(len(x)), y][:, None] - z
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(rise > 0, margin / rise, np.inf)
        cross[np.arange(len(x)), y] = np.inf
        return cross.min(axis=1)


def _build(w: np.ndarray, b: np.ndarray, shape: tuple[int, int, int]) -> Linear:
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                              keras.layers.Dense(w.shape[1], name="logits")])
    model.get_layer("logits").set_weights([w.astype("float32"), b.astype("float32")])
    # Keep the float32 weights the model really uses for the closed forms.
    w32, b32 = (v.astype(np.float64) for v in model.get_layer("logits").get_weights())
    return Linear(model, w32, b32, shape)


def disjoint(classes: int = 10, block: int = 3, seed: int = 0) -> Linear:
    """Class k reads pixels ``[k*block, (k+1)*block)`` only (positive weights)."""
    rng = np.random.default_rng(seed)
    d = classes * block
    w = np.zeros((d, classes))
    for k in range(classes):
        w[k * block:(k + 1) * block, k] = rng.uniform(0.5, 1.5, block)
    b = rng.normal(0, 0.02, classes)
    return _build(w, b, (1, d, 1))


def dense(classes: int = 10, shape=(4, 4, 1), seed: int = 0) -> Linear:
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    return _build(rng.normal(size=(d, classes)), rng.normal(0, 0.1, classes), tuple(shape))


def inputs_where(lin: Linear, minimum, low: float, high: float, n: int, seed: int = 0,
                 candidates: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` inputs in [0.4, 0.6] whose ``minimum(x)`` lies in ``[low, high]``, spread over
    the interval in log scale (stratified), and their labels (the model's own predictions)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.4, 0.6, size=(candidates, *lin.shape)).astype(np.float32)
    m = minimum(x)
    inside = np.flatnonzero((m >= low) & (m <= high))
    if len(inside) < n:
        raise ValueError(f"only {len(inside)} candidates with minimum in [{low}, {high}]")
    # Stratify on log(minimum) so that "spread" really covers the interval.
    edges = np.geomspace(low, high, n + 1)
    pick = []
    for a, c in zip(edges[:-1], edges[1:], strict=True):
        sel = inside[(m[inside] >= a) & (m[inside] <= c)]
        pick.append(sel[0] if len(sel) else rng.choice(inside))
    pick = np.unique(np.array(pick))
    if len(pick) < n:
        rest = np.setdiff1d(inside, pick)
        pick = np.concatenate([pick, rng.choice(rest, n - len(pick), replace=False)])
    xs = x[np.sort(pick)]
    return xs, lin.predict(xs)
