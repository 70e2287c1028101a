"""Tests of the HTML/Markdown/CSV report (normlab.lab.report), including a headless-Chromium check
that the page renders with every image loaded, no console error and no network access; the
answers-first part (sentences from hand-made cards and rankings, "not measured in this run", the
cross-study verdict on BatchNorm), the profile banners and the verdicts withheld below MIN_SEEDS."""

from __future__ import annotations

import dataclasses
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
from normlab.lab.report.answers import conclusion_card, interval, rank, ranking_sentence
from normlab.lab.stats import Interval, format_interval, mean_ci, rate_ci
from normlab.lab.store import RunResult, Store
from normlab.lab.studies import (
    NOT_TESTED,
    QUESTIONS,
    Card,
    Figure,
    Ranking,
    Study,
    save_study_config,
    withhold_verdicts,
)
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
    assert '<p class="profile">indicative — quick profile, n = 2 seeds</p>' in page


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
    run_study(register(make_answer_study("toy")), run_dir, quick=True)  # answers with thumbnails
    index = build_report(run_dir, strict=True)
    page = index.read_text()
    n_images = page.count("<img ")
    assert n_images == 5  # 3 figures and 2 thumbnails in the answers (2 questions cite Figure A)

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


# -- answers first, profile banners, verdicts the seeds can carry ------------------------------



def _iv(n: int, lo: float = 0.5, hi: float = 1.5) -> Interval:
    return Interval(1.0, lo, hi, n)


def test_withhold_verdicts_needs_min_seeds_per_arm() -> None:
    cards = [
        Card("s", "a", "m", "supported", effect=_iv(2)),
        Card("s", "b", "m", "not supported", effect=_iv(2)),
        Card("s", "c", "m", "supported", effect=_iv(3)),
        Card("s", "d", "m", "inconclusive", effect=_iv(2)),
        Card("s", "e", "m", "answer", question="Which?"),
        Card("s", "f", "m", "supported"),  # no interval: the profile's seeds decide
        Card("s", "g", "m", "supported", effect=_iv(6)),  # 6 runs pooled over 2 seeds
    ]
    out = withhold_verdicts(cards, 3, seeds=None)
    assert [c.verdict for c in out] == [
        NOT_TESTED, NOT_TESTED, "supported", "inconclusive", "answer", "supported", "supported"]
    assert out[0].verdict_note == "2 seeds; 3 needed" and out[2].verdict_note == ""
    assert cards[0].verdict == "supported"  # the study's own cards are not mutated
    out = withhold_verdicts(cards, 3, seeds=2)
    assert out[5].verdict == NOT_TESTED and out[6].verdict == NOT_TESTED  # min(n, seeds)
    assert [c.verdict for c in withhold_verdicts(cards, 2, seeds=2)][:3] == [
        "supported", "not supported", "supported"]  # a study's own MIN_SEEDS = 2


def test_card_and_ranking_hooks_validate() -> None:
    assert NOT_TESTED in studies.CARD_VERDICTS
    assert set(QUESTIONS) == {"architecture", "batch-size", "cost"}
    with pytest.raises(ValueError, match="Card.answers must be None or one of"):
        Card("s", "c", "m", "answer", answers="transformers?")
    with pytest.raises(ValueError, match="Ranking.question must be None or one of"):
        Ranking("s", "t", "err", {"bn": [1.0]}, question="nope")
    with pytest.raises(ValueError, match="Ranking.bounds"):
        Ranking("s", "t", "err", {"bn": [1.0]}, bounds=(1.0, 0.0))
    assert Ranking("s", "t", "err", {"bn": [1, 2], "gn": []}).values == {"bn": [1.0, 2.0]}
    with pytest.raises(ValueError, match="Ranking.values must be finite numbers"):
        Ranking("s", "t", "err", {"bn": [1.0, float("nan")]})


