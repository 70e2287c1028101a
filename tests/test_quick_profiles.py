"""The quick profiles (``normlab demo``) point the same way as the full grids (issue 11 §1).

A newcomer reads the demo, not the full grid: a quick profile whose effect has the opposite sign
of the full grid's (the demo once said "BatchNorm smooths the loss landscape: not supported,
2.12×" where the full grid measured 0.54×) teaches the wrong thing. This test runs the quick
profiles of the studies whose quick design was chosen for that (on their fixed seeds, in one
run directory, as the demo does) and checks every card in :data:`FULL_GRID` against the
direction the full grid found.

:data:`FULL_GRID` is transcribed from README.md, "What the full grids found (this machine class,
2 cores; 2026-12-01)"; each row quotes the number it rests on. A row says either the sign of the
effect (``">1"``/``"<1"`` for a ratio, ``">0"``/``"<0"`` for a difference) or a verdict the
quick profile must not reach (the opposite of the full grid's). Full-grid verdicts that are
*inconclusive* with no stated direction (e.g. BN degrading on the digits CNN) have no row.
"""

from __future__ import annotations

import os

import pytest

from normlab.lab.studies import get_study
from normlab.lab.sweep import run_sweep

#: (study, claim prefix, model tag in the claim or "", check, the full grid's number from README).
#: check: ">1" / "<1" (ratio), ">0" / "<0" (difference): the sign of the quick effect's point
#: estimate; "not:VERDICT": the quick verdict must not be VERDICT.
FULL_GRID: list[tuple[str, str, str, str, str]] = [
    ("input-scaling", "Input normalization makes the loss better conditioned", "", ">1",
     "κ_raw / κ_std 370× [350, 391] (supported)"),
    ("input-scaling", "Input normalization speeds up gradient descent", "", ">1",
     "836× [536, 1300] more iterations on raw features (supported)"),
    ("input-scaling", "Input normalization speeds up the training of a neural network", "", ">1",
     "93% accuracy 3.9× [2.2, 6.7] sooner on standardized inputs (supported)"),
    ("batch-size", "BatchNorm degrades at small batch sizes", "[MLP", ">0",
     "MLP: BN 2.6% at batch 32 → 29.7% at batch 2 (supported)"),
    ("batch-size", "BatchNorm degrades at small batch sizes", "[MLP", "not:not supported",
     "MLP: supported"),
    ("batch-size", "GroupNorm can replace BatchNorm", "[MLP", ">0",
     "MLP: GN/LN stay flat while BN degrades (supported)"),
    ("landscape", "BatchNorm smooths the loss landscape", "[cnn]", "<1",
     "loss range BN/none 0.142× [0.078, 0.259] on the CNN"),
    ("landscape", "BatchNorm reduces internal covariate shift", "[cnn]", "<1",
     "ICS by the gradient definition lower with BN: 0.264× on the CNN"),
    ("learning-rate", "BatchNorm allows higher learning rates", "", ">0",
     "BN trains at 5× the rate at which the plain net fails (supported)"),
    ("learning-rate", "BatchNorm speeds up convergence", "", ">1",
     "90% in 80 vs 1880 steps (supported)"),
    ("learning-rate", "BatchNorm stabilizes the distribution", "", ">0",
     "pre-activation percentiles drift 0.60 with BN vs 2.28 without (supported)"),
    ("rnn", "LN works better than BN in RNNs", "", "not:supported",
     "BN-LSTM 98.1% ≈ LN-LSTM 97.7%: \"LN beats BN in RNNs\" is not supported"),
    ("rnn", "Small γ init preserves gradient flow", "", "<1",
     "not in the paper's direction: with γ = 1 the gradients grow going back in time"),
    ("rnn", "Small γ init keeps the BN-LSTM's gradient norm closer", "", ">0",
     "γ = 0.1 keeps the gradient ratio closer to balanced than γ = 1 (supported)"),
    ("weight-norm", "Weight norm + mean-only BatchNorm is at least as accurate", "", "<0",
     "WN + mean-only BN 1.89% vs BN 1.11% error (BN better)"),
    ("weight-norm", "Weight norm's data-dependent initialization", "", "not:not supported",
     "|mean|, |std − 1| ≤ 1.2e-5 (supported)"),
    ("cost", "Folding BatchNorm into the preceding convolution", "", ">1",
     "inference 1.27× [1.18, 1.36] faster (supported)"),
    ("regularization", "BatchNorm regularizes a little", "[mlp]", "<0",
     "train–validation gap about 1.1 points smaller with BN (supported, both models)"),
    ("regularization", "BatchNorm regularizes a little", "[mlp]", "not:not supported",
     "supported"),
    ("small-batch", "BatchNorm degrades below a batch size", "[digits MLP", ">0",
     "BN's error at batch 2 − at batch 32: 24.4 points [19.7, 29.2] (supported)"),
    ("small-batch", "The linear learning-rate scaling rule", "", "<0",
     "BN at batch 2, lr ∝ batch − lr fixed: −61.1 points [−65.9, −56.2] (not supported)"),
    ("transformer", "A transformer needs normalization", "", "not:supported",
     "none − LN: −0.12 bits/char [−0.20, −0.04] (not supported at 2 layers, 300 steps)"),
    ("transformer", "Pre-LN trains without learning-rate warm-up", "", "not:supported",
     "Post-LN's no-warm-up penalty −0.03 bits/char [−0.07, 0.01] (not supported)"),
    ("mechanisms", "Normalization keeps weights from exploding", "", ">1",
     "‖W‖ growth none / BN at lr 0.5: 4.2× [1.78, 9.89] (supported)"),
    ("mechanisms", "LN stabilizes the hidden states", "", ">1",
     "CV of ‖h_t‖ over time, plain / LN: 4.91× [3.99, 6.03] (supported)"),
]

