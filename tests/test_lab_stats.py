"""Tests of normlab.lab.stats against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normlab.lab.stats import (
    Interval,
    compare,
    diff_ci,
    format_interval,
    mean_ci,
    paired_diff_ci,
    verdict,
)

# Student t critical values (two-sided 95% / 90%), from tables: t_{0.975,4}, t_{0.95,4}.
T975_DF4 = 2.7764451051977934
T95_DF4 = 2.1318467863266495


def test_mean_ci_hand_computed() -> None:
    # values 1..5: mean 3, sample sd sqrt(2.5), se = sqrt(2.5 / 5) = sqrt(0.5)
    iv = mean_ci([1, 2, 3, 4, 5])
    half = T975_DF4 * math.sqrt(0.5)
    assert iv.mean == pytest.approx(3.0)
    assert iv.lo == pytest.approx(3.0 - half, rel=1e-12)
    assert iv.hi == pytest.approx(3.0 + half, rel=1e-12)
    assert (iv.n, iv.level) == (5, 0.95)
    assert not iv.degenerate
    assert iv.half_width == pytest.approx(half)


def test_mean_ci_level() -> None:
    iv = mean_ci(np.array([1.0, 2, 3, 4, 5]), level=0.90)
    assert iv.hi - 3.0 == pytest.approx(T95_DF4 * math.sqrt(0.5), rel=1e-12)
    assert iv.level == 0.90


def test_mean_ci_single_value_is_flagged_infinite() -> None:
    iv = mean_ci([0.7])
    assert iv.mean == 0.7
    assert iv.lo == -math.inf and iv.hi == math.inf
    assert iv.degenerate
    assert "n=1" in format_interval(iv)


def test_mean_ci_constant_values_zero_width() -> None:
    iv = mean_ci([2.0, 2.0, 2.0])
    assert (iv.lo, iv.mean, iv.hi) == (2.0, 2.0, 2.0)


def test_mean_ci_nan_propagates() -> None:
    iv = mean_ci([1.0, float("nan"), 2.0])
    assert math.isnan(iv.mean) and math.isnan(iv.lo) and math.isnan(iv.hi)
    assert iv.degenerate


@pytest.mark.parametrize(
    ("values", "level", "match"),
    [([], 0.95, "values is empty"), ([1, 2], 1.0, "level"), ([1, 2], 0.0, "level"),
     ([[1, 2], [3, 4]], 0.95, "one-dimensional"), (["a", "b"], 0.95, "values must be")],
)
def test_mean_ci_errors(values: list, level: float, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        mean_ci(values, level)


def test_diff_ci_welch_hand_computed() -> None:
    # a = 1..5: mean 3, var 2.5 -> var/n = 0.5 ; b = 2,4,6: mean 4, var 4 -> var/n = 4/3
    # se² = 11/6 ; Welch df = se⁴ / (0.5²/4 + (4/3)²/2) = 3.532846715...
    a, b = [1, 2, 3, 4, 5], [2, 4, 6]
    se2 = 0.5 + 4 / 3
    df = se2**2 / (0.5**2 / 4 + (4 / 3) ** 2 / 2)
    assert df == pytest.approx(3.532846715328467)
    t = 2.9274053061524556  # t_{0.975, 3.5328...} (scipy.stats.t.ppf)
    iv = diff_ci(a, b)
    assert iv.mean == pytest.approx(-1.0)
    assert iv.lo == pytest.approx(-1.0 - t * math.sqrt(se2), rel=1e-10)
    assert iv.hi == pytest.approx(-1.0 + t * math.sqrt(se2), rel=1e-10)
    assert iv.n == 3
    # and the same as scipy's own Welch test
    from scipy import stats

    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert (iv.lo, iv.hi) == pytest.approx((ref.low, ref.high), rel=1e-10)


def test_diff_ci_degenerate_cases() -> None:
    one = diff_ci([1.0], [2.0, 3.0])
    assert one.degenerate and one.lo == -math.inf and one.mean == pytest.approx(-1.5)
    const = diff_ci([2.0, 2.0], [1.0, 1.0, 1.0])
    assert (const.lo, const.mean, const.hi) == (1.0, 1.0, 1.0)
    nan = diff_ci([1.0, float("nan")], [1.0, 2.0])
    assert math.isnan(nan.lo)


def test_paired_diff_ci() -> None:
    a, b = [3.0, 5.0, 4.0, 6.0, 7.0], [2.0, 3.0, 3.0, 4.0, 2.0]  # differences 1,2,1,2,5
    iv = paired_diff_ci(a, b)
    ref = mean_ci([1, 2, 1, 2, 5])
    assert (iv.mean, iv.lo, iv.hi) == pytest.approx((ref.mean, ref.lo, ref.hi))
    assert iv.mean == pytest.approx(2.2)
    with pytest.raises(ValueError, match="same length"):
        paired_diff_ci([1, 2], [1, 2, 3])


def _iv(lo: float, hi: float, n: int = 5) -> Interval:
    return Interval((lo + hi) / 2, lo, hi, n)


@pytest.mark.parametrize(
    ("lo", "hi", "predicts", "tol", "expected"),
    [
        (0.1, 0.5, "greater", 0.0, "supported"),
        (-0.5, -0.1, "greater", 0.0, "not supported"),
        (-0.1, 0.5, "greater", 0.0, "inconclusive"),
        (0.0, 0.5, "greater", 0.0, "inconclusive"),  # touching 0 is not "entirely > 0"
        (0.1, 0.5, "greater", 0.2, "inconclusive"),  # positive, maybe too small to matter
        (0.05, 0.15, "greater", 0.2, "not supported"),  # credibly smaller than the tolerance
        (0.3, 0.5, "greater", 0.2, "supported"),
        (-0.5, -0.1, "less", 0.0, "supported"),
        (0.1, 0.5, "less", 0.0, "not supported"),
        (-0.1, 0.1, "less", 0.0, "inconclusive"),
        (-0.5, -0.3, "less", 0.2, "supported"),
        (-0.1, 0.1, "equal", 0.2, "supported"),
        (0.3, 0.5, "equal", 0.2, "not supported"),
        (-0.5, -0.3, "equal", 0.2, "not supported"),
        (0.1, 0.3, "equal", 0.2, "inconclusive"),
    ],
)
def test_verdict_table(lo: float, hi: float, predicts: str, tol: float, expected: str) -> None:
    assert verdict(_iv(lo, hi), predicts, tol) == expected  # type: ignore[arg-type]


def test_verdict_degenerate_is_inconclusive() -> None:
    assert verdict(mean_ci([5.0]), "greater") == "inconclusive"
    assert verdict(Interval(1.0, math.nan, math.nan, 3), "greater") == "inconclusive"
    assert verdict(Interval(1.0, 0.5, 1.5, 1), "greater") == "inconclusive"


def test_verdict_errors() -> None:
    with pytest.raises(ValueError, match="predicts"):
        verdict(_iv(0, 1), "bigger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tolerance"):
        verdict(_iv(0, 1), "greater", -1.0)
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        verdict(_iv(0, 1), "equal")


def test_compare() -> None:
    effect, v = compare([10, 11, 12, 11], [1, 2, 1, 2], "greater")
    assert v == "supported" and effect.lo > 0
    effect, v = compare([10, 11, 12, 11], [1, 2, 1, 2], "less")
    assert v == "not supported"
    effect, v = compare([1, 2, 3], [1.5, 2.5, 2.0], "greater", paired=True)
    assert v == "inconclusive"


def test_format_interval() -> None:
    assert format_interval(Interval(0.5123, 0.4981, 0.5262, 5)) == "0.512 [0.498, 0.526]"
    assert format_interval(Interval(1.0, 0.5, 1.5, 4), digits=2, unit="%") == "1% [0.5%, 1.5%]"
    assert "∞" in format_interval(Interval(1.0, -math.inf, math.inf, 1))
    assert str(Interval(2.0, 1.0, 3.0, 3)) == "2 [1, 3]"