def test_ranking_sentence_orders_and_ties() -> None:
    r = Ranking("s", "CNN on digits", "validation error",
                {"ln": [3.0, 3.2, 2.9], "gn": [1.5, 1.6, 1.4], "bn": [1.0, 1.2, 1.1], "in": [1.1, 1.3, 1.0]},
                unit="%", bounds=(0.0, 100.0))
    assert [x.norm for x in rank(r)] == ["bn", "in", "gn", "ln"]
    text = ranking_sentence(r)
    assert text.startswith("CNN on digits (validation error, lower is better; n = 3 seeds): bn 1.1%")
    assert " ≈ in " in text and " < gn " in text and " < ln " in text and text.endswith("].")
    acc = Ranking("s", "LSTM", "accuracy", {"bn": [40.0, 90.0], "ln": [95.0, 96.0]},
                  lower_is_better=False, unit="%", bounds=(0.0, 100.0))
    assert [x.norm for x in rank(acc)] == ["ln", "bn"]
    assert " ≈ bn " in ranking_sentence(acc)  # two noisy seeds: not separable
    # a percentage's interval is the cards' logit-scale one and stays in range (the t interval of
    # [40, 90] reaches −253 … 383)
    iv = interval([40.0, 90.0], (0.0, 100.0))
    assert iv == rate_ci([40.0, 90.0]) and 0.0 <= iv.lo < 1.0 and 99.0 < iv.hi <= 100.0 and iv.mean == 65.0
    iv = interval([0.4, 0.9], (0.0, 1.0))  # other bounds: the t interval, clipped
    assert iv.lo == 0.0 and iv.hi == 1.0
    raw = interval([40.0, 90.0])
    assert raw.lo < 0 and raw.hi > 100


def test_conclusion_card_ranks_bn_in_every_task() -> None:
    best = Ranking("a", "CNN", "validation error", {"bn": [1.0, 1.1, 1.2], "gn": [2.0, 2.1, 2.2]}, unit="%")
    acc = Ranking("b", "ResNet", "accuracy", {"bn": [95.0, 95.5, 96.0], "gn": [90.0, 90.5, 91.0]},
                  lower_is_better=False, unit="%")
    no_bn = Ranking("c", "LSTM", "accuracy", {"ln": [90.0, 91.0, 92.0], "none": [80.0, 81.0, 82.0]},
                    lower_is_better=False)
    card = conclusion_card([best, acc, no_bn])
    assert card is not None and card.verdict == "supported"
    assert "1st of 2 on CNN" in card.measurement and "1st of 2 on ResNet" in card.measurement
    assert "Not run in: LSTM" in card.measurement
    assert card.effect is not None and card.effect.hi < 0 and card.effect.n == 3
    worse = Ranking("d", "MLP", "validation error", {"bn": [3.0, 3.1, 3.2], "ln": [1.0, 1.1, 1.2]}, unit="%")
    card = conclusion_card([best, worse])
    assert card is not None and card.verdict == "not supported"
    assert "2nd of 2 on MLP" in card.measurement
    assert card.effect is not None and card.effect.lo > 0  # the refuting task is the effect
    assert card.effect_label.startswith("MLP: validation error, BN − best other (points;")
    two = Ranking("e", "MLP", "validation error", {"bn": [3.0, 3.1], "ln": [1.0, 1.1]})
    card = conclusion_card([two])
    assert card is not None and card.verdict == NOT_TESTED and card.verdict_note == "2 seeds; 3 needed"
    assert "(validation error, BN − ln: 2 [" in card.measurement
    assert "1 with fewer than 3 seeds (not counted)" in card.measurement
    # a 2-seed task counts neither for nor against: the 3-seed task decides
    card = conclusion_card([best, two])
    assert card is not None and card.verdict == "supported" and card.effect is not None and card.effect.n == 3
    assert "1 with fewer than 3 seeds (not counted)" in card.measurement
    assert conclusion_card([Ranking("f", "x", "err", {"bn": [1.0, 2.0]})]) is None  # nothing compared


