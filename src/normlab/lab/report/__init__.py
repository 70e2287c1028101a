"""The lab's report: one self-contained HTML page (plus a Markdown summary and a CSV) per run
directory. See :func:`build_report`."""

from __future__ import annotations

from normlab.lab.report.html import build_report, esc

__all__ = ["build_report", "esc"]
