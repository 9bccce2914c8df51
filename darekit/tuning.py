"""Fair tuning: every method gets the same small learning-rate sweep, selected on held-out
validation images, never on test images.

The paper reports DARE at its best learning rate per model; the baselines deserve the same.
For each method (DARE, DARE-S, DARE-SL, each adversarial fine-tuning baseline) the sweep tries
its default learning rate times each of ``factors`` (three values a decade apart by default),
and keeps the candidate that is most robust under a cheap attack (PGD at the dataset's L-inf
budget) on a held-out part of ``x_validation``, among the candidates whose clean accuracy on
those images is within ``max_drop`` of the original model's. The held-out images are set aside
before mining (``holdout.npz``), so neither DARE's data nor any tuning sees them.

If no candidate keeps its clean accuracy within ``max_drop``, the one with the smallest drop is
chosen and the choice says so; a candidate that diverged is never chosen; when every candidate
diverged, the method diverged. Every candidate's figures and the choice are written to
``tune/<method>.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np

from darekit import io, layout
from darekit.config import option
from darekit.data import balanced_subset, dataset_spec
from darekit.errors import DareError
from darekit.rundir import Run


@dataclass(frozen=True)
class SelectConfig:
    """The learning-rate sweep and how its candidates are compared."""

    factors: tuple[float, ...] = option((0.1, 1.0, 10.0), "learning rates tried, as "
                                        "multiples of each method's own")
    holdout: int = option(1000, "x_validation images set aside before mining, to select on")
    steps: int = option(10, "steps of the selection's PGD (at the dataset's L-inf budget)")
    max_drop: float = option(0.01, "largest drop in clean accuracy on the held-out images a "
                             "candidate may cost")
    seed: int = option(0, "seeds the held-out draw and the attack's random starts")

    def __post_init__(self) -> None:
        if not self.factors or any(not (f > 0 and math.isfinite(f)) for f in self.factors):
            raise DareError(f"--factors must be positive numbers; received {self.factors}")
        if self.holdout < 10 or self.steps < 1 or not 0 <= self.max_drop < 1:
            raise DareError("--holdout must be >= 10, --steps >= 1, --max-drop in [0, 1)")


# ---------------------------------------------------------------------------- held-out images
def holdout_indices(y_validation: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices into ``x_validation`` of a seeded class-balanced sample of ``n``."""
    if n >= len(y_validation):
        raise DareError(f"cannot hold out {n} of {len(y_validation)} validation images")
    return np.sort(balanced_subset(y_validation, n, seed))


def write_holdout(run: Run, cfg: SelectConfig) -> np.ndarray:
    """Set ``cfg.holdout`` validation images aside (``holdout.npz``): mining skips them."""
    idx = holdout_indices(run.data().y_validation, cfg.holdout, cfg.seed)
    io.write_npz(run.file(layout.HOLDOUT), idx=idx)
    return idx


# ---------------------------------------------------------------------------- model-first
@dataclass(frozen=True)
class Candidate:
    """One learning rate's result: ``status`` ``ok``, ``diverged`` or ``no-op`` (the weights
    did not move); figures on the held-out images (NaN when not ok)."""

    lr: float
    status: str
    clean_accuracy: float
    robust_accuracy: float
    extra: dict[str, Any]


def measure(model: keras.Model, x: np.ndarray, y: np.ndarray, eps: float, cfg: SelectConfig
            ) -> tuple[float, float]:
    """``(clean accuracy, PGD robust accuracy at eps)`` of ``model`` on ``x``, ``y``."""
    from darekit.adv_training import PGDConfig, robust_evaluation

    r = robust_evaluation(model, x, y, PGDConfig(eps=eps, steps=cfg.steps,
                                                 step_size=2.5 * eps / cfg.steps),
                          seed=cfg.seed)
    return r["clean_accuracy"], r["robust_accuracy"]


def choose(candidates: Sequence[Candidate], reference_accuracy: float,
           max_drop: float) -> tuple[Candidate | None, str]:
    """The most robust candidate within ``max_drop`` of ``reference_accuracy`` (ties: the
    higher clean accuracy, then the smaller lr); else the one with the smallest drop. Returns
    ``(choice or None when no candidate is a result (diverged or no-op), why)``."""
    ok = [c for c in candidates if c.status == "ok"]
    if not ok:  # diverged, or no-op (the weights did not move): not results
        return None, "no candidate is a result: " + ", ".join(
            f"lr {c.lr:g} {c.status}" for c in candidates)
    within = [c for c in ok if c.clean_accuracy >= reference_accuracy - max_drop - 1e-12]
    if within:
        best = max(within, key=lambda c: (c.robust_accuracy, c.clean_accuracy, -c.lr))
        return best, (f"most robust ({best.robust_accuracy:.4f}) of the {len(within)} "
                      f"candidates within {max_drop:g} of the original's clean accuracy")
    best = max(ok, key=lambda c: (c.clean_accuracy, c.robust_accuracy, -c.lr))
    return best, (f"no candidate kept its clean accuracy within {max_drop:g}: the smallest "
                  f"drop ({reference_accuracy - best.clean_accuracy:.4f})")


# ---------------------------------------------------------------------------- a run's method
Train = Callable[[float], tuple[keras.Model, str, dict[str, Any]]]
"""``train(lr) -> (model, status, summary)``: one candidate fine-tuned from the original."""


def select(run: Run, method: str, default_lr: float, train: Train, cfg: SelectConfig,
           log: Callable[[str], Any] = print) -> tuple[float | None, dict[str, Any]]:
    """Sweep ``method``'s learning rate on ``run``; return the chosen learning rate (None if
    every candidate diverged) and the record written to ``tune/<method>.json``. The caller
    keeps the candidates ``train`` made and saves the chosen one."""
    if not run.file(layout.HOLDOUT).is_file():
        raise DareError(f"run {run.path} has no {layout.HOLDOUT}; the held-out images must be "
                        "set aside before mining (tuning.write_holdout)")
    data = run.data()
    idx = io.read_npz(run.file(layout.HOLDOUT))["idx"]
    x, y = data.x_validation[idx], data.y_validation[idx]
    eps = dataset_spec(run.dataset_name).linf_budget
    ref_clean, ref_robust = measure(run.load_model(), x, y, eps, cfg)
    candidates = []
    for factor in cfg.factors:
        lr = float(default_lr * factor)
        model, status, summary = train(lr)
        clean = robust = math.nan
        if status == "ok":
            clean, robust = measure(model, x, y, eps, cfg)
        candidates.append(Candidate(lr, status, clean, robust, {"summary": summary}))
        log(f"{method}: lr {lr:g}: {status}, held-out clean {clean:.4f}, robust {robust:.4f}")
    choice, why = choose(candidates, ref_clean, cfg.max_drop)
    record = {
        "method": method, "default_lr": default_lr, "config": asdict(cfg),
        "holdout": {"n": int(len(idx)), "original_clean_accuracy": ref_clean,
                    "original_robust_accuracy": ref_robust, "eps": eps},
        "candidates": [asdict(c) for c in candidates],
        "chosen_lr": None if choice is None else choice.lr, "why": why,
        "status": "ok" if choice is not None else
        "diverged" if any(c.status == "diverged" for c in candidates) else "no-op",
    }
    run.write_config(layout.tune_file(method), "tune", record)
    log(f"{method}: chose lr {record['chosen_lr']} ({why})")
    return record["chosen_lr"], record
