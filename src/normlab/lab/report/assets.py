"""Static assets of the HTML report, as Python strings (the report is one self-contained file)."""

from __future__ import annotations

__all__ = ["CSP", "CSS"]

#: Content-Security-Policy of the report: nothing may be fetched from anywhere (images are inline
#: ``data:`` URIs, styles inline) and no script may run — defence in depth on top of escaping
#: every user-provided string.
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

#: The whole stylesheet. System font stacks only: no web fonts, no network.
CSS = """
:root {
  --fg: #1d2228; --muted: #5b6570; --bg: #ffffff; --panel: #f5f7f9; --line: #d9dee3;
  --link: #1f5fbf; --ok: #1b7f3b; --no: #b3261e; --maybe: #8a6d00; --answer: #2456a6;
  --untested: #6b5b95;
}
* { box-sizing: border-box; }
body {
  margin: 0; color: var(--fg); background: var(--bg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
main { max-width: 1100px; margin: 0 auto; padding: 24px 20px 64px; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.35em; margin: 48px 0 6px; padding-top: 8px; border-top: 2px solid var(--line); }
h3 { font-size: 1.1em; margin: 28px 0 8px; }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.88em; }
pre { background: var(--panel); padding: 10px 12px; border-radius: 6px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-word; }
.muted { color: var(--muted); }
.meta { color: var(--muted); font-size: 0.9em; margin-bottom: 18px; }
.meta span { margin-right: 16px; white-space: nowrap; }
.warn { background: #fff6e0; border: 1px solid #e9cf86; padding: 8px 12px; border-radius: 6px;
        margin: 10px 0; }
.error { background: #fdecea; border: 1px solid #efb4ae; padding: 8px 12px; border-radius: 6px;
         margin: 10px 0; }
.table-wrap { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid var(--line); }
th { background: var(--panel); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:hover td { background: #fafbfc; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 0.82em;
         font-weight: 600; color: #fff; white-space: nowrap; }
.v-supported { background: var(--ok); }
.v-not-supported { background: var(--no); }
.v-inconclusive { background: var(--maybe); }
.v-answer { background: var(--answer); }
.v-not-tested { background: var(--untested); }
.v-unknown { background: var(--muted); }
.s-done { background: var(--ok); }
.s-failed { background: var(--no); }
.s-running, .s-pending { background: var(--muted); }
.cards { display: grid; gap: 12px; margin: 12px 0 20px; }
.card { border: 1px solid var(--line); border-left: 5px solid var(--muted); border-radius: 6px;
        padding: 10px 14px; background: var(--bg); }
.card.v-supported { border-left-color: var(--ok); background: var(--bg); }
.card.v-not-supported { border-left-color: var(--no); background: var(--bg); }
.card.v-inconclusive { border-left-color: var(--maybe); background: var(--bg); }
.card.v-answer { border-left-color: var(--answer); background: var(--bg); }
.card.v-not-tested { border-left-color: var(--untested); background: var(--bg); }
.card .verdict-note { color: var(--untested); font-size: 0.92em; }
.profile { color: var(--muted); font-size: 0.85em; font-style: italic; margin: 2px 0; }
.banner { display: inline-block; background: #eef1fb; border: 1px solid #c9d2ee; border-radius: 6px;
          padding: 4px 12px; margin: 4px 0 10px; font-weight: 600; }
.answer { margin: 14px 0 22px; }
.answer h3 { margin: 18px 0 6px; }
.answer ul { margin: 4px 0 8px; padding-left: 20px; }
.answer li { margin: 4px 0; }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
.answer .from { margin: 8px 0 2px; color: var(--muted); font-size: 0.92em; }
.thumb { display: inline-block; width: 320px; border: 1px solid var(--line); border-radius: 6px;
         padding: 4px; font-size: 0.82em; color: var(--muted); }
.thumb img { width: 100%; height: auto; display: block; }
.figures { margin: 8px 0; }
.card .claim { font-weight: 600; margin: 4px 0; }
.card .measure { margin: 4px 0; }
.card .details { color: var(--muted); font-size: 0.92em; white-space: pre-wrap; margin: 4px 0 0; }
figure { margin: 16px 0; padding: 10px; border: 1px solid var(--line); border-radius: 6px;
         display: inline-block; max-width: 100%; vertical-align: top; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9em; color: var(--muted); margin-top: 6px; max-width: 640px; }
figcaption b { color: var(--fg); }
details > summary { cursor: pointer; color: var(--link); }
nav ul { padding-left: 18px; margin: 4px 0; }
footer { margin-top: 48px; color: var(--muted); font-size: 0.85em; }
"""
