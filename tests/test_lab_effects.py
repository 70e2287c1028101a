"""Every card with an effect says what the effect is; rate intervals stay inside [0, 100] %.

Each study's ``analyze`` runs on synthetic results: one finished run per config of its quick
profile, whose final metrics are made up from the metric's name (accuracies in (0, 1), error
rates in (0, 100) %, flags, counts, positive amounts), different per arm and seed, so that every
card has two arms with spread to compute an interval from. The values mean nothing: what is
checked is that no card hands the report a bare number (issue 11 §1: "365 [336, 396]", "1 [1, 1]").
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import pytest

from normlab.lab.stats import Interval, format_interval, rate_ci
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, all_studies

#: Studies whose analyze needs inputs no built-in profile has (advise: the user's model and data);
#: their cards are checked by their own tests.
NEEDS_USER_INPUT = {"advise"}

_FLAGS = ("diverged", "failed", "reached", "init_data_dependent", "nonfinite")


def _u(*key: Any) -> float:
    """A deterministic number in [0, 1) from ``key``."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class _Metrics(dict):
    """A final-metrics dict that makes up a plausible value for any metric name it is asked for."""

    def __init__(self, arm: str, seed: int) -> None:
        super().__init__()
        self.arm, self.seed = arm, seed

    def _make(self, name: str) -> Any:
        u = _u(self.arm, self.seed, name)
        a = _u(self.arm, name)  # the arm's level; the seed adds spread around it
        if name == "n_val":
            return 360
        if name in _FLAGS:
            return name == "reached" or (name == "init_data_dependent" and "wn" in self.arm)
        if name.startswith("trace_") or name.endswith(("_by_layer", "_layers")) or name == "layer_shapes":
            return [0.1 + a + 0.1 * u, 0.2 + a + 0.1 * u, 0.3 + a]
        if "acc" in name and "gap" not in name:
            return 0.55 + 0.4 * a + 0.04 * u
        if name.endswith("err"):
            return 2.0 + 30.0 * a + 3.0 * u
        if name.startswith("log10_"):
            return 3.0 * a - 1.0 + 0.2 * u
        if name.startswith(("steps", "iterations", "best_step", "batch_stat_values", "probes")):
            return int(20 + 400 * a + 30 * u)
        if name.endswith("_cos"):
            return 0.2 + 0.6 * a + 0.05 * u
        return 0.05 + 2.0 * a + 0.2 * u

    def __bool__(self) -> bool:  # RunResult.metric reads ``final or {}``: never look empty
        return True

    def get(self, name: str, default: Any = None) -> Any:  # noqa: D401 - dict API
        if name not in self:
            self[name] = self._make(name)
        return super().get(name, default)


def _arm(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in ("seed", "data_seed")}, sort_keys=True)