def make_answer_study(name: str, *, answers: str | None = "batch-size", rank_question: str = "architecture",
                      min_seeds: int | None = None) -> Study:
    """A study whose cards answer one of the article's questions, with a ranking hook."""
    mod = types.ModuleType(f"fake_answer_study_{name}")

    @dataclass
    class Config:
        seeds: tuple[int, ...] = (0, 1, 2)

        @classmethod
        def quick(cls) -> Config:
            return cls(seeds=(0, 1))

    def runs(cfg: Config) -> list[dict[str, Any]]:
        return [{"runner": "fake-echo", "value": float(s), "norm": n, "study": name}
                for n in ("bn", "gn") for s in cfg.seeds] + [
            {"runner": "fake-fail", "message": "expected failure", "study": name}]

    def _vals(results: list, norm: str) -> list[float]:
        return [r.final["value"] + (0.0 if norm == "bn" else 10.0) for r in results
                if r.config.get("norm") == norm]

    def analyze(results: list, cfg: Config) -> list[Card]:
        bn, gn = _vals(results, "bn"), _vals(results, "gn")
        effect = Interval(-10.0, -11.0, -9.0, len(bn))
        return [
            Card(name, "BN has the lower error.", f"bn {bn} vs gn {gn}", "supported", effect=effect,
                 effect_label="BN − GN (points)", answers=answers, figure="a.png"),
            Card(name, "Which norm?", "bn first", "answer", question="Which norm?"),
        ]

    def ranking(results: list, cfg: Config) -> list[Ranking]:
        return [Ranking(name, f"toy task {name}", "validation error",
                        {"bn": _vals(results, "bn"), "gn": _vals(results, "gn")}, unit="%",
                        bounds=(0.0, 100.0), question=rank_question, evidence="Which norm?",
                        figure="Figure A")]

    def plot(results: list, cfg: Config, outdir: Path) -> list[Figure]:
        return [Figure(title="Figure A", path=_png(outdir / "a.png", "a"), caption="cap")]

    mod.NAME, mod.TITLE, mod.SUMMARY, mod.ORDER = name, f"Title {name}", "summary", 1
    mod.Config, mod.runs, mod.analyze, mod.plot, mod.ranking = Config, runs, analyze, plot, ranking
    if min_seeds is not None:
        mod.MIN_SEEDS = min_seeds
    Config.__module__ = mod.__name__
    return Study(mod)


def _answers_part(page: str) -> str:
    return page[page.index('id="answers"'):page.index('id="claims"')]


