"""Tests of the HTML/Markdown/CSV report (normlab.lab.report), including a headless-Chromium check
that the page renders with every image loaded, no console error and no network access."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import lab_fake_runners  # noqa: F401  (registers the fake-* runners)
from normlab.lab import studies
from normlab.lab.report import build_report
from normlab.lab.stats import mean_ci
from normlab.lab.store import Store
from normlab.lab.studies import Card, Figure, Study, save_study_config
from normlab.lab.sweep import run_sweep

XSS = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _png(path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot([0, 1], [0, 1])
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def make_study(name: str, order: int = 1, *, analyze_error: bool = False) -> Study:
    """A study module built in memory whose every string carries an XSS payload."""
    mod = types.ModuleType(f"fake_study_{name}")

    @dataclass
    class Config:
        data: str = XSS
        model: str = "mlp"
        seeds: tuple[int, ...] = (0, 1, 2)
        extra: dict[str, Any] = field(default_factory=lambda: {"note": XSS})

        @classmethod
        def quick(cls) -> Config:
            return cls(seeds=(0, 1))

    def runs(cfg: Config) -> list[dict[str, Any]]:
        out = [
            {"runner": "fake-echo", "value": s, "data": cfg.data, "name": f"run {XSS}",
             "epochs": 2}
            for s in cfg.seeds
        ]
        return out + [{"runner": "fake-fail", "message": f"failure {XSS}", "data": cfg.data}]

    def analyze(results: list, cfg: Config) -> list[Card]:
        if analyze_error:
            raise RuntimeError(f"analysis exploded {XSS}")
        assert all(r.done for r in results)  # analyze only sees finished runs
        vals = [r.final["value"] for r in results]
        return [
            Card(study=name, claim=f"Claim {XSS}", measurement=f"values {vals} {XSS}",
                 verdict="supported", effect=mean_ci(vals), details=f"details {XSS}"),
            Card(study=name, claim=f"Which? {XSS}", question=f"Which? {XSS}",
                 measurement=f"answer {XSS}", verdict="answer"),
        ]

    def plot(results: list, cfg: Config, outdir: Path) -> list[Figure]:
        return [Figure(title=f"Figure {XSS}", path=_png(outdir / "a.png", "a"),
                       caption=f"caption {XSS}")]

    mod.NAME, mod.TITLE, mod.SUMMARY, mod.ORDER = name, f"Title {name} {XSS}", f"sum {XSS}", order
    mod.Config, mod.runs, mod.analyze, mod.plot = Config, runs, analyze, plot
    Config.__module__ = mod.__name__
    return Study(mod)


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    """Register in-memory studies for the duration of a test."""

    def add(study: Study) -> Study:
        monkeypatch.setitem(studies.load_all(), study.name, study)
        return study

    return add


def run_study(study: Study, run_dir: Path, quick: bool = False) -> None:
    cfg = study.default_config(quick)
    with Store(run_dir) as s:
        save_study_config(s, study, cfg, quick=quick)
    run_sweep(study.name, study.runs(cfg), run_dir, workers=1, progress=False)


def test_report_escapes_every_user_string(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run <b>&\"quote'"
    run_study(register(make_study("xss")), run_dir)
    index = build_report(run_dir, strict=True)
    page = index.read_text()
    assert XSS not in page
    assert "<script" not in page.lower()  # the report has no script at all
    assert "<b>&" not in page
    assert html.escape(XSS) in page
    for text in ("Claim", "values [0, 1, 2]", "details", "answer", "Figure", "caption", "failure", "run ",
                 "Title xss", "sum "):
        assert f"{text} {html.escape(XSS)}" in page or f"{text}{html.escape(XSS)}" in page, text
    md = (run_dir / "report" / "summary.md").read_text()
    assert XSS not in md and "<script" not in md
    csv_text = (run_dir / "results.csv").read_text()
    assert "fake-echo" in csv_text


def test_report_structure(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_study(register(make_study("second", order=5)), run_dir)
    run_study(register(make_study("first", order=1)), run_dir)
    index = build_report(run_dir)
    page = index.read_text()
    assert (run_dir / "report" / "summary.md").is_file()
    assert (run_dir / "results.csv").is_file()
    # self-contained: no external reference, CSP forbids any fetch, images inline
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page
    assert page.count('src="data:image/png;base64,') == 2
    # studies in ORDER, claims table first, every internal link points to an existing anchor
    assert page.index('id="claims"') < page.index('id="study-first"') < page.index('id="study-second"')
    ids = set(re.findall(r'id="([^"]+)"', page))
    links = set(re.findall(r'href="#([^"]+)"', page))
    assert {"study-first", "study-second", "card-first-0", "card-second-1"} <= links
    assert links <= ids
    # badges, the failed run with its traceback, the runs table
    assert page.count('class="badge v-supported"') >= 4  # 2 in the table, 2 in the cards
    assert "v-answer" in page
    assert "Failed runs (1)" in page and "Traceback" in page
    assert "s-done" in page and "s-failed" in page
    md = (run_dir / "report" / "summary.md").read_text()
    assert "| Claim / question | Study |" in md and "](figures/first/a.png)" in md


def test_report_survives_broken_analyze_and_partial_runs(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_study(register(make_study("good", order=1)), run_dir)
    bad = register(make_study("bad", order=2, analyze_error=True))
    run_study(bad, run_dir)
    with Store(run_dir) as s:  # a run left pending, as after an interrupted sweep
        s.add_runs("good", [{"runner": "fake-echo", "value": 99}])
    page = build_report(run_dir).read_text()
    assert "analyze() failed" in page and "analysis exploded" in page
    assert "card-good-0" in page  # the other study is unaffected
    assert "not finished" in page
    with pytest.raises(RuntimeError, match="analysis exploded"):
        build_report(run_dir, strict=True)


def test_report_only_uses_runs_of_recorded_config(tmp_path: Path, register) -> None:
    study = register(make_study("grid"))
    run_dir = tmp_path / "run"
    run_study(study, run_dir)  # seeds 0, 1, 2
    run_study(study, run_dir, quick=True)  # seeds 0, 1: now the recorded config
    page = build_report(run_dir).read_text()
    assert "values [0, 1]" in page
    assert "run(s) of other configurations" in page
    assert "(quick profile)" in page


def test_report_unknown_study_and_bad_figure(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_sweep("not-registered", [{"runner": "fake-echo", "value": 1}], run_dir, workers=1,
              progress=False)
    study = make_study("badfig")
    study.module.plot = lambda results, cfg, outdir: [
        Figure("missing", outdir / "nope.png"),
        Figure("text", (outdir / "t.png").write_text("not a png") and outdir / "t.png"),
    ]
    run_study(register(study), run_dir)
    page = build_report(run_dir).read_text()
    assert "unknown study &#x27;not-registered&#x27;" in page
    assert "cannot read" in page and "is not a PNG file" in page


def test_report_requires_a_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.sqlite"):
        build_report(tmp_path)


def test_smoke_study_report(tmp_path: Path) -> None:
    """The bundled smoke study end to end: sweep, analysis with a real verdict, figure."""
    smoke = studies.get_study("smoke")
    run_study(smoke, tmp_path, quick=True)
    page = build_report(tmp_path, strict=True).read_text()
    assert "badge v-supported" in page  # standardized inputs converge faster, clearly
    assert page.count("data:image/png;base64,") == 1


# -- headless Chromium -------------------------------------------------------------------------

CHECK_SCRIPT = """<script nonce="nlabtest">
window.__nlab = {errors: [], alerts: 0};
window.alert = function () { window.__nlab.alerts += 1; };
addEventListener("error", function (e) {
  var t = e.target || {};
  window.__nlab.errors.push("error: " + (e.message || (t.tagName + " " + (t.src || "")).slice(0, 80)));
}, true);
document.addEventListener("securitypolicyviolation", function (e) {
  window.__nlab.errors.push("csp: " + e.violatedDirective + " " + e.blockedURI);
});
addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = document.createElement("pre");
  out.id = "nlab-result";
  out.textContent = JSON.stringify({
    errors: window.__nlab.errors, alerts: window.__nlab.alerts,
    scripts: document.scripts.length, title: document.title,
    images: imgs.map(function (i) { return [i.complete, i.naturalWidth]; })
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium(url: str, profile: Path) -> tuple[str, str]:
    """Load ``url`` in headless Chromium; return (dumped DOM, console lines from the log)."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=10000", "--dump-dom", url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, "\n".join(console)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="chromium is not installed (apt-get install -y chromium) — browser check skipped",
)
def test_report_renders_in_headless_chromium(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_study(register(make_study("xss")), run_dir)
    run_study(studies.get_study("smoke"), run_dir, quick=True)
    index = build_report(run_dir, strict=True)
    page = index.read_text()
    n_images = page.count("<img ")
    assert n_images == 2

    # 1. The report as written: it must load without a single console message (a CSP
    #    violation, i.e. an attempted fetch or script, or any error would log one).
    dom, console = _chromium(index.as_uri(), tmp_path / "profile1")
    assert console == "", console
    assert "normlab lab report" in dom and "Claims and answers" in dom

    # 2. A copy with a nonce'd probe script (allowed by an extended CSP) that reports, once the
    #    page has loaded, whether every image decoded, and any error or policy violation.
    probe_page = page.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-nlabtest';")
    probe_page = probe_page.replace("<head>", "<head>" + CHECK_SCRIPT, 1)
    probe = tmp_path / "probe.html"
    probe.write_text(probe_page)
    dom, console = _chromium(probe.as_uri(), tmp_path / "profile2")
    match = re.search(r'<pre id="nlab-result">(.*?)</pre>', dom, re.S)
    assert match, dom[-2000:]
    result = json.loads(html.unescape(match.group(1)))
    assert result["errors"] == [] and console == "", (result, console)
    assert result["alerts"] == 0 and result["scripts"] == 1  # only the probe: no injected script
    assert len(result["images"]) == n_images
    assert all(complete and width > 0 for complete, width in result["images"]), result["images"]
    assert result["title"] == "normlab lab report"
