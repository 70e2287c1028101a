"""What the studies' analyses share: metric values of finished runs, intervals, number formats.

The statistics themselves (Student-t and Welch intervals, verdicts) are in
:mod:`normlab.lab.stats`; this module is the layer between the store's runs and those
statistics, written once for every study:

* :func:`values` — the finite values of one metric over the finished runs matching a filter;
* :func:`by_seed` — the same, keyed by seed (for paired comparisons); :func:`group_values` —
  grouped by a config key;
* :func:`log_ratio_ci`, :func:`log10_diff_ci`, :func:`ratio_interval` — ratios compared on the
  log scale (a ratio's interval is ``exp``/``10^`` of the log interval's bounds, so "ratio > 1"
  and "log > 0" give the same verdict);
* :func:`n_val` — the validation samples behind the runs' rates (for :func:`normlab.lab.stats.rate_ci`);
* :func:`pct`, :func:`fmt_ratio` — the number formats of the cards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from normlab.lab.stats import Interval, diff_ci, format_interval, mean_ci
from normlab.lab.store import RunResult

__all__ = [
    "Metric",
    "by_seed",
    "fmt_ratio",
    "group_values",
    "log10_diff_ci",
    "log_ratio_ci",
    "n_val",
    "pct",
    "ratio_interval",
    "select",
    "values",
]

#: A metric: the name of a final metric of the run, or a function of the run.
Metric = str | Callable[[RunResult], Any]


def _matches(config: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(config.get(k) == v for k, v in where.items())


def select(results: Iterable[RunResult], *, done: bool = True, **where: Any) -> list[RunResult]:
    """Runs whose config has every ``key == value`` in ``where`` (only finished runs by default)."""
    return [r for r in results if (not done or r.done) and _matches(r.config, where)]


def _metric(r: RunResult, metric: Metric) -> Any:
    return metric(r) if callable(metric) else r.metric(metric)


def values(
    results: Iterable[RunResult], metric: Metric, *, keep_inf: bool = False, **where: Any
) -> list[float]:
    """The numeric ``metric`` of every finished run matching ``where``, as floats, in run order.

    Runs whose value is missing, not a number (a bool counts as not a number), or NaN are left
    out; so are ±inf unless ``keep_inf`` (a time ratio or an output difference that overflowed
    must then weigh in as the failure it is).
    """
    out: list[float] = []
    for r in select(results, **where):
        v = _metric(r, metric)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if math.isnan(v) or (math.isinf(v) and not keep_inf):
            continue
        out.append(float(v))
    return out


def by_seed(
    results: Iterable[RunResult],
    metric: Metric,
    *,
    seed_key: str = "seed",
    drop_missing: bool = False,
    **where: Any,
) -> dict[int, Any]:
    """``{seed: metric}`` of the finished runs matching ``where`` (a later run of a seed wins).

    ``seed_key``: the config key that pairs runs across arms (``"data_seed"`` when the seed draws
    the data set; runs without it fall back to ``"seed"``). The values are as stored, ``None``
    included, unless ``drop_missing``: then ``None`` and NaN are left out and the rest are floats.
    """
    out: dict[int, Any] = {}
    for r in select(results, **where):
        v = _metric(r, metric)
        if drop_missing:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            v = float(v)
        out[int(r.config.get(seed_key, r.config.get("seed", 0)))] = v
    return out


def group_values(
    results: Iterable[RunResult], key: str, metric: Metric, **where: Any
) -> dict[Any, list[float]]:
    """``{config[key]: [metric of each finished run]}`` (missing values left out), keys in
    first-seen order; list-valued keys become tuples (JSON turned the config's tuples into lists)."""
    groups: dict[Any, list[float]] = {}
    for r in select(results, **where):
        v = _metric(r, metric)
        if v is None:
            continue
        k = r.config.get(key)
        if isinstance(k, list):
            k = tuple(k)
        groups.setdefault(k, []).append(float(v))
    return groups


def n_val(results: Iterable[RunResult], **where: Any) -> int | None:
    """The validation-set size a finished run matching ``where`` recorded (``n_val``), or None.

    It is the number of trials behind each run's error rate, which the continuity correction of
    :func:`normlab.lab.stats.rate_ci` needs; runs of one study share their validation set.
    """
    for r in select(results, **where):
        v = r.metric("n_val")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1:
            return int(v)
    return None


def ratio_interval(iv: Interval, base: float = 10.0) -> Interval:
    """A log interval (``log_base`` of a ratio) as a ratio interval ``base^mean [base^lo, base^hi]``.

    ``-inf`` maps to 0 and ``+inf`` to ``inf``; NaN stays NaN.
    """

    def p(v: float) -> float:
        if math.isnan(v):
            return math.nan
        if math.isinf(v):
            return math.inf if v > 0 else 0.0
        return base**v

    return Interval(p(iv.mean), p(iv.lo), p(iv.hi), iv.n, iv.level)


def log_ratio_ci(ratios: list[float]) -> tuple[Interval, Interval]:
    """Student-t CI of the mean of ``ln(ratio)``, and the same as a ratio (geometric mean).

    The ratio interval is ``exp`` of the log interval: ``exp(mean) [exp(lo), exp(hi)]``.
    """
    logs = mean_ci([math.log(r) for r in ratios])
    return logs, Interval(
        math.exp(logs.mean), math.exp(logs.lo), math.exp(logs.hi), logs.n, logs.level
    )


def log10_diff_ci(a: list[float], b: list[float]) -> tuple[Interval, Interval]:
    """Welch CI of ``mean(log10 a) − mean(log10 b)`` (positive values only), and the ratio ``10^…``."""
    d = diff_ci([math.log10(v) for v in a if v > 0], [math.log10(v) for v in b if v > 0])
    return d, ratio_interval(d)


def pct(iv: Interval, digits: int = 3, unit: str = "%") -> str:
    """An interval of fractions shown in percent (``unit`` after each number: ``"%"``, ``" pp"``…)."""
    return format_interval(
        Interval(100 * iv.mean, 100 * iv.lo, 100 * iv.hi, iv.n, iv.level), digits, unit
    )


def fmt_ratio(iv: Interval) -> str:
    """A ratio interval as ``"1.23 [1.1, 1.4]×"``."""
    return f"{format_interval(iv)}×"
