"""The report's answers first: rankings of the norms per task as sentences, and the cross-study
verdict on the article's conclusion "BatchNorm is still the best and most widely applicable".

Everything here is computed from what the studies give — their :class:`~normlab.lab.studies.Card`
s and the optional :class:`~normlab.lab.studies.Ranking` s of their ``ranking(results, cfg)``
hook — and is plain text: :mod:`normlab.lab.report.html` renders it as HTML and Markdown.

* :func:`rank` — a ranking's norms ordered by mean, each with its 95% interval, and whether
  each one is separable from the next (Welch interval of the difference excludes 0).
* :func:`ranking_sentence` — that order in words: ``"CNN on digits (validation error, lower is
  better; n = 3 seeds): bn 1.3% [0.9%, 1.7%] ≈ gn 1.5% [1%, 2%] < ln 3.1% [2.2%, 4%]."``
* :func:`conclusion_card` — BatchNorm's rank among the methods of every task, with per-task
  verdicts combined into one card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from normlab.lab.stats import Interval, combine_verdicts, diff_ci, format_interval, mean_ci, rate_ci, verdict
from normlab.lab.studies import DEFAULT_MIN_SEEDS, NOT_TESTED, Card, Ranking, withhold_verdicts

__all__ = [
    "CONCLUSION",
    "CONCLUSION_STUDY",
    "Ranked",
    "conclusion_card",
    "interval",
    "rank",
    "ranking_sentence",
    "unique_rankings",
]

#: The article's conclusion, the claim of :func:`conclusion_card`.
CONCLUSION = "BatchNorm is still the best and most widely applicable normalization."
#: ``Card.study`` of the conclusion card (it belongs to no single study).
CONCLUSION_STUDY = "all studies"
#: The name studies give BatchNorm.
BN = "bn"


def interval(values: list[float], bounds: tuple[float, float] | None = None) -> Interval:
    """95% interval of the mean of ``values``: for a percentage (``bounds == (0, 100)``) the
    studies' logit-scale :func:`~normlab.lab.stats.rate_ci` (the cards print the same interval),
    otherwise the Student-t interval intersected with ``bounds`` (the true mean of a bounded
    metric lies inside them, so the intersection covers it whenever the t interval does).
    """
    if bounds == (0.0, 100.0) and len(values) and all(0.0 <= v <= 100.0 for v in values):
        return rate_ci(values)
    iv = mean_ci(values)
    if bounds is None or math.isnan(iv.lo):
        return iv
    lo, hi = bounds
    return Interval(iv.mean, min(max(iv.lo, lo), hi), max(min(iv.hi, hi), lo), iv.n, iv.level)


@dataclass(frozen=True)
class Ranked:
    """One norm of a ranking: its values, interval, and whether the next norm is tied with it."""

    norm: str
    values: tuple[float, ...]
    interval: Interval
    tied_with_next: bool


def _separable(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> bool:
    """Whether the Welch 95% interval of ``mean(a) − mean(b)`` excludes 0."""
    if len(a) < 2 or len(b) < 2:
        return False
    d = diff_ci(a, b)
    return not (math.isnan(d.lo) or d.lo <= 0 <= d.hi)


def rank(r: Ranking) -> list[Ranked]:
    """The norms of ``r`` best first (by mean, in the metric's direction)."""
    sign = 1.0 if r.lower_is_better else -1.0
    order = sorted(r.values, key=lambda n: (sign * float(sum(r.values[n]) / len(r.values[n])), n))
    out = []
    for i, n in enumerate(order):
        nxt = order[i + 1] if i + 1 < len(order) else None
        tied = nxt is not None and not _separable(r.values[n], r.values[nxt])
        out.append(Ranked(n, tuple(r.values[n]), interval(r.values[n], r.bounds), tied))
    return out


def _seeds_text(ns: list[int]) -> str:
    lo, hi = min(ns), max(ns)
    return f"n = {lo} seed{'s' if hi != 1 else ''}" if lo == hi else f"n = {lo}–{hi} seeds"


def ranking_sentence(r: Ranking) -> str:
    """The ranking of ``r`` in words, best first; ``≈`` between neighbours whose difference is
    not separable from 0 (Welch 95% interval), ``<`` (lower is better) or ``>`` otherwise."""
    ranked = rank(r)
    if not ranked:
        return f"{r.task}: no finished runs."
    step = "<" if r.lower_is_better else ">"
    chain = ""
    for i, item in enumerate(ranked):
        chain += f"{item.norm} {format_interval(item.interval, unit=r.unit)}"
        if i + 1 < len(ranked):
            chain += " ≈ " if item.tied_with_next else f" {step} "
    direction = "lower is better" if r.lower_is_better else "higher is better"
    return (
        f"{r.task} ({r.metric}, {direction}; {_seeds_text([len(x.values) for x in ranked])}): "
        f"{chain}."
    )


def unique_rankings(rankings: list[Ranking]) -> list[Ranking]:
    """``rankings`` without repeats of the same task and metric (two studies sharing runs)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rankings:
        key = (r.task, r.metric)
        if key not in seen and r.values:
            seen.add(key)
            out.append(r)
    return out


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _diff_unit(unit: str) -> str:
    """The unit of a difference of values in ``unit`` (percentages differ by points)."""
    unit = unit.strip()
    return " points" if unit == "%" else f" {unit}" if unit else ""


def conclusion_card(rankings: list[Ranking], min_seeds: int = DEFAULT_MIN_SEEDS) -> Card | None:
    """The verdict on "BatchNorm is still the best and most widely applicable", or None when no
    ranking compares two or more norms.

    Per task (a ranking with BN and at least one other norm): the Welch 95% interval of
    ``BN − best other norm`` (the other norm with the best mean), oriented so that > 0 means BN is
    worse; the claim predicts < 0 (:func:`normlab.lab.stats.verdict`, ``"less"``). The tasks'
    verdicts must all hold (:func:`~normlab.lab.stats.combine_verdicts`): one task where another
    method is reliably better refutes "the best". Tasks in which BN was not run are listed. The
    card's effect is the task that decides (the first refuting one, else the worst for BN). A task
    with fewer than ``min_seeds`` seeds in BN's or its rival's arm is "not tested at this
    profile" and counts neither for nor against (so is the whole card when every task is).
    """
    tasks = [r for r in unique_rankings(rankings) if len(r.values) >= 2]
    if not tasks:
        return None
    with_bn = [r for r in tasks if BN in r.values]
    without = [r.task for r in tasks if BN not in r.values]
    rows: list[tuple[str, Interval, Ranking]] = []
    parts = []
    for r in with_bn:
        ranked = rank(r)
        pos = next(i for i, x in enumerate(ranked) if x.norm == BN)
        other = next(x for x in ranked if x.norm != BN)
        bn_vals = r.values[BN]
        d = diff_ci(bn_vals, other.values) if r.lower_is_better else diff_ci(other.values, bn_vals)
        n = min(len(bn_vals), len(other.values))
        v = verdict(d, "less") if n >= min_seeds else NOT_TESTED
        rows.append((v, d, r))
        label = f"BN − {other.norm}" if r.lower_is_better else f"{other.norm} − BN"
        parts.append(
            f"{_ordinal(pos + 1)} of {len(ranked)} on {r.task} ({r.metric}, {label}: "
            f"{format_interval(d)}{_diff_unit(r.unit)}{'' if v == NOT_TESTED else f'; {v}'})"
        )
    if not rows:
        measurement = "BatchNorm was not run in any task that compares methods: " + "; ".join(without) + "."
        return Card(study=CONCLUSION_STUDY, claim=CONCLUSION, measurement=measurement,
                    verdict="inconclusive", details=_DETAILS.format(min_seeds=min_seeds))
    verdicts = [v for v, _, _ in rows]
    tested = [row for row in rows if row[0] != NOT_TESTED]
    # A task with too few seeds counts neither for nor against; with none tested, nothing is.
    combined = combine_verdicts([v for v, _, _ in tested]) if tested else NOT_TESTED
    order = {"not supported": 0, "inconclusive": 1, "supported": 2, NOT_TESTED: 3}
    _, d_dec, r_dec = min(tested or rows, key=lambda row: (order[row[0]], -row[1].mean))
    measurement = (
        f"BatchNorm ranks {'; '.join(parts)}."
        + (f" Not run in: {'; '.join(without)}." if without else "")
        + f" {len(rows)} task(s) with BN: {verdicts.count('supported')} where it is reliably the "
        f"best, {verdicts.count('not supported')} where another method is reliably better, "
        f"{verdicts.count('inconclusive')} undecided"
        + (f", {verdicts.count(NOT_TESTED)} with fewer than {min_seeds} seeds (not counted)"
           if NOT_TESTED in verdicts else "")
        + "."
    )
    card = Card(
        study=CONCLUSION_STUDY,
        claim=CONCLUSION,
        measurement=measurement,
        verdict=combined,
        effect=d_dec,
        effect_label=(
            f"{r_dec.task}: {r_dec.metric}, "
            f"{'BN − best other' if r_dec.lower_is_better else 'best other − BN'} "
            f"({(_diff_unit(r_dec.unit).strip() + '; ') if r_dec.unit.strip() else ''}> 0: BN worse)"
        ),
        details=_DETAILS.format(min_seeds=min_seeds),
    )
    if combined == NOT_TESTED:
        n = min(min(len(r.values[BN]), len(next(x for x in rank(r) if x.norm != BN).values))
                for _, _, r in rows)
        card.verdict_note = f"{n} seed{'s' if n != 1 else ''}; {min_seeds} needed"
    return withhold_verdicts([card], min_seeds)[0]


_DETAILS = (  # {min_seeds} is filled in by conclusion_card
    "Computed from every task of this run in which the studies compared several normalizations "
    "(their ranking() hook): per task, the Welch 95% interval of BN minus the best other method; "
    "supported when every task's interval lies below 0 (BN reliably the best everywhere), not "
    "supported when one lies above 0 (some method reliably better than BN there), inconclusive "
    "otherwise; a task with fewer than {min_seeds} seeds per arm is not counted. 'Most widely applicable': "
    "the tasks where BN was not run are listed."
)