def test_report_answers_first_quick_profile(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_study(register(make_answer_study("toy")), run_dir, quick=True)
    page = build_report(run_dir, strict=True).read_text()
    # the answers come first, before the claims table and the study sections
    assert page.index('id="answers"') < page.index('id="claims"') < page.index('id="study-toy"')
    answers = _answers_part(page)
    for qid, question in QUESTIONS.items():
        assert f'id="answer-{qid}"' in answers and html.escape(question) in answers
    arch = answers[answers.index('id="answer-architecture"'):answers.index('id="answer-batch-size"')]
    # the ranking sentence, computed from the per-seed values (bn 0, 1 vs gn 10, 11)
    bn = format_interval(interval([0.0, 1.0], (0.0, 100.0)), unit="%")  # logit scale, as the cards
    assert f"toy task toy (validation error, lower is better; n = 2 seeds): bn {bn} &lt; gn 10.5%" in arch
    assert 'href="#card-toy-1"' in arch  # the ranking links to its evidence card ("Which norm?")
    assert arch.count("<img ") == 1 and 'class="thumb" href="#card-toy-1"' in arch
    batch = answers[answers.index('id="answer-batch-size"'):answers.index('id="answer-cost"')]
    assert '<span class="badge v-not-tested">not tested at this profile</span> BN has the lower error. (' in batch
    assert "(2 seeds; 3 needed)" in batch and 'href="#card-toy-0"' in batch
    cost = answers[answers.index('id="answer-cost"'):answers.index('id="answer-conclusion"')]
    assert "Not measured in this run." in cost and "<img " not in cost
    conclusion = answers[answers.index('id="answer-conclusion"'):]
    assert 'id="card-conclusion"' in conclusion and "1st of 2 on toy task toy" in conclusion
    assert "badge v-not-tested" in conclusion  # 2 seeds: not even the cross-study verdict
    # banner: on the page and on every card
    banner = "indicative — quick profile, n = 2 seeds"
    assert page.count(f'<p class="banner">{banner}</p>') == 1  # the page header
    assert page.count(f'<span class="profile">{banner}</span>') == 3  # 2 cards + conclusion
    # the verdict is withheld at n = 2, and says why
    assert "badge v-supported" not in page and "badge v-not-tested" in page
    assert "Verdict withheld: 2 seeds; 3 needed" in page
    # layout: figures before cards, the failed run in view, the runs table collapsed
    sec = page[page.index('id="study-toy"'):]
    assert sec.index("<figure>") < sec.index('class="cards"') < sec.index("Failed runs (1)")
    assert re.search(r'<details class="runs"><summary>Runs \(4 done, 1 failed\)</summary>\s*'
                     r'<div class="table-wrap"><table class="runs">', sec)
    assert sec.index("Failed runs (1)") < sec.index('<details class="runs">')
    # still self-contained
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<script" not in page.lower() and "default-src 'none'" in page
    # summary.md mirrors the answers first
    md = (run_dir / "report" / "summary.md").read_text()
    assert md.index("## Answers") < md.index("## Claims") < md.index("## Title toy")
    assert f"**{banner}**" in md and 'From <a href="#study-toy">Title toy</a>:' in arch
    for question in QUESTIONS.values():
        assert f"{question}" in md
    assert "toy task toy (validation error, lower is better; n = 2 seeds): bn 0.5%" in md
    assert "(index.html#card-toy-1)" in md and "![Figure A](figures/toy/a.png)" in md
    assert "Not measured in this run." in md
    assert "**not tested at this profile** — BN has the lower error." in md


def test_report_full_grid_keeps_verdicts(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_study(register(make_answer_study("toy", answers=None, rank_question="cost")), run_dir)
    page = build_report(run_dir, strict=True).read_text()
    assert '<p class="banner">full grid, n = 3 seeds</p>' in page
    assert '<span class="profile">full grid, n = 3 seeds</span>' in page
    assert "badge v-supported" in page and "v-not-tested" not in page.split("<style>")[1].split("</style>")[1]
    answers = _answers_part(page)
    arch = answers[answers.index('id="answer-architecture"'):answers.index('id="answer-batch-size"')]
    batch = answers[answers.index('id="answer-batch-size"'):answers.index('id="answer-cost"')]
    cost = answers[answers.index('id="answer-cost"'):answers.index('id="answer-conclusion"')]
    assert "Not measured in this run." in arch and "Not measured in this run." in batch
    assert "toy task toy" in cost
    conclusion = answers[answers.index('id="answer-conclusion"'):]
    assert "badge v-supported" in conclusion  # BN reliably best in the only task, 3 seeds


def test_report_study_min_seeds_rule(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_study(register(make_answer_study("lenient", min_seeds=2)), run_dir, quick=True)
    page = build_report(run_dir, strict=True).read_text()
    sec = page[page.index('id="study-lenient"'):]
    assert "badge v-supported" in sec and "v-not-tested" not in sec  # the study's own rule: 2


def test_report_without_answers(tmp_path: Path, register) -> None:
    run_dir = tmp_path / "run"
    run_study(register(make_study("plain")), run_dir)
    page = build_report(run_dir, strict=True).read_text()
    answers = _answers_part(page)
    assert answers.count("Not measured in this run") == 4  # three questions and the conclusion
    assert "<img " not in answers


def _run(i: int, config: dict[str, Any], final: dict[str, Any]) -> RunResult:
    return RunResult(run_id=f"r{i:04d}", config=config, status="done", final=final)


def test_ranking_hooks_of_the_question_studies() -> None:
    """The hooks of batch-size, rnn and cost turn hand-made runs into rankings of the right data."""
    bs = studies.get_study("batch-size")
    cfg = bs.Config(norms=("bn", "gn"), batch_sizes=(2, 16), seeds=(0, 1, 2), model="cnn")
    err = {("bn", 2): 9.0, ("bn", 16): 1.0, ("gn", 2): 3.0, ("gn", 16): 2.0}
    results = []
    for (n, b), e in err.items():
        for s in range(3):
            results.append(_run(len(results), {"part": "grid", "model": "cnn", "norm": n,
                                               "batch_size": b, "seed": s}, {"val_err": e + 0.1 * s}))
    rs = bs.module.ranking(results, cfg)
    assert [(r.task, r.question) for r in rs] == [
        ("CNN on digits, batch 16", "architecture"), ("CNN on digits, batch 2", "batch-size")]
    assert sorted(rs[0].values["bn"]) == pytest.approx([1.0, 1.1, 1.2])
    assert [x.norm for x in rank(rs[1])] == ["gn", "bn"]  # BN degrades at batch 2
    assert all(r.figure == "batch_size_error.png" and r.bounds == (0.0, 100.0) for r in rs)
    card = conclusion_card(rs)
    assert card is not None and card.verdict == "not supported"  # GN reliably better at batch 2

    rnn = studies.get_study("rnn")
    rcfg = rnn.Config.quick()
    data = rnn.module._datasets(rcfg)[0]
    results = [_run(10 * k + s, {"runner": "rnn-train", "data": data, "arm": arm, "seed": s},
                    {"final_val_acc": acc + 0.01 * s})
               for k, (arm, acc) in enumerate((("ln", 0.9), ("none", 0.5))) for s in range(2)]
    (r,) = [x for x in rnn.module.ranking(results, rcfg) if x.values]
    assert r.question == "architecture" and not r.lower_is_better
    assert sorted(r.values["ln"]) == pytest.approx([90.0, 91.0]) and "bn" not in r.values

    cost = studies.get_study("cost")
    ccfg = cost.Config(models=("cnn",), norms=("none", "bn"), seeds=(0, 1, 2))
    results = [_run(10 * k + s, {"model": "cnn", "norm": n, "seed": s}, {"final_val_acc": a})
               for k, (n, a) in enumerate((("none", 0.8), ("bn", 0.9))) for s in range(3)]
    (r,) = cost.module.ranking(results, ccfg)
    assert r.question == "architecture" and r.values["bn"] == pytest.approx([90.0] * 3)
    cards = cost.module.analyze(results, ccfg)
    assert cards[0].answers == "cost" and cards[0].figure == "cost_pareto.png"


def test_report_names_a_missing_evidence_figure(tmp_path: Path, register) -> None:
    study = make_answer_study("miss")
    analyze = study.module.analyze
    study.module.analyze = lambda results, cfg: [
        dataclasses.replace(c, figure="nope.png") for c in analyze(results, cfg)]
    run_dir = tmp_path / "run"
    run_study(register(study), run_dir)
    page = build_report(run_dir, strict=True).read_text()
    assert "names the figure &#x27;nope.png&#x27;, which plot() did not make" in page
    batch = page[page.index('id="answer-batch-size"'):page.index('id="answer-cost"')]
    assert "BN has the lower error." in batch and "<img " not in batch  # the sentence stays


def test_report_sections_built_by_the_process_pool_equal_the_sequential_ones(tmp_path: Path) -> None:
    """Reports of POOL_MIN_STUDIES studies or more are built in spawned processes: same sections."""
    import normlab.lab.report.html as report_html

    run_study(studies.get_study("smoke"), tmp_path, quick=True)
    figs = tmp_path / "report" / "figures"
    with Store(tmp_path) as store:
        (one,) = report_html._collect_all(store, figs, True, workers=1)
        (pooled,) = report_html._collect_all(store, figs, True, workers=2)
    assert pooled.cards == one.cards and pooled.rankings == one.rankings
    assert [(f.title, f.path) for f in pooled.figures] == [(f.title, f.path) for f in one.figures]
    assert [r.run_id for r in pooled.runs] == [r.run_id for r in one.runs]
    assert pooled.figures[0].path.is_file()
    assert report_html.POOL_MIN_STUDIES >= 2  # one study alone never pays for a process
