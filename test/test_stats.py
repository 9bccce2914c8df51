"""Intervals on hand-made cases: Wilson against its closed form, bootstrap intervals of ER and
of paired ER differences where the answer is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from darekit import stats

Z = 1.959963984540054  # the 97.5% normal quantile


def wilson_closed_form(k: int, n: int) -> tuple[float, float]:
    centre = (k + Z * Z / 2) / (n + Z * Z)
    half = Z / (n + Z * Z) * math.sqrt(k * (n - k) / n + Z * Z / 4)
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (5, 10), (1, 1), (0, 1), (37, 100),
                                  (999, 1000), (1, 1000)])
def test_wilson_matches_its_closed_form(k, n):
    ci = stats.wilson(k, n)
    low, high = wilson_closed_form(k, n)
    assert ci.value == k / n
    assert ci.low == pytest.approx(max(low, 0.0), abs=1e-12)
    assert ci.high == pytest.approx(min(high, 1.0), abs=1e-12)
    assert 0 <= ci.low <= ci.value <= ci.high <= 1


def test_wilson_of_nothing_is_undefined():
    ci = stats.wilson(0, 0)
    assert math.isnan(ci.value) and not ci.excludes(0.0)


def test_er_interval_edge_cases():
    assert math.isnan(stats.er_interval(np.full(5, np.nan)).value)    # nothing fooled
    one = stats.er_interval(np.array([np.nan, 0.3, np.nan]))
    assert (one.value, one.low, one.high) == (0.3, 0.3, 0.3)           # nothing to resample
    const = stats.er_interval(np.array([0.2, 0.2, np.nan, 0.2]))
    assert const.low == pytest.approx(0.2) and const.high == pytest.approx(0.2)


def test_er_interval_keeps_resamples_with_few_fooled_images():
    # 3 fooled images among 100: most resamples contain one; those without are dropped, the
    # interval stays defined and inside the range of the fooled values.
    v = np.full(100, np.nan)
    v[:3] = [0.1, 0.2, 0.3]
    ci = stats.er_interval(v)
    assert ci.value == pytest.approx(0.2) and 0.1 <= ci.low < 0.2 < ci.high <= 0.3


def test_er_interval_agrees_with_the_normal_approximation_on_many_images():
    rng = np.random.default_rng(1)
    v = rng.normal(0.15, 0.03, 4000)
    v[rng.random(4000) < 0.3] = np.nan                # 30% not fooled
    ci = stats.er_interval(v, seed=2)
    f = v[~np.isnan(v)]
    half = Z * f.std(ddof=1) / math.sqrt(len(f))
    # The bootstrap also varies the number of fooled images; at this size both agree closely.
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.15)
    assert ci.low < f.mean() < ci.high
    assert stats.er_interval(v, seed=2) == ci                       # seeded


def test_paired_difference_of_a_shift_is_exact():
    rng = np.random.default_rng(3)
    b = rng.uniform(0.05, 0.3, 200)
    b[rng.random(200) < 0.2] = np.nan
    a = b + 0.01                                      # same fooled images, every ER +0.01
    d = stats.paired_difference(a, b)
    assert d.value == pytest.approx(0.01)
    assert d.low == pytest.approx(0.01) and d.high == pytest.approx(0.01)
    assert d.excludes(0.0)
    # Unpaired, the same two methods' intervals overlap: only pairing reveals the win.
    ia, ib = stats.er_interval(a), stats.er_interval(b)
    assert ia.low < ib.high


def test_paired_difference_of_the_same_method_is_zero_and_not_significant():
    rng = np.random.default_rng(4)
    a = rng.uniform(0.05, 0.3, 50)
    d = stats.paired_difference(a, a.copy())
    assert d.value == d.low == d.high == 0.0 and not d.excludes(0.0)


def test_paired_difference_of_noise_is_not_significant():
    rng = np.random.default_rng(5)
    a = rng.normal(0.2, 0.05, 60)
    b = a + rng.normal(0.0, 0.05, 60)                 # no true difference
    assert not stats.paired_difference(a, b, seed=0).excludes(0.0)
    with pytest.raises(ValueError, match="same images"):
        stats.paired_difference(a, b[:10])


def test_mean_std():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    m, s = stats.mean_std([0.5])
    assert m == 0.5 and math.isnan(s)
    assert stats.mean_std([1.0, math.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert all(math.isnan(v) for v in stats.mean_std([]))
