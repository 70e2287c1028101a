"""Tests of the ``rnn`` study: the LSTM model registration, the gradient-flow runner and a
smaller-than-quick profile end to end through the sweep (spawned workers, cards, figures)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from normlab.lab.models import build_model, model_names, needs_data_init
from normlab.lab.store import RunResult
from normlab.lab.stats import Interval
from normlab.lab.studies import CARD_VERDICTS, Card, Figure, get_study
from normlab.lab.studies import rnn as study
from normlab.nn.rnn import BatchNormLSTM, LayerNormLSTM, NormLSTM, WeightNormLSTM


@pytest.fixture(autouse=True)
def _single_threads():
    """Tiny tensors: one torch thread and one numba thread (the cpu backend's kernels) are
    much faster than two threads fighting over shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import numba
    except ImportError:  # pragma: no cover
        numba = None
    numba_prev = numba.get_num_threads() if numba is not None else None
    if numba is not None:
        numba.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    if numba is not None:
        numba.set_num_threads(numba_prev)


# -- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm, cls",
    [("none", NormLSTM), ("ln", LayerNormLSTM), ("bn", BatchNormLSTM), ("wn", WeightNormLSTM)],
)
def test_lstm_model_registered_with_the_right_cell(norm, cls):
    assert "lstm" in model_names()
    model = build_model("lstm", norm=norm, input_shape=(8, 8), num_classes=10, hidden=12)
    assert isinstance(model.lstm, cls)
    if norm == "none":
        assert type(model.lstm) is NormLSTM
    assert model.lstm.hidden_size == 12 and model.lstm.batch_first
    out = model(torch.rand(5, 8, 8))
    assert out.shape == (5, 10)
    # The engine's weight-norm convention: wn models ask for the data-dependent init.
    assert needs_data_init(model) == (norm == "wn")


def test_lstm_bn_options():
    model = build_model("lstm", norm="bn", input_shape=(64, 1), num_classes=10, hidden=8)
    assert model.lstm.max_steps == 64  # per-step statistics for every step by default
    assert float(model.lstm.bn_weight_ih_l0[0].detach()) == pytest.approx(0.1)
    shared = build_model(
        "lstm", norm="bn", input_shape=(64, 1), num_classes=10, hidden=8, gamma_init=1.0, stats_steps=1
    )
    assert shared.lstm.max_steps == 1
    assert float(shared.lstm.bn_weight_hh_l0[3].detach()) == pytest.approx(1.0)


def test_lstm_model_rejects_bad_settings():
    with pytest.raises(ValueError, match="recurrent cells"):
        build_model("lstm", norm="gn", input_shape=(8, 8), num_classes=10)
    with pytest.raises(ValueError, match="BN-LSTM only"):
        build_model("lstm", norm="ln", input_shape=(8, 8), num_classes=10, gamma_init=1.0)
    with pytest.raises(ValueError, match="sequences"):
        build_model("lstm", norm="none", input_shape=(1, 8, 8), num_classes=10)


# -- gradient flow -----------------------------------------------------------------------------


def test_grad_norms_match_an_independent_lstmcell_loop():
    torch.manual_seed(0)
    model = build_model("lstm", norm="none", input_shape=(6, 3), num_classes=4, hidden=5)
    x, y = torch.randn(7, 6, 3), torch.randint(0, 4, (7,))
    got = study.grad_norms(model, x, y)

    cell = nn.LSTMCell(3, 5)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(model.lstm, f"{name}_l0"))
    h = c = torch.zeros(7, 5)
    states = []
    for t in range(6):
        h, c = cell(x[:, t], (h, c))
        states.append(h)
    loss = nn.functional.cross_entropy(model.head(h), y)
    expected = [float(g.norm()) for g in torch.autograd.grad(loss, states)]
    assert got == pytest.approx(expected, rel=1e-4)


def test_grad_norms_bn_step_by_step_equals_full_forward_and_keeps_running_stats():
    torch.manual_seed(0)
    model = build_model("lstm", norm="bn", input_shape=(5, 2), num_classes=3, hidden=4)
    model.train()
    before = model.lstm.running_mean_hh_l0.clone()
    x, y = torch.randn(9, 5, 2), torch.randint(0, 3, (9,))
    norms = study.grad_norms(model, x, y)
    assert len(norms) == 5 and all(math.isfinite(v) and v > 0 for v in norms[1:])
    assert torch.equal(model.lstm.running_mean_hh_l0, before)  # restored after the measurement


def test_gradflow_runner_on_a_tiny_case():
    logged = []
    cfg = {
        "runner": "rnn-gradflow", "arm": "bn-g1", "data": "digits-rows", "norm": "bn",
        "gamma_init": 1.0, "hidden": 6, "batch_size": 16, "batches": 2, "train_steps": 3,
        "check_every": 2, "lr": 3e-3, "seed": 0, "data_seed": 0, "val_fraction": 0.2,
    }
    final = study.rnn_gradflow(cfg, lambda epoch, m: logged.append((epoch, m)))
    # checkpoints: init, step 2, step 3 (the last step is always measured)
    assert [m["step"] for _, m in logged] == [0, 2, 3]
    assert [e for e, _ in logged] == [0, 1, 2]
    assert len(final["profile_init"]) == 8 == final["seq_len"]
    for key in ("log10_ratio_init", "log10_ratio_early", "log10_ratio_last"):
        assert math.isfinite(final[key])
    prof = final["profile_init"]
    assert final["log10_ratio_init"] == pytest.approx(logged[0][1]["log10_ratio"])
    # the ratio is the mean of the per-batch log ratios = first minus last of the mean profile
    assert final["log10_ratio_init"] == pytest.approx(prof[0] - prof[-1], abs=1e-9)
    # same seed, same config -> same numbers (deterministic on CPU)
    again = study.rnn_gradflow(cfg, lambda *a: None)
    assert again["log10_ratio_init"] == pytest.approx(final["log10_ratio_init"], rel=1e-6)


