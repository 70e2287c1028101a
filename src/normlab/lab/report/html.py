"""Build the report of a run directory: ``report/index.html``, ``report/summary.md``, ``results.csv``.

The HTML page is self-contained: figures are embedded as base64 PNG ``data:`` URIs, the CSS is
inline, there is no script and no font or anything else to fetch (a Content-Security-Policy
forbids it), so it can be mailed or archived as one file. Every string that comes from a user, a
config or a study (run names, paths, data/model specs, error messages) is HTML-escaped.

Layout: a header (run directory, versions, run counts, the profile banner, warnings); the
answers first — the article's three questions (:data:`~normlab.lab.studies.QUESTIONS`), each
answered by sentences computed from the cards and rankings that name it, with figure thumbnails
and links to the evidence ("not measured in this run" when none does), and the cross-study verdict
on the article's conclusion (:mod:`normlab.lab.report.answers`); the table of every claim with its
measured effect and verdict badge; then one section per study (ordered by ``ORDER``): figures
with captions, answer cards (each with its profile banner), the failed runs with their
tracebacks, and the table of runs (collapsed).

Verdicts: every study's cards go through :func:`~normlab.lab.studies.withhold_verdicts` here,
so no "supported"/"not supported" rests on fewer seeds than the study's ``MIN_SEEDS``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import re
import shutil
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from normlab.lab.report.answers import CONCLUSION_STUDY, conclusion_card, ranking_sentence
from normlab.lab.report.assets import CSP, CSS
from normlab.lab.stats import format_interval
from normlab.lab.store import DB_NAME, RunResult, Store, flatten
from normlab.lab.studies import (
    DEFAULT_MIN_SEEDS,
    NOT_TESTED,
    QUESTIONS,
    Card,
    Figure,
    Ranking,
    Study,
    StudyError,
    broken_studies,
    card_seeds,
    config_meta_key,
    expected_run_ids,
    get_study,
    load_study_config,
    load_study_meta,
    seed_count,
    withhold_verdicts,
)

__all__ = ["build_report", "esc"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Final metrics shown first in run tables when present (the rest follow alphabetically).
_METRIC_PRIORITY = (
    "final_val_acc", "best_val_acc", "val_acc", "final_val_loss", "val_loss", "final_train_loss",
    "train_loss", "diverged", "steps", "time_per_step_s",
)
_VERDICT_CLASS = {
    "supported": "v-supported",
    "not supported": "v-not-supported",
    "inconclusive": "v-inconclusive",
    "answer": "v-answer",
    NOT_TESTED: "v-not-tested",
}
_STATUS_CLASS = {"done": "s-done", "failed": "s-failed", "running": "s-running", "pending": "s-pending"}


def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes included, so it is safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def _slug(name: str) -> str:
    """An anchor-safe id fragment for a study name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "study"


def _fmt(value: Any) -> str:
    """Plain-text rendering of a config or metric value (not escaped)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


@dataclass
class _Section:
    """Everything the report shows about one study."""

    name: str
    title: str
    summary: str
    order: int
    config: dict[str, Any] | None = None
    quick: bool | None = None
    seeds: int | None = None
    min_seeds: int = DEFAULT_MIN_SEEDS
    cards: list[Card] = field(default_factory=list)
    rankings: list[Ranking] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"study-{_slug(self.name)}"

    def card_anchor(self, i: int) -> str:
        return f"card-{_slug(self.name)}-{i}"

    def figure(self, ref: str | None) -> Figure | None:
        """The figure named ``ref`` (its file name or title), or None."""
        if not ref:
            return None
        for f in self.figures:
            if Path(f.path).name == ref or f.title == ref:
                return f
        self.notes.append(f"A card or ranking names the figure {ref!r}, which plot() did not make.")
        return None

    def evidence_anchor(self, text: str | None) -> str:
        """The anchor of the card whose question or claim is ``text`` (else the section's)."""
        for i, c in enumerate(self.cards):
            if text and text in (c.question, c.claim):
                return self.card_anchor(i)
        return self.anchor


def _error_text(what: str, exc: BaseException) -> str:
    return f"{what} failed:\n" + "".join(traceback.format_exception(exc)).rstrip()


def _collect(store: Store, name: str, figroot: Path, strict: bool) -> _Section:
    """Analyze and plot one study of the store into a :class:`_Section`."""
    all_runs = store.results(name)
    try:
        study: Study | None = get_study(name)
    except StudyError as exc:
        if strict:
            raise
        sec = _Section(name=name, title=name, summary="", order=10**9, runs=all_runs)
        sec.errors.append(f"{exc}; showing its runs only.")
        return sec

    sec = _Section(name=study.name, title=study.title, summary=study.summary, order=study.order)
    cfg = load_study_config(store, study)
    stored = load_study_meta(store, study)
    if cfg is None:
        cfg = study.Config()
        sec.notes.append("No study config recorded in this run directory: using the defaults.")
    else:
        sec.quick = bool(stored.get("quick", False)) if stored is not None else None
    sec.config = dataclasses.asdict(cfg)
    sec.seeds, sec.min_seeds = seed_count(cfg), study.min_seeds

    # Only the runs of the recorded config: a directory re-used with another grid keeps the old
    # runs in the store, and mixing them in would silently change the answer.
    try:
        expected = expected_run_ids(store, study, cfg)
        runs = [r for r in all_runs if r.run_id in expected]
        if len(runs) < len(all_runs):
            sec.notes.append(
                f"{len(all_runs) - len(runs)} run(s) of other configurations of this study are in "
                "the store and not part of this report."
            )
    except Exception as exc:  # a broken runs() must not hide the data
        if strict:
            raise
        sec.errors.append(_error_text("runs()", exc))
        runs = all_runs
    sec.runs = runs

    done = [r for r in runs if r.done]
    unfinished = sum(r.status in ("pending", "running") for r in runs)
    if unfinished:
        sec.notes.append(
            f"{unfinished} of {len(runs)} run(s) are not finished: the sweep was interrupted; "
            "results are partial (run the same command again to resume)."
        )
    if not done:
        sec.notes.append("No finished runs: nothing to analyze.")
        return sec

    try:
        cards = study.analyze(done, cfg)
        for c in cards:
            if not isinstance(c, Card):
                raise TypeError(f"analyze() returned a {type(c).__name__}, expected Card")
        # The one place where a verdict the seeds cannot carry is withheld (see withhold_verdicts).
        sec.cards = withhold_verdicts(cards, sec.min_seeds, sec.seeds)
    except Exception as exc:
        if strict:
            raise
        sec.errors.append(_error_text("analyze()", exc))
    try:
        sec.rankings = study.ranking(done, cfg)
    except Exception as exc:
        if strict:
            raise
        sec.errors.append(_error_text("ranking()", exc))

    figdir = figroot / _slug(study.name)
    shutil.rmtree(figdir, ignore_errors=True)  # stale figures of a previous build
    figdir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib.pyplot as plt

        try:
            figures = study.plot(done, cfg, figdir)
        finally:
            plt.close("all")  # a study forgetting to close its figures must not leak memory
        for f in figures:
            if not isinstance(f, Figure):
                raise TypeError(f"plot() returned a {type(f).__name__}, expected Figure")
        sec.figures = figures
    except Exception as exc:
        if strict:
            raise
        sec.errors.append(_error_text("plot()", exc))
    return sec


# -- answers first -----------------------------------------------------------------------------------


#: Anchor of the conclusion card (the cross-study verdict on "BatchNorm is still the best").
CONCLUSION_ANCHOR = "card-conclusion"
NOT_MEASURED = "not measured in this run"


@dataclass
class _Evidence:
    """One sentence of an answer: computed text, the anchor of its evidence, its figure."""

    text: str
    anchor: str
    study: str
    study_anchor: str
    figure: Figure | None = None
    verdict: str | None = None


@dataclass
class _Answers:
    """The answers-first part of the report, computed once for the HTML page and the summary."""

    questions: dict[str, list[_Evidence]]
    conclusion: Card | None
    profile: str


def _card_sentence(card: Card) -> str:
    """An answer card's measurement; for a claim, the claim, effect and the reason of a withheld
    verdict (the verdict itself is the badge beside it)."""
    if card.verdict == "answer":
        return card.measurement
    text = card.claim.rstrip()
    if card.effect is not None:
        text += f" ({_effect_text(card)})"
    if card.verdict_note:
        text += f" ({card.verdict_note})"
    return text + ("" if text.endswith(".") else ".")


def _answers(sections: list[_Section]) -> _Answers:
    """For each of the article's questions, the evidence sentences of every section (rankings
    first, then the cards that name the question), and the conclusion card over all rankings."""
    questions: dict[str, list[_Evidence]] = {q: [] for q in QUESTIONS}
    for sec in sections:
        for r in sec.rankings:
            if r.question is not None:
                questions[r.question].append(_Evidence(
                    ranking_sentence(r), sec.evidence_anchor(r.evidence), sec.title, sec.anchor,
                    sec.figure(r.figure),
                ))
        for i, card in enumerate(sec.cards):
            if card.answers is not None:
                questions[card.answers].append(_Evidence(
                    _card_sentence(card), sec.card_anchor(i), sec.title, sec.anchor,
                    sec.figure(card.figure),
                    None if card.verdict == "answer" else card.verdict,
                ))
    conclusion = conclusion_card([r for sec in sections for r in sec.rankings])
    return _Answers(questions, conclusion, _profile_banner(sections))


# -- profile banners ---------------------------------------------------------------------------------


def _profile_phrase(quick: bool | None) -> str:
    if quick is None:
        return "profile not recorded"
    return "indicative — quick profile" if quick else "full grid"


def _seeds_phrase(ns: list[int]) -> str:
    if not ns:
        return ""
    lo, hi = min(ns), max(ns)
    if lo == hi:
        return f"n = {lo} seed{'s' if lo != 1 else ''}"
    return f"n = {lo}–{hi} seeds"


def _profile_text(quick: bool | None, ns: list[int]) -> str:
    """``"indicative — quick profile, n = 2 seeds"``, ``"full grid, n = 3–5 seeds"``, …"""
    seeds = _seeds_phrase(ns)
    return _profile_phrase(quick) + (f", {seeds}" if seeds else "")


def _profile_banner(sections: list[_Section]) -> str:
    """The page's profile: one phrase per profile present, naming the studies when they differ."""
    groups: dict[bool | None, list[_Section]] = {}
    for sec in sections:
        groups.setdefault(sec.quick, []).append(sec)
    if not groups:
        return "no studies"
    texts = []
    for quick, secs in groups.items():
        text = _profile_text(quick, [s.seeds for s in secs if s.seeds is not None])
        if len(groups) > 1:
            text += " (" + ", ".join(s.name for s in secs) + ")"
        texts.append(text)
    return "; ".join(texts)


def _card_profile(sec: _Section | None, card: Card, quick: bool | None) -> str:
    n = card_seeds(card, sec.seeds if sec is not None else None)
    return _profile_text(quick, [n] if n is not None else [])


# -- HTML ------------------------------------------------------------------------------------------


def _badge(verdict: str) -> str:
    cls = _VERDICT_CLASS.get(verdict, "v-unknown")
    return f'<span class="badge {cls}">{esc(verdict)}</span>'


def _status_badge(status: str) -> str:
    cls = _STATUS_CLASS.get(status, "v-unknown")
    return f'<span class="badge {cls}">{esc(status)}</span>'


def _effect_text(card: Card) -> str:
    if card.effect is None:
        return "—"
    text = format_interval(card.effect)
    return f"{card.effect_label}: {text}" if card.effect_label else text


def _summary_effect(card: Card) -> str:
    """The effect interval, or for cards without one (answers), their measurement text."""
    if card.effect is not None:
        return f'<span class="mono">{esc(_effect_text(card))}</span>'
    return f'<span class="muted">{esc(card.measurement)}</span>'


def _summary_row(label: str, href: str, study_href: str, study: str, card: Card) -> str:
    return (
        "<tr>"
        f'<td><a href="#{href}">{esc(label)}</a></td>'
        f'<td><a href="#{study_href}">{esc(study)}</a></td>'
        f"<td>{_summary_effect(card)}</td>"
        f"<td>{_badge(card.verdict)}</td>"
        "</tr>"
    )


def _summary_table(sections: list[_Section], conclusion: Card | None = None) -> str:
    rows = []
    if conclusion is not None:
        rows.append(_summary_row(conclusion.claim, CONCLUSION_ANCHOR, "answers", CONCLUSION_STUDY,
                                 conclusion))
    for sec in sections:
        for i, card in enumerate(sec.cards):
            label = card.question if card.verdict == "answer" and card.question else card.claim
            rows.append(_summary_row(label, sec.card_anchor(i), sec.anchor, sec.title, card))
    if not rows:
        return '<p class="muted">No answer cards: no study produced results yet.</p>'
    return (
        '<div class="table-wrap"><table class="claims"><thead><tr>'
        "<th>Claim / question</th><th>Study</th><th>Measured effect (95% CI)</th><th>Verdict</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )


def _card_html(card: Card, anchor: str, profile: str) -> str:
    cls = _VERDICT_CLASS.get(card.verdict, "v-unknown")
    parts = [f'<article class="card {cls}" id="{anchor}">', _badge(card.verdict),
             f' <span class="profile">{esc(profile)}</span>']
    if card.verdict_note:
        parts.append(f'<p class="measure verdict-note">Verdict withheld: {esc(card.verdict_note)} '
                     "at this profile (run the full grid to decide).</p>")
    if card.question:
        parts.append(f'<p class="claim">Question: {esc(card.question)}</p>')
        if card.claim and card.claim != card.question:
            parts.append(f'<p class="claim">Claim: {esc(card.claim)}</p>')
    else:
        parts.append(f'<p class="claim">{esc(card.claim)}</p>')
    parts.append(f'<p class="measure">{esc(card.measurement)}</p>')
    if card.effect is not None:
        parts.append(
            f'<p class="measure muted">Effect: <span class="mono">{esc(_effect_text(card))}</span>'
            f" ({esc(round(card.effect.level * 100))}% CI, n={esc(card.effect.n)})</p>"
        )
    if card.details:
        parts.append(f'<p class="details">{esc(card.details)}</p>')
    parts.append("</article>")
    return "".join(parts)


def _png_uri(fig: Figure) -> tuple[str | None, str]:
    """``(data: URI, "")`` of a figure's PNG, or ``(None, error HTML)``."""
    try:
        data = Path(fig.path).read_bytes()
    except OSError as exc:
        return None, f'<div class="error">Figure {esc(fig.title)}: cannot read {esc(fig.path)}: {esc(exc)}</div>'
    if not data.startswith(_PNG_MAGIC):
        return None, f'<div class="error">Figure {esc(fig.title)}: {esc(fig.path)} is not a PNG file.</div>'
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), ""


def _figure_html(fig: Figure) -> str:
    uri, error = _png_uri(fig)
    if uri is None:
        return error
    caption = f"<b>{esc(fig.title)}</b>"
    if fig.caption:
        caption += f" {esc(fig.caption)}"
    return (
        f'<figure><img src="{uri}" alt="{esc(fig.title)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _varying_keys(runs: list[RunResult]) -> list[str]:
    """Config keys whose values differ between runs (the ones worth a column)."""
    flats = [flatten(r.config) for r in runs]
    keys: list[str] = []
    for f in flats:
        keys.extend(k for k in f if k not in keys)
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    return varying or [k for k in keys if k == "runner"]


def _metric_keys(runs: list[RunResult]) -> list[str]:
    keys: set[str] = set()
    for r in runs:
        for k, v in (r.final or {}).items():
            if isinstance(v, (int, float, bool, str)) or v is None:
                keys.add(k)
    first = [k for k in _METRIC_PRIORITY if k in keys]
    return first + sorted(keys - set(first))


def _runs_table(runs: list[RunResult]) -> str:
    if not runs:
        return '<p class="muted">No runs.</p>'
    cfg_keys = _varying_keys(runs)
    met_keys = _metric_keys(runs)
    head = (
        "<th>run</th><th>status</th>"
        + "".join(f"<th>{esc(k)}</th>" for k in cfg_keys)
        + "<th>epochs</th>"
        + "".join(f"<th>{esc(k)}</th>" for k in met_keys)
    )
    body = []
    for r in runs:
        flat = flatten(r.config)
        cells = [
            f'<td class="mono" title="{esc(r.run_id)}">{esc(r.run_id[:12])}</td>',
            f"<td>{_status_badge(r.status)}</td>",
        ]
        cells += [f"<td>{esc(_fmt(flat.get(k)))}</td>" for k in cfg_keys]
        cells.append(f'<td class="num">{len(r.epochs)}</td>')
        for k in met_keys:
            v = (r.final or {}).get(k)
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{esc(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="table-wrap"><table class="runs"><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table></div>"
    )


def _failed_html(runs: list[RunResult]) -> str:
    failed = [r for r in runs if r.status == "failed"]
    if not failed:
        return ""
    items = []
    for r in failed:
        last = (r.error or "").strip().splitlines()[-1:] or ["(no error recorded)"]
        items.append(
            f'<details><summary><span class="mono">{esc(r.run_id[:12])}</span> '
            f"{esc(last[0])}</summary>"
            f"<pre>{esc(json.dumps(r.config, indent=1, sort_keys=True))}</pre>"
            f"<pre>{esc(r.error or '')}</pre></details>"
        )
    return f"<h3>Failed runs ({len(failed)})</h3>" + "".join(items)


def _section_html(sec: _Section) -> str:
    parts = [f'<section id="{sec.anchor}">', f"<h2>{esc(sec.title)}</h2>"]
    sub = f'<span class="mono">{esc(sec.name)}</span>'
    if sec.summary:
        sub += f" — {esc(sec.summary)}"
    parts.append(f'<p class="muted">{sub}</p>')
    parts.append(f'<p class="profile">{esc(_profile_text(sec.quick, [sec.seeds] if sec.seeds else []))}</p>')
    parts += [f'<div class="warn">{esc(n)}</div>' for n in sec.notes]
    parts += [f'<div class="error"><pre>{esc(e)}</pre></div>' for e in sec.errors]
    # Figures first: they are what the eye meets; the cards below give the numbers.
    if sec.figures:
        parts.append('<div class="figures">')
        parts += [_figure_html(f) for f in sec.figures]
        parts.append("</div>")
    if sec.cards:
        parts.append('<div class="cards">')
        parts += [_card_html(c, sec.card_anchor(i), _card_profile(sec, c, sec.quick))
                  for i, c in enumerate(sec.cards)]
        parts.append("</div>")
    parts.append(_failed_html(sec.runs))  # failures stay in view; the full table is collapsed
    counts = {s: sum(r.status == s for r in sec.runs) for s in ("done", "failed", "running", "pending")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    parts.append(f'<details class="runs"><summary>Runs ({esc(summary or "none")})</summary>')
    parts.append(_runs_table(sec.runs))
    parts.append("</details>")
    if sec.config is not None:
        parts.append(
            "<details><summary>Study configuration</summary>"
            f"<pre>{esc(json.dumps(sec.config, indent=1, sort_keys=True))}</pre></details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _answers_html(answers: _Answers, sections: list[_Section]) -> str:
    """The answers-first section: each question's sentences with links and thumbnails, then the
    conclusion card."""
    parts = ['<section id="answers">', "<h2>Answers</h2>",
             '<p class="muted">Sentences computed from this run\'s cards and rankings; each links to '
             "its evidence. In a ranking, <b>≈</b>: the 95% Welch interval of the difference between "
             "neighbours includes 0 (not separable with these seeds); <code>&lt;</code> / <code>&gt;</code>: it "
             "excludes 0. Intervals: mean [95% CI] over seeds.</p>"]
    for i, (qid, question) in enumerate(QUESTIONS.items()):
        parts.append(f'<div class="answer" id="answer-{esc(qid)}"><h3>{i + 1}. {esc(question)}</h3>')
        items = answers.questions[qid]
        if not items:
            parts.append(f'<p class="muted">{esc(NOT_MEASURED.capitalize())}.</p></div>')
            continue
        parts.append('<div class="answer-body">')
        for j, ev in enumerate(items):
            if j == 0 or ev.study_anchor != items[j - 1].study_anchor:  # one heading per study
                if j:
                    parts.append("</ul>")
                parts.append(f'<p class="from">From <a href="#{esc(ev.study_anchor)}">'
                             f"{esc(ev.study)}</a>:</p><ul>")
            badge = _badge(ev.verdict) + " " if ev.verdict else ""
            parts.append(f'<li>{badge}{esc(ev.text)} <a href="#{esc(ev.anchor)}">evidence</a></li>')
        parts.append("</ul>")
        seen: set[str] = set()
        thumbs = []
        for ev in items:
            if ev.figure is None or str(ev.figure.path) in seen:
                continue
            seen.add(str(ev.figure.path))
            uri, error = _png_uri(ev.figure)
            thumbs.append(error if uri is None else
                          f'<a class="thumb" href="#{esc(ev.anchor)}"><img src="{uri}" '
                          f'alt="{esc(ev.figure.title)}"><span>{esc(ev.figure.title)}</span></a>')
        if thumbs:
            parts.append('<div class="thumbs">' + "".join(thumbs) + "</div>")
        parts.append("</div></div>")
    parts.append('<div class="answer" id="answer-conclusion"><h3>The article\'s conclusion: '
                 "“BatchNorm is still the best and most widely applicable”</h3>")
    if answers.conclusion is None:
        parts.append(f'<p class="muted">{esc(NOT_MEASURED.capitalize())}: no study ranked several '
                     "methods on a task.</p>")
    else:
        quick = {s.quick for s in sections if s.rankings}
        profile = _card_profile(None, answers.conclusion, quick.pop() if len(quick) == 1 else None)
        parts.append(_card_html(answers.conclusion, CONCLUSION_ANCHOR, profile))
    parts.append("</div></section>")
    return "\n".join(parts)


def _render_html(
    run_dir: Path, sections: list[_Section], answers: _Answers, meta: dict[str, Any],
    counts: dict[str, int], broken: dict[str, str], generated: str,
) -> str:
    versions = meta.get("versions") or {}
    meta_spans = [f"<span>run directory: <code>{esc(run_dir)}</code></span>",
                  f"<span>generated: {esc(generated)}</span>"]
    meta_spans += [f"<span>{esc(k)} {esc(v)}</span>" for k, v in versions.items() if k != "platform"]
    total = sum(counts.values())
    run_line = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs"
    warnings_html = []
    if counts.get("pending", 0) or counts.get("running", 0):
        warnings_html.append(
            f'<div class="warn">{counts["pending"] + counts["running"]} of {total} runs are not '
            "finished: the sweep was interrupted or is still going; results are partial.</div>"
        )
    if counts.get("failed", 0):
        warnings_html.append(
            f'<div class="error">{counts["failed"]} run(s) failed; see the failed runs of each '
            "study below.</div>"
        )
    for mod, err in broken.items():
        warnings_html.append(f'<div class="error">Study module {esc(mod)} failed to load: '
                             f"{esc(err)}</div>")
    nav = "".join(
        f'<li><a href="#{s.anchor}">{esc(s.title)}</a> '
        f'<span class="muted">({len(s.cards)} card(s), {len(s.runs)} run(s))</span></li>'
        for s in sections
    )
    body = "\n".join(_section_html(s) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>normlab lab report</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>normlab lab report</h1>
<div class="meta">{''.join(meta_spans)}<span>runs: {esc(run_line)}</span></div>
<p class="banner">{esc(answers.profile)}</p>
{''.join(warnings_html)}
{_answers_html(answers, sections)}
<h2 id="claims">Claims and answers</h2>
<p class="muted">Each verdict is computed from the data: <b>supported</b> when the 95% confidence
interval of the effect lies entirely on the side the claim predicts, <b>not supported</b> when it
lies entirely on the other side, <b>inconclusive</b> when it straddles it; <b>{esc(NOT_TESTED)}</b>
when the profile has fewer seeds per arm than the study needs to decide ({DEFAULT_MIN_SEEDS} unless the study
says otherwise): it counts neither for nor against the claim. Intervals are over seeds (Student t /
Welch).</p>
{_summary_table(sections, answers.conclusion)}
<nav><h3>Studies</h3><ul>{nav or '<li class="muted">none</li>'}</ul></nav>
{body}
<footer>Generated by normlab. This page is self-contained: it loads nothing from the network.</footer>
</main>
</body>
</html>
"""


# -- Markdown --------------------------------------------------------------------------------------


def _md(text: Any) -> str:
    """Markdown-safe inline text: <, > and & escaped (no raw HTML; quotes stay readable), table
    pipes escaped, one line."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_rel(path: Path, report_dir: Path) -> str:
    """A figure's path relative to the report folder, for a Markdown link."""
    try:
        rel = Path(path).resolve().relative_to(report_dir.resolve()).as_posix()
    except ValueError:
        rel = Path(path).resolve().as_posix()
    return rel.replace(" ", "%20")


def _md_answers(answers: _Answers, report_dir: Path) -> list[str]:
    """The answers-first part of summary.md: the same sentences, links and figures as the page."""
    lines = ["## Answers", ""]
    for i, (qid, question) in enumerate(QUESTIONS.items()):
        lines += [f"### {i + 1}. {_md(question)}", ""]
        items = answers.questions[qid]
        if not items:
            lines += [f"{NOT_MEASURED.capitalize()}.", ""]
            continue
        for j, ev in enumerate(items):
            if j == 0 or ev.study_anchor != items[j - 1].study_anchor:
                lines += ([""] if j else []) + [f"From *{_md(ev.study)}*:", ""]
            badge = f"**{_md(ev.verdict)}** — " if ev.verdict else ""
            lines.append(f"- {badge}{_md(ev.text)} ([evidence](index.html#{ev.anchor}))")
        seen: set[str] = set()
        figs = []
        for ev in items:
            if ev.figure is not None and str(ev.figure.path) not in seen:
                seen.add(str(ev.figure.path))
                figs.append(f"![{_md(ev.figure.title)}]({_md_rel(ev.figure.path, report_dir)})")
        lines += ["", *([" ".join(figs), ""] if figs else [])]
    lines += ["### The article's conclusion: “BatchNorm is still the best and most widely applicable”", ""]
    c = answers.conclusion
    if c is None:
        lines += [f"{NOT_MEASURED.capitalize()}: no study ranked several methods on a task.", ""]
    else:
        lines += [f"**{_md(c.verdict)}**" + (f" ({_md(c.verdict_note)})" if c.verdict_note else "")
                  + f" — {_md(c.measurement)}", ""]
        if c.effect is not None:
            lines += [f"Effect: {_md(_effect_text(c))} (n={c.effect.n}).", ""]
    return lines


def _render_md(run_dir: Path, report_dir: Path, sections: list[_Section], answers: _Answers,
               counts: dict[str, int], generated: str) -> str:
    lines = [
        "# normlab lab report",
        "",
        f"Run directory: `{_md(run_dir)}` — generated {generated} — runs: "
        + (", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"),
        "",
        f"**{_md(answers.profile)}**",
        "",
        *_md_answers(answers, report_dir),
        "## Claims",
        "",
        "| Claim / question | Study | Measured effect (95% CI) | Verdict |",
        "|---|---|---|---|",
    ]
    rows = [(answers.conclusion, CONCLUSION_STUDY)] if answers.conclusion is not None else []
    rows += [(card, sec.title) for sec in sections for card in sec.cards]
    for card, study in rows:
        label = card.question if card.verdict == "answer" and card.question else card.claim
        lines.append(
            f"| {_md(label)} | {_md(study)} | "
            f"{_md(_effect_text(card) if card.effect is not None else card.measurement)} | "
            f"**{_md(card.verdict)}**" + (f" ({_md(card.verdict_note)})" if card.verdict_note else "")
            + " |"
        )
    for sec in sections:
        lines += ["", f"## {_md(sec.title)}", ""]
        if sec.summary:
            lines += [_md(sec.summary), ""]
        lines += [f"*{_md(_profile_text(sec.quick, [sec.seeds] if sec.seeds else []))}*", ""]
        lines += [f"> {_md(n)}" for n in sec.notes]
        lines += [f"> ERROR: {_md(e.splitlines()[0] if e else '')}" for e in sec.errors]
        for fig in sec.figures:
            lines += ["", f"![{_md(fig.title)}]({_md_rel(fig.path, report_dir)})", "",
                      f"*{_md(fig.title)}.* {_md(fig.caption)}", ""]
        for card in sec.cards:
            head = f"Question: {card.question}" if card.question else card.claim
            note = f" ({_md(card.verdict_note)})" if card.verdict_note else ""
            lines.append(f"- **{_md(card.verdict)}**{note} — {_md(head)}")
            lines.append(f"  - {_md(card.measurement)}")
            if card.details:
                lines.append(f"  - {_md(card.details)}")
        failed = [r for r in sec.runs if r.status == "failed"]
        if failed:
            lines += ["", f"Failed runs ({len(failed)}):"]
            for r in failed:
                last = (r.error or "").strip().splitlines()[-1:] or ["(no error recorded)"]
                lines.append(f"- `{r.run_id[:12]}` {_md(last[0])}")
    return "\n".join(lines) + "\n"


# -- entry point -----------------------------------------------------------------------------------


#: From this many studies on, a report is built by a pool of processes (one per core): plotting
#: is most of a report's time (the demo's 12 studies: 23 s on one core) and a spawned process
#: costs ~4 s to start (importing torch and matplotlib), which a study or two do not repay.
POOL_MIN_STUDIES = 4


def _collect_all(store: Store, figroot: Path, strict: bool, workers: int | None = None) -> list[_Section]:
    """:func:`_collect` of every study in ``store``, in ``workers`` spawned processes (default:
    one per core from :data:`POOL_MIN_STUDIES` studies on) or in this one."""
    from normlab.lab.sweep import available_cores

    names = store.studies()
    if workers is None:
        workers = min(len(names), available_cores()) if len(names) >= POOL_MIN_STUDIES else 1
    if workers < 2 or not all(_importable(n) for n in names):
        return [_collect_quietly(store, name, figroot, strict) for name in names]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # spawn, not fork: this process may hold OpenMP thread pools (torch's, numba's), which a
    # forked child cannot use
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_collect_in, str(store.path), name, str(figroot), strict) for name in names]
        return [f.result() for f in futures]


def _importable(name: str) -> bool:
    """A study a spawned process finds too: one of this package's modules (not registered in
    memory, not unknown)."""
    try:
        return get_study(name).module.__name__.startswith("normlab.lab.studies.")
    except StudyError:
        return False


def _collect_quietly(store: Store, name: str, figroot: Path, strict: bool) -> _Section:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # broken study modules are listed in the page
        return _collect(store, name, figroot, strict)


def _collect_in(db: str, name: str, figroot: str, strict: bool) -> _Section:
    """One study's section in a pool process (its own connection to the store)."""
    import matplotlib

    matplotlib.use("Agg")
    with Store(Path(db)) as store:
        return _collect_quietly(store, name, Path(figroot), strict)


def build_report(run_dir: str | Path, *, strict: bool = False) -> Path:
    """Write ``run_dir/report/index.html``, ``run_dir/report/summary.md`` and ``run_dir/results.csv``.

    Args:
        run_dir: a run directory holding ``results.sqlite``.
        strict: re-raise errors of a study's ``analyze``/``plot``/``runs`` instead of showing them
            in its section (the default keeps one broken study from hiding the others).

    Returns:
        The path of ``index.html``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no window ever opens

    run_dir = Path(run_dir)
    db = run_dir / DB_NAME
    if not db.is_file():
        raise FileNotFoundError(f"no {DB_NAME} in {run_dir}: run a study there first")
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    with Store(db) as store:
        sections = _collect_all(store, report_dir / "figures", strict)
        sections.sort(key=lambda s: (s.order, s.name))
        meta = store.meta()
        counts = store.counts()
        store.to_csv(run_dir / "results.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = broken_studies()

    index = report_dir / "index.html"
    answers = _answers(sections)
    index.write_text(_render_html(run_dir, sections, answers, meta, counts, broken, generated),
                     encoding="utf-8")
    (report_dir / "summary.md").write_text(
        _render_md(run_dir, report_dir, sections, answers, counts, generated), encoding="utf-8"
    )
    return index
