"""Confidence intervals over seeds and the verdicts the report derives from them.

The lab answers a claim such as "BatchNorm trains faster than no normalization" by running
each arm over several seeds and looking at the 95% confidence interval (CI) of the effect:

* :func:`mean_ci` — Student-t interval of a mean (seeds are few, so the normal approximation
  would be too narrow).
* :func:`diff_ci` — Welch interval of a difference of two means (no equal-variance
  assumption: a diverging arm is often much noisier than a stable one).
* :func:`paired_diff_ci` — interval of the mean per-seed difference, when both arms share
  their seeds (same initialization and data order), which removes the seed-to-seed noise.
* :func:`rate_ci` — interval of a mean rate (an error rate or accuracy, per seed) computed on the
  logit scale, so that it stays inside ``[0, 100] %`` however few seeds there are.
* :func:`verdict` — "supported" / "not supported" / "inconclusive" from an effect interval and
  the direction the claim predicts; :func:`compare` does both steps at once.

An interval with fewer than two observations has no width estimate: it is returned as
``(-inf, +inf)`` and flagged by :attr:`Interval.degenerate`, so that any verdict built on it is
"inconclusive" rather than a confident answer from one seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Interval",
    "Verdict",
    "Direction",
    "VERDICTS",
    "mean_ci",
    "diff_ci",
    "paired_diff_ci",
    "verdict",
    "compare",
    "format_interval",
    "rate_ci",
    "scale_interval",
    "shift_interval",
    "combine_verdicts",
]

Verdict = Literal["supported", "not supported", "inconclusive"]
Direction = Literal["greater", "less", "equal"]
VERDICTS: tuple[str, ...] = ("supported", "not supported", "inconclusive")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval.

    Attributes:
        mean: the estimate (a mean, or a difference of means).
        lo, hi: the interval bounds; ``-inf``/``inf`` when it cannot be estimated (n < 2) and
            NaN when the data contain NaN.
        n: number of observations (for a difference of two groups: the smaller group size).
        level: the confidence level, e.g. 0.95.
    """

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    @property
    def degenerate(self) -> bool:
        """True when the interval carries no information (fewer than 2 values or NaN)."""
        return self.n < 2 or not (math.isfinite(self.lo) and math.isfinite(self.hi))

    @property
    def half_width(self) -> float:
        """Half the width of the interval (``inf`` when degenerate)."""
        return (self.hi - self.lo) / 2.0

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside the closed interval ``[lo, hi]``."""
        return self.lo <= value <= self.hi

    def __str__(self) -> str:
        return format_interval(self)


def _as_array(values: Iterable[float], name: str) -> np.ndarray:
    """Convert ``values`` to a 1-D float array, with errors naming the argument."""
    try:
        arr = np.asarray(list(values), dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a confidence interval needs at least one value")
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _t_quantile(level: float, df: float) -> float:
    """Two-sided Student-t critical value for confidence ``level`` with ``df`` degrees of freedom."""
    from scipy import stats  # imported lazily: scipy costs ~0.3 s to import

    return float(stats.t.ppf(0.5 + level / 2.0, df))


def _nan_interval(n: int, level: float) -> Interval:
    return Interval(math.nan, math.nan, math.nan, n, level)


def mean_ci(values: Iterable[float], level: float = 0.95) -> Interval:
    """Student-t confidence interval of the mean of ``values``.

    ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation
    (``ddof=1``). One value gives ``(-inf, inf)`` (flagged :attr:`Interval.degenerate`); any NaN
    gives a NaN interval (a diverged run must not silently vanish from an average: filter it
    out explicitly if that is what the analysis means).
    """
    _check_level(level)
    x = _as_array(values, "values")
    n = int(x.size)
    if np.isnan(x).any():
        return _nan_interval(n, level)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n, level)
    se = float(x.std(ddof=1)) / math.sqrt(n)
    if not math.isfinite(se):  # infinite values: the spread is unbounded
        return Interval(mean, -math.inf, math.inf, n, level)
    half = _t_quantile(level, n - 1) * se
    return Interval(mean, mean - half, mean + half, n, level)


def diff_ci(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> Interval:
    """Welch confidence interval of ``mean(a) - mean(b)`` for two independent samples.

    ``se = sqrt(s_a²/n_a + s_b²/n_b)``, degrees of freedom from the Welch–Satterthwaite
    equation. Either group with a single value gives an infinite (degenerate) interval; two
    constant groups give a zero-width interval at the difference.
    """
    _check_level(level)
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    na, nb = int(xa.size), int(xb.size)
    n = min(na, nb)
    if np.isnan(xa).any() or np.isnan(xb).any():
        return _nan_interval(n, level)
    diff = float(xa.mean() - xb.mean())
    if n < 2:
        return Interval(diff, -math.inf, math.inf, n, level)
    va, vb = float(xa.var(ddof=1)) / na, float(xb.var(ddof=1)) / nb
    se2 = va + vb
    if not math.isfinite(se2):
        return Interval(diff, -math.inf, math.inf, n, level)
    if se2 == 0.0:
        # Both groups are constant: the difference is known exactly (and the Welch df is 0/0).
        return Interval(diff, diff, diff, n, level)
    df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = _t_quantile(level, df) * math.sqrt(se2)
    return Interval(diff, diff - half, diff + half, n, level)


def paired_diff_ci(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> Interval:
    """Confidence interval of the mean of the pairwise differences ``a[i] - b[i]``.

    Use it when ``a[i]`` and ``b[i]`` share seed ``i``: the per-seed noise common to both arms
    cancels, so the interval is usually narrower than :func:`diff_ci`'s.
    """
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    if xa.size != xb.size:
        raise ValueError(
            f"paired_diff_ci needs a and b of the same length (one pair per seed), "
            f"got {xa.size} and {xb.size}"
        )
    return mean_ci(xa - xb, level)


def verdict(effect: Interval, predicts: Direction = "greater", tolerance: float = 0.0) -> Verdict:
    """The verdict on a claim, given the CI of its effect and the direction the claim predicts.

    ``effect`` is the interval of a difference ``a - b`` (or any quantity), and ``tolerance``
    (≥ 0) the smallest effect that matters, in the same unit:

    * ``predicts="greater"`` (the claim says ``a > b``): *supported* when the whole interval is
      above ``+tolerance``, *not supported* when it is entirely below ``+tolerance`` (the effect
      is negative or too small to matter), *inconclusive* when it straddles ``+tolerance``.
    * ``predicts="less"`` (``a < b``): the mirror image around ``-tolerance``.
    * ``predicts="equal"`` (the claim says the difference does not matter): *supported* when the
      interval lies inside ``[-tolerance, +tolerance]`` (so ``tolerance`` must be > 0),
      *not supported* when it lies entirely outside it, *inconclusive* otherwise.

    With ``tolerance=0``: supported iff the CI excludes 0 on the predicted side, not supported
    iff it excludes 0 on the other side. A degenerate or NaN interval is always inconclusive.
    """
    if predicts not in ("greater", "less", "equal"):
        raise ValueError(f"predicts must be 'greater', 'less' or 'equal', got {predicts!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if predicts == "equal" and tolerance == 0:
        raise ValueError(
            "tolerance must be > 0 when predicts='equal': no interval fits inside [0, 0]"
        )
    lo, hi = effect.lo, effect.hi
    if math.isnan(lo) or math.isnan(hi) or effect.n < 2:
        return "inconclusive"
    if predicts == "greater":
        if lo > tolerance:
            return "supported"
        if hi < tolerance:
            return "not supported"
        return "inconclusive"
    if predicts == "less":
        if hi < -tolerance:
            return "supported"
        if lo > -tolerance:
            return "not supported"
        return "inconclusive"
    # predicts == "equal"
    if -tolerance <= lo and hi <= tolerance:
        return "supported"
    if lo > tolerance or hi < -tolerance:
        return "not supported"
    return "inconclusive"


def compare(
    a: Iterable[float],
    b: Iterable[float],
    predicts: Direction = "greater",
    *,
    tolerance: float = 0.0,
    paired: bool = False,
    level: float = 0.95,
) -> tuple[Interval, Verdict]:
    """CI of ``mean(a) - mean(b)`` (Welch, or paired) and the verdict on "a is ``predicts`` b"."""
    effect = paired_diff_ci(a, b, level) if paired else diff_ci(a, b, level)
    return effect, verdict(effect, predicts, tolerance)


def _fmt(x: float, digits: int) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


def format_interval(iv: Interval, digits: int = 3, unit: str = "") -> str:
    """``"0.512 [0.498, 0.526]"`` (``digits`` significant digits, ``unit`` after each number);
    an interval from a single value is marked as such."""
    text = (
        f"{_fmt(iv.mean, digits)}{unit} "
        f"[{_fmt(iv.lo, digits)}{unit}, {_fmt(iv.hi, digits)}{unit}]"
    )
    if iv.n < 2:
        text += f" (n={iv.n}: no interval)"
    return text


def shift_interval(iv: Interval, by: float) -> Interval:
    """``iv`` moved by ``by`` (e.g. ``effect + margin`` for a non-inferiority test)."""
    return Interval(iv.mean + by, iv.lo + by, iv.hi + by, iv.n, iv.level)


def scale_interval(iv: Interval, by: float) -> Interval:
    """``iv`` multiplied by ``by > 0`` (e.g. a difference of fractions in percentage points)."""
    if not (math.isfinite(by) and by > 0):
        raise ValueError(f"by must be a finite number > 0, got {by!r}")
    return Interval(iv.mean * by, iv.lo * by, iv.hi * by, iv.n, iv.level)


#: Trials assumed per rate by :func:`rate_ci` when the caller does not know them.
DEFAULT_RATE_TRIALS = 1000


def rate_ci(
    rates: Iterable[float],
    trials: int | None = None,
    level: float = 0.95,
    *,
    scale: float = 100.0,
) -> Interval:
    """Mean of per-seed rates (error rates, accuracies) with an interval that stays in ``[0, scale]``.

    Each rate ``r_i`` (``p_i = r_i / scale`` of ``m = trials`` validation samples) is moved off 0 and
    1 by a continuity correction, ``p̃_i = (p_i·m + ½) / (m + 1)``, and the Student-t interval of
    the mean of ``logit(p̃_i) = ln(p̃_i / (1 − p̃_i))`` is mapped back with the logistic function
    ``σ(z) = 1 / (1 + e^{−z})``: ``[scale·σ(lo), scale·σ(hi)]``. The estimate is the plain mean of
    the rates; the bounds are widened to include it where the back-mapped logit interval (which
    is centred on a different average of the seeds) misses it, e.g. when every seed has the same
    rate. With two seeds the interval is wide (t₀.₉₇₅,₁ = 12.7) but never leaves the range, so
    an error rate cannot read "18 [−61.7, 97.6] %". ``trials``: the validation samples behind
    each rate (``None``: :data:`DEFAULT_RATE_TRIALS`); ``scale``: 100 for percent, 1 for fractions.
    A NaN rate gives a NaN interval; a rate outside ``[0, scale]`` is an error.
    """
    _check_level(level)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if trials is not None and (isinstance(trials, bool) or int(trials) != trials or trials < 1):
        raise ValueError(f"trials must be a positive integer or None, got {trials!r}")
    x = _as_array(rates, "rates")
    n = int(x.size)
    if np.isnan(x).any():
        return _nan_interval(n, level)
    if (x < 0).any() or (x > scale).any():
        bad = float(x[(x < 0) | (x > scale)][0])
        raise ValueError(f"rates must lie in [0, {scale:g}], got {bad!r}")
    m = int(trials) if trials is not None else DEFAULT_RATE_TRIALS
    p = (x / scale * m + 0.5) / (m + 1)
    logit = mean_ci(np.log(p / (1.0 - p)), level)
    mean = float(x.mean())

    def back(z: float) -> float:  # σ(z) = (1 + tanh(z/2))/2: no overflow, ±inf map to 0 and 1
        return scale * 0.5 * (1.0 + math.tanh(z / 2.0))

    lo, hi = back(logit.lo), back(logit.hi)
    return Interval(mean, min(lo, mean), max(hi, mean), n, level)


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of parts that must all hold (a conjunction).

    ``supported`` when every part is supported; ``not supported`` when any part is not supported
    (one failing part is enough to reject the whole claim); ``inconclusive`` otherwise, and
    when there are no parts.
    """
    vs = list(verdicts)
    if not vs:
        return "inconclusive"
    if all(v == "supported" for v in vs):
        return "supported"
    if any(v == "not supported" for v in vs):
        return "not supported"
    return "inconclusive"