# -- analysis helpers ----------------------------------------------------------------------------


def _fake(acc_curve, epochs):
    return RunResult(
        run_id="x", config={"epochs": epochs, "seed": 0}, status="done",
        final={"final_val_acc": acc_curve[-1]},
        epochs=[{"epoch": i + 1, "val_acc": a} for i, a in enumerate(acc_curve)],
    )


def test_epochs_to_target_and_censoring():
    assert study.epochs_to_target(_fake([0.5, 0.91, 0.95], 3), 0.9) == (2.0, True)
    assert study.epochs_to_target(_fake([0.5, 0.6, 0.7], 3), 0.9) == (4.0, False)
    # stopped early (diverged): censored at the configured epochs + 1
    assert study.epochs_to_target(_fake([0.5], 10), 0.9) == (11.0, False)


def test_combine_rule():
    assert study._combine(["supported", "inconclusive"]) == "supported"
    assert study._combine(["supported", "not supported"]) == "inconclusive"
    assert study._combine(["inconclusive"]) == "inconclusive"
    assert study._combine(["not supported", "not supported"]) == "not supported"


def test_config_validation_and_quick_profile():
    st = get_study("rnn")
    assert st.order == 40 and not st.hidden
    quick = st.default_config(quick=True)
    st.validate(quick)
    configs = st.runs(quick)
    runners = {c["runner"] for c in configs}
    assert runners == {"rnn-train", "rnn-gradflow"}
    assert any(c["arm"] == study.SHARED_ARM for c in configs)
    full = st.default_config()
    assert len(full.seeds) >= 3 and "digits-pixels-permuted" in full.data
    with pytest.raises(ValueError, match="no LSTM cell"):
        st.validate(dataclasses.replace(quick, norms=("gn",)))
    # the CLI may give one data name
    one = dataclasses.replace(quick, data="mnist1d")
    assert {c["data"] for c in st.runs(one) if c["runner"] == "rnn-train"} == {"mnist1d"}


# -- end to end -------------------------------------------------------------------------------------


def test_tiny_profile_end_to_end_through_the_sweep(tmp_path, monkeypatch):
    from normlab.lab.sweep import run_sweep

    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")  # inherited by the spawned workers
    st = get_study("rnn")
    cfg = dataclasses.replace(
        st.default_config(quick=True),
        norms=("none", "ln", "bn"), epochs=2, limit=160, val_limit=80, hidden=8,
        grad_refs=(), grad_batches=1, grad_batch_size=16, grad_train_steps=2, grad_check_every=1,
    )
    st.validate(cfg)
    configs = st.runs(cfg)
    # Two spawned workers: they must find the runners and the "lstm" model by importing the study.
    results = run_sweep("rnn", configs, tmp_path / "run", workers=2, progress=False)
    failed = [r.error for r in results if not r.done]
    assert not failed, failed[0]

    cards = st.analyze(results, cfg)
    assert all(isinstance(c, Card) and c.verdict in CARD_VERDICTS for c in cards)
    claims = [c.claim for c in cards]
    assert claims == [
        study.QUESTION, study.CLAIM_LN_BN, study.CLAIM_SHARED, study.CLAIM_GAMMA, study.CLAIM_GAMMA_BALANCE
    ]
    assert cards[0].verdict == "answer" and cards[0].question == study.QUESTION
    for card in cards[1:]:
        assert card.effect is not None and card.effect.n == 2  # computed from the two seeds
    # The gradient verdicts are computed from the intervals, never written in.
    from normlab.lab.stats import verdict

    # The γ card shows a ratio (×); its verdict is on the log10 interval: ratio > 1 ⇔ log > 0.
    r = cards[3].effect
    log_iv = Interval(math.log10(r.mean), math.log10(r.lo) if r.lo > 0 else -math.inf,
                      math.log10(r.hi) if math.isfinite(r.hi) else math.inf, r.n, r.level)
    assert cards[3].verdict == verdict(log_iv, "greater")

    figures = st.plot(results, cfg, tmp_path / "fig")
    assert len(figures) == 3
    for fig in figures:
        assert isinstance(fig, Figure) and fig.path.suffix == ".png"
        assert fig.path.stat().st_size > 1000


def test_analyze_and_plot_without_finished_runs(tmp_path):
    """The report calls analyze/plot with whatever finished (possibly nothing)."""
    st = get_study("rnn")
    cfg = st.default_config(quick=True)
    cards = st.analyze([], cfg)
    assert [c.verdict for c in cards] == ["answer"] + ["inconclusive"] * 4
    assert all(c.effect is None for c in cards)
    figures = st.plot([], cfg, tmp_path)
    assert len(figures) == 3 and all(f.path.exists() for f in figures)