#: The studies this test runs (their quick profiles were designed against FULL_GRID). The
#: others' rows above are checked when NORMLAB_QUICK_ALL=1 (about as long as `normlab demo`).
CHECKED = ("batch-size", "landscape", "learning-rate", "regularization")


def _studies() -> list[str]:
    names = sorted({row[0] for row in FULL_GRID})
    return names if os.environ.get("NORMLAB_QUICK_ALL") == "1" else [n for n in names if n in CHECKED]


@pytest.fixture(scope="module")
def quick_cards(tmp_path_factory):
    """{study: cards} from the quick profiles, run as `normlab demo` runs them (2 workers)."""
    run_dir = tmp_path_factory.mktemp("quick") / "run"
    out = {}
    for name in _studies():
        study = get_study(name)
        cfg = study.default_config(quick=True)
        results = run_sweep(name, study.runs(cfg), run_dir, workers=2, progress=False)
        failed = [r.error for r in results if not r.done]
        assert not failed, f"{name}: {failed[0]}"
        out[name] = study.analyze(results, cfg)
    return out


def _card(cards, prefix: str, tag: str):
    found = [c for c in cards if c.claim.startswith(prefix) and tag in c.claim]
    assert len(found) == 1, f"expected one card {prefix!r} {tag!r}, got {[c.claim for c in cards]}"
    return found[0]


ROWS = [row for row in FULL_GRID if row[0] in CHECKED or os.environ.get("NORMLAB_QUICK_ALL") == "1"]


@pytest.mark.slow
@pytest.mark.parametrize(("study", "prefix", "tag", "check", "full"), ROWS,
                         ids=[f"{r[0]}:{r[1][:28]}{r[2]}:{r[3]}" for r in ROWS])
def test_quick_profile_agrees_with_the_full_grid(quick_cards, study, prefix, tag, check, full):
    card = _card(quick_cards[study], prefix, tag)
    where = f"{study} quick profile, {card.claim!r}: {card.verdict}, {card.effect_label} {card.effect}; " \
            f"full grid: {full}"
    if check.startswith("not:"):
        assert card.verdict != check[4:], where
        return
    assert card.effect is not None, where
    m = card.effect.mean
    assert {">1": m > 1, "<1": m < 1, ">0": m > 0, "<0": m < 0}[check], where


def test_the_table_names_existing_cards():
    """Every row of the table points at a claim its study still makes (cheap: no runs)."""
    for study, prefix, _tag, check, _full in FULL_GRID:
        assert check in (">1", "<1", ">0", "<0") or check.startswith("not:")
        mod = get_study(study).module
        claims = [v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str)]
        assert any(c.startswith(prefix) for c in claims), (study, prefix)