def synthetic_results(configs: list[dict[str, Any]]) -> list[RunResult]:
    out = []
    for i, c in enumerate(configs):
        seed = int(c.get("seed", c.get("data_seed", 0)))
        m = _Metrics(_arm(c), seed)
        epochs = [{"epoch": e, "val_acc": 0.5 + 0.1 * e + 0.01 * _u(i, e), "loss": 1.0 / (e + 1),
                   "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1)} for e in range(4)]
        out.append(RunResult(run_id=f"r{i}", config=c, status="done", final=m, epochs=epochs))
    return out


def _cards_of(study: Any) -> list[Card]:
    cfg = study.default_config(quick=True)
    return study.analyze(synthetic_results(study.runs(cfg)), cfg)


STUDIES = [s for s in all_studies(include_hidden=True) if s.name not in NEEDS_USER_INPUT]


@pytest.mark.parametrize("study", STUDIES, ids=[s.name for s in STUDIES])
def test_every_effect_has_a_label(study):
    cards = _cards_of(study)
    assert cards, f"{study.name}: analyze returned no card"
    with_effect = [c for c in cards if c.effect is not None]
    unlabeled = [c.claim for c in with_effect if not c.effect_label.strip()]
    assert not unlabeled, f"{study.name}: cards with an effect but no effect_label: {unlabeled}"
    for c in with_effect:
        label = c.effect_label
        # "(×)" for a ratio, a unit in parentheses for a difference: the label ends with its unit
        assert label.rstrip().endswith(")"), f"{study.name}: {label!r} does not end with its unit"
        if "×" in label:
            assert c.effect.lo >= 0 or math.isnan(c.effect.lo), (
                f"{study.name}: ratio {label!r} has a negative bound ({c.effect}): "
                "ratios are computed on the log scale"
            )


def test_the_synthetic_results_give_the_cards_effects():
    """The check above is not vacuous: most studies' cards do get an effect from these runs."""
    n_effects = {s.name: sum(c.effect is not None for c in _cards_of(s)) for s in STUDIES}
    assert sum(v > 0 for v in n_effects.values()) >= len(STUDIES) - 1, n_effects


# -- rate intervals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rates",
    [[18.0, 0.0], [0.0, 36.0], [0.0, 0.0], [100.0, 100.0], [0.0, 100.0], [1.0, 60.0], [50.0, 50.1],
     [99.9, 97.0], [1.0, 1.2, 0.8], [0.0, 0.0, 30.0]],
)
@pytest.mark.parametrize("trials", [None, 50, 360])
def test_rate_interval_stays_in_range(rates, trials):
    """Issue 11: "gn 18 [−61.7, 97.6]%" — an error rate over two seeds must stay in [0, 100]."""
    iv = rate_ci(rates, trials)
    assert 0.0 <= iv.lo <= iv.mean <= iv.hi <= 100.0, iv
    assert iv.mean == pytest.approx(np.mean(rates))
    frac = rate_ci([r / 100 for r in rates], trials, scale=1.0)
    assert 0.0 <= frac.lo <= frac.hi <= 1.0
    assert frac.lo == pytest.approx(iv.lo / 100) and frac.hi == pytest.approx(iv.hi / 100)


def test_the_old_interval_of_the_issue_left_the_range():
    """The plain t-interval of the issue's example does leave [0, 100]: the logit one fixes that."""
    from normlab.lab.stats import mean_ci

    assert mean_ci([0.0, 36.0]).lo < 0
    assert rate_ci([0.0, 36.0]).lo >= 0


def test_rate_interval_matches_the_logit_t_interval():
    """Against the formula computed here in float64: t-interval of logit((p·m + ½)/(m + 1))."""
    from scipy import stats

    rates, m = np.array([12.0, 15.0, 9.0, 20.0]), 200
    p = (rates / 100 * m + 0.5) / (m + 1)
    z = np.log(p / (1 - p))
    half = stats.t.ppf(0.975, len(z) - 1) * z.std(ddof=1) / math.sqrt(len(z))
    lo, hi = 100 / (1 + np.exp(-(z.mean() - half))), 100 / (1 + np.exp(-(z.mean() + half)))
    iv = rate_ci(rates, m)
    assert iv.lo == pytest.approx(lo, rel=1e-12) and iv.hi == pytest.approx(hi, rel=1e-12)
    assert iv.mean == pytest.approx(rates.mean()) and iv.n == 4


def test_rate_interval_narrows_with_more_seeds():
    few = rate_ci([10.0, 14.0])
    many = rate_ci([10.0, 14.0] * 5)
    assert many.hi - many.lo < few.hi - few.lo


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rates": [5.0, 101.0]}, r"rates must lie in \[0, 100\], got 101"),
     ({"rates": [-1.0]}, r"rates must lie in \[0, 100\], got -1"),
     ({"rates": [0.5], "scale": 0.0}, r"scale must be a finite number > 0, got 0"),
     ({"rates": [5.0], "trials": 0}, r"trials must be a positive integer or None, got 0"),
     ({"rates": []}, r"rates is empty")],
)
def test_rate_interval_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rate_ci(**kwargs)


def test_rate_interval_nan_and_single_value():
    assert math.isnan(rate_ci([5.0, math.nan]).lo)
    one = rate_ci([5.0])
    assert one.n == 1 and one.lo == 0.0 and one.hi == 100.0
    assert "no interval" in format_interval(one)


def test_rate_intervals_in_card_texts_stay_in_range():
    """No card prints an interval of a rate ("… [lo, hi]%" or "[lo%, hi%]") that leaves [0, 100]."""
    import re

    num = r"(−?-?[0-9.]+(?:e[+−-]?[0-9]+)?|−?∞|nan)"
    forms = [re.compile(rf"\[{num}, {num}\] ?%"), re.compile(rf"\[{num} ?%, {num} ?%\]")]

    def value(t: str) -> float:
        t = t.replace("−", "-")
        return {"∞": math.inf, "-∞": -math.inf}.get(t, float(t))

    seen = 0
    for study in STUDIES:
        for card in _cards_of(study):
            for form in forms:
                for m in form.finditer(card.measurement):
                    lo, hi = value(m.group(1)), value(m.group(2))
                    seen += 1
                    assert 0.0 <= lo <= hi <= 100.0, (study.name, card.claim, m.group(0))
    assert seen >= 10  # the pattern does find the cards' rate intervals


def test_scale_interval():
    from normlab.lab.stats import scale_interval

    iv = scale_interval(Interval(0.01, -0.02, 0.04, 3), 100)
    assert (iv.mean, iv.lo, iv.hi, iv.n) == pytest.approx((1.0, -2.0, 4.0, 3))
    with pytest.raises(ValueError, match="by must be a finite number > 0, got -1"):
        scale_interval(iv, -1)
