"""Uncertainty of the evaluation's figures: 95% intervals, and paired comparisons of methods.

- ``wilson``: the Wilson score interval of a proportion (robust accuracy, success rate, clean
  accuracy), from SciPy's ``binomtest(...).proportion_ci(method="wilson")``.
- ``er_interval``: a bootstrap interval of Empirical Robustness over the test images (ER is a
  mean over the images an attack fools, so each resample recomputes which images count).
- ``paired_difference``: a paired bootstrap interval of ``ER(a) - ER(b)`` for two methods
  evaluated on the same images; a win is significant when the interval excludes 0.

Every bootstrap is seeded, so a report is reproducible. Per-image ER values are the relative
minimal perturbations of the images the attack fooled and NaN elsewhere (not fooled, or
misclassified to begin with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """An estimate and its ``level`` confidence interval ``[low, high]`` (NaN if undefined)."""

    value: float
    low: float
    high: float

    def excludes(self, x: float = 0.0) -> bool:
        """Whether ``x`` lies outside the interval (False when the interval is undefined)."""
        return bool(self.low > x or self.high < x)

    def as_dict(self, name: str) -> dict[str, float]:
        return {name: self.value, f"{name}_low": self.low, f"{name}_high": self.high}


NAN = Interval(math.nan, math.nan, math.nan)


def wilson(k: int, n: int, level: float = LEVEL) -> Interval:
    """Proportion ``k / n`` with its Wilson score interval; NaN when ``n == 0``."""
    if n == 0:
        return NAN
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high))


def _nanmean(a: np.ndarray, axis: int = -1) -> np.ndarray:
    # A resample that contains no fooled image has no ER; NaN, counted by the caller.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(a, axis=axis) / np.sum(~np.isnan(a), axis=axis)


def _bootstrap(data: tuple[np.ndarray, ...], statistic, seed: int, level: float) -> Interval:
    """Paired percentile bootstrap: every sample in ``data`` is resampled with the same image
    indices. Written out rather than ``scipy.stats.bootstrap`` because ER is undefined on a
    resample without a fooled image: such resamples are dropped (the interval is conditional
    on at least one fooled image), where SciPy would turn the whole interval into NaN."""
    value = float(statistic(*data, axis=-1))
    if not math.isfinite(value):
        return NAN
    n = len(data[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(N_RESAMPLES, n))
    boot = statistic(*(d[idx] for d in data), axis=-1)
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return NAN
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(value, float(low), float(high))


def er_interval(per_image: np.ndarray, seed: int = 0, level: float = LEVEL) -> Interval:
    """ER = mean of the non-NaN entries of ``per_image`` ``(N,)``, with a percentile bootstrap
    interval over the N test images. NaN when no image was fooled; a single fooled image gives
    a zero-width interval (its bootstrap has nothing to vary)."""
    per_image = np.asarray(per_image, dtype=np.float64)
    if np.isnan(per_image).all():
        return NAN
    if np.sum(~np.isnan(per_image)) == 1 or len(per_image) == 1:
        v = float(np.nanmean(per_image))
        return Interval(v, v, v)
    return _bootstrap((per_image,), _nanmean, seed, level)


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """``ER(a) - ER(b)`` for per-image values of two methods on the same N images ``(N,)``,
    with a paired percentile bootstrap interval (the same images resampled for both)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same images: {a.shape} vs {b.shape}")

    def diff(x, y, axis=-1):
        return _nanmean(x, axis) - _nanmean(y, axis)

    return _bootstrap((a, b), diff, seed, level)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for one value) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan
