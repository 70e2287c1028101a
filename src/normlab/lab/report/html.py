"""Build the report of a run directory: ``report/index.html``, ``report/summary.md``, ``results.csv``.

The HTML page is self-contained: figures are embedded as base64 PNG ``data:`` URIs, the CSS is
inline, there is no script and no font or anything else to fetch (a Content-Security-Policy
forbids it), so it can be mailed or archived as one file. Every string that comes from a user, a
config or a study (run names, paths, data/model specs, error messages) is HTML-escaped.

Layout: a header (run directory, versions, run counts, warnings), the table of every claim with
its measured effect and verdict badge (links to the cards and study sections), then one section
per study (ordered by ``ORDER``): answer cards, figures with captions, the table of runs, and the
failed runs with their tracebacks.
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

from normlab.lab.report.assets import CSP, CSS
from normlab.lab.stats import format_interval
from normlab.lab.store import DB_NAME, RunResult, Store, flatten
from normlab.lab.studies import (
    Card,
    Figure,
    Study,
    StudyError,
    broken_studies,
    config_meta_key,
    expected_run_ids,
    get_study,
    load_study_config,
    load_study_meta,
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
    cards: list[Card] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"study-{_slug(self.name)}"

    def card_anchor(self, i: int) -> str:
        return f"card-{_slug(self.name)}-{i}"


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
        sec.cards = cards
    except Exception as exc:
        if strict:
            raise
        sec.errors.append(_error_text("analyze()", exc))

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


def _summary_table(sections: list[_Section]) -> str:
    rows = []
    for sec in sections:
        for i, card in enumerate(sec.cards):
            label = card.question if card.verdict == "answer" and card.question else card.claim
            rows.append(
                "<tr>"
                f'<td><a href="#{sec.card_anchor(i)}">{esc(label)}</a></td>'
                f'<td><a href="#{sec.anchor}">{esc(sec.title)}</a></td>'
                f"<td>{_summary_effect(card)}</td>"
                f"<td>{_badge(card.verdict)}</td>"
                "</tr>"
            )
    if not rows:
        return '<p class="muted">No answer cards: no study produced results yet.</p>'
    return (
        '<div class="table-wrap"><table class="claims"><thead><tr>'
        "<th>Claim / question</th><th>Study</th><th>Measured effect (95% CI)</th><th>Verdict</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )


def _card_html(sec: _Section, i: int, card: Card) -> str:
    cls = _VERDICT_CLASS.get(card.verdict, "v-unknown")
    parts = [f'<article class="card {cls}" id="{sec.card_anchor(i)}">', _badge(card.verdict)]
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


def _figure_html(fig: Figure) -> str:
    try:
        data = Path(fig.path).read_bytes()
    except OSError as exc:
        return f'<div class="error">Figure {esc(fig.title)}: cannot read {esc(fig.path)}: {esc(exc)}</div>'
    if not data.startswith(_PNG_MAGIC):
        return f'<div class="error">Figure {esc(fig.title)}: {esc(fig.path)} is not a PNG file.</div>'
    b64 = base64.b64encode(data).decode("ascii")
    caption = f"<b>{esc(fig.title)}</b>"
    if fig.caption:
        caption += f" {esc(fig.caption)}"
    return (
        f'<figure><img src="data:image/png;base64,{b64}" alt="{esc(fig.title)}">'
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
    if sec.quick:
        sub += " (quick profile)"
    parts.append(f'<p class="muted">{sub}</p>')
    parts += [f'<div class="warn">{esc(n)}</div>' for n in sec.notes]
    parts += [f'<div class="error"><pre>{esc(e)}</pre></div>' for e in sec.errors]
    if sec.cards:
        parts.append('<div class="cards">')
        parts += [_card_html(sec, i, c) for i, c in enumerate(sec.cards)]
        parts.append("</div>")
    if sec.figures:
        parts.append("<h3>Figures</h3>")
        parts += [_figure_html(f) for f in sec.figures]
    counts = {s: sum(r.status == s for r in sec.runs) for s in ("done", "failed", "running", "pending")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    parts.append(f"<h3>Runs ({esc(summary or 'none')})</h3>")
    parts.append(_runs_table(sec.runs))
    parts.append(_failed_html(sec.runs))
    if sec.config is not None:
        parts.append(
            "<details><summary>Study configuration</summary>"
            f"<pre>{esc(json.dumps(sec.config, indent=1, sort_keys=True))}</pre></details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _render_html(
    run_dir: Path, sections: list[_Section], meta: dict[str, Any], counts: dict[str, int],
    broken: dict[str, str], generated: str,
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
{''.join(warnings_html)}
<h2 id="claims">Claims and answers</h2>
<p class="muted">Each verdict is computed from the data: <b>supported</b> when the 95% confidence
interval of the effect lies entirely on the side the claim predicts, <b>not supported</b> when it
lies entirely on the other side, <b>inconclusive</b> when it straddles it. Intervals are over
seeds (Student t / Welch).</p>
{_summary_table(sections)}
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


def _render_md(run_dir: Path, report_dir: Path, sections: list[_Section], counts: dict[str, int],
               generated: str) -> str:
    lines = [
        "# normlab lab report",
        "",
        f"Run directory: `{_md(run_dir)}` — generated {generated} — runs: "
        + (", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"),
        "",
        "| Claim / question | Study | Measured effect (95% CI) | Verdict |",
        "|---|---|---|---|",
    ]
    for sec in sections:
        for card in sec.cards:
            label = card.question if card.verdict == "answer" and card.question else card.claim
            lines.append(
                f"| {_md(label)} | {_md(sec.title)} | "
                f"{_md(_effect_text(card) if card.effect is not None else card.measurement)} | "
                f"**{_md(card.verdict)}** |"
            )
    for sec in sections:
        lines += ["", f"## {_md(sec.title)}", ""]
        if sec.summary:
            lines += [_md(sec.summary), ""]
        lines += [f"> {_md(n)}" for n in sec.notes]
        lines += [f"> ERROR: {_md(e.splitlines()[0] if e else '')}" for e in sec.errors]
        for card in sec.cards:
            head = f"Question: {card.question}" if card.question else card.claim
            lines.append(f"- **{_md(card.verdict)}** — {_md(head)}")
            lines.append(f"  - {_md(card.measurement)}")
            if card.details:
                lines.append(f"  - {_md(card.details)}")
        for fig in sec.figures:
            try:
                rel = Path(fig.path).resolve().relative_to(report_dir.resolve()).as_posix()
            except ValueError:
                rel = Path(fig.path).resolve().as_posix()
            lines += ["", f"![{_md(fig.title)}]({rel.replace(' ', '%20')})", "",
                      f"*{_md(fig.title)}.* {_md(fig.caption)}"]
        failed = [r for r in sec.runs if r.status == "failed"]
        if failed:
            lines += ["", f"Failed runs ({len(failed)}):"]
            for r in failed:
                last = (r.error or "").strip().splitlines()[-1:] or ["(no error recorded)"]
                lines.append(f"- `{r.run_id[:12]}` {_md(last[0])}")
    return "\n".join(lines) + "\n"


# -- entry point -----------------------------------------------------------------------------------


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
        sections = []
        for name in store.studies():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # broken study modules are listed in the page
                sections.append(_collect(store, name, report_dir / "figures", strict))
        sections.sort(key=lambda s: (s.order, s.name))
        meta = store.meta()
        counts = store.counts()
        store.to_csv(run_dir / "results.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = broken_studies()

    index = report_dir / "index.html"
    index.write_text(_render_html(run_dir, sections, meta, counts, broken, generated),
                     encoding="utf-8")
    (report_dir / "summary.md").write_text(
        _render_md(run_dir, report_dir, sections, counts, generated), encoding="utf-8"
    )
    return index
