"""The cost study (and its measured-train runner), fold_batch_norm, and the regularization study."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import normlab.nn as lnn
from normlab.lab.models import build_model
from normlab.lab.studies import CARD_VERDICTS, Card, Figure, get_study
from normlab.lab.sweep import run_sweep
from normlab.nn.utils.fold import fold_batch_norm, foldable_pairs

PNG = b"\x89PNG\r\n\x1a\n"
BN_TYPES = (lnn.BatchNorm1d, lnn.BatchNorm2d, lnn.MeanOnlyBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def check_cards_and_figures(study, results, cfg, tmp_path, n_cards):
    cards = study.analyze(results, cfg)
    assert len(cards) == n_cards
    for c in cards:
        assert isinstance(c, Card) and c.verdict in CARD_VERDICTS
        assert c.measurement and c.study == study.name
    figs = study.plot(results, cfg, tmp_path / "figs")
    assert figs
    for f in figs:
        assert isinstance(f, Figure) and f.path.read_bytes()[:8] == PNG
    return cards


# --------------------------------------------------------------------------------------------
# fold_batch_norm
# --------------------------------------------------------------------------------------------
def _trained_stats(model: nn.Module, shape, seed=0) -> nn.Module:
    """Give every norm layer non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *shape, generator=g) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 2.0, generator=g)
                m.bias.uniform_(-1.0, 1.0, generator=g)
    return model.eval()


@pytest.mark.parametrize(
    "name,norm,options,shape,pairs",
    [
        ("cnn", "bn", {}, (1, 8, 8), 3),
        ("cnn", "mobn", {}, (1, 8, 8), 3),
        ("cnn", "wn+mobn", {}, (1, 8, 8), 3),
        ("cnn", "bn", {}, (8, 8), 3),  # sequences: conv1d
        ("resnet", "bn", {"depth": 8}, (1, 8, 8), 9),  # incl. the 1×1 shortcut conv + BN
        ("mlp", "bn", {}, (1, 8, 8), 2),  # Linear + BatchNorm1d
        ("mlp", "wn+bn", {}, (1, 8, 8), 2),
    ],
)
def test_fold_batch_norm_gives_identical_outputs(name, norm, options, shape, pairs):
    torch.manual_seed(0)
    model = _trained_stats(build_model(name, norm=norm, input_shape=shape, num_classes=10, **options), shape)
    assert len(foldable_pairs(model)) == pairs
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, BN_TYPES) for m in folded.modules())
    assert any(isinstance(m, BN_TYPES) for m in model.modules())  # the original is untouched
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    with torch.no_grad():
        diff = (model(x) - folded(x)).abs().max().item()
    assert diff <= 1e-5


def test_fold_batch_norm_torch_layers_inplace_and_leaves_unfoldable_ones():
    torch.manual_seed(0)

    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4, track_running_stats=False)  # batch stats even in eval
            self.conv3 = nn.Conv2d(4, 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4)

        def forward(self, x):
            a = self.conv(x)
            y = self.bn(a) + a  # the conv output is also used by the skip: not foldable
            y = self.bn2(self.conv2(y))
            return self.bn3(self.conv3(y))  # foldable, conv without bias

    model = _trained_stats(TwoUses(), (1, 6, 6))
    assert foldable_pairs(model) == [("conv3", "bn3")]
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        ref = model(x)
    folded = fold_batch_norm(model, inplace=True)
    assert folded is model and isinstance(model.bn3, nn.Identity)
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)
    with torch.no_grad():
        assert (folded(x) - ref).abs().max().item() <= 1e-5


def test_fold_batch_norm_untraceable_model_falls_back_to_sequential_pairs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.body(x)
            return self.body(-x)

    model = _trained_stats(Branchy(), (1, 5, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = fold_batch_norm(model)
    assert any("could not trace" in str(w.message) for w in caught)
    x = torch.randn(4, 1, 5, 5).abs()
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= 1e-5
    assert isinstance(folded.body[1], nn.Identity)


def test_fold_batch_norm_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        fold_batch_norm("not a model")


# --------------------------------------------------------------------------------------------
# the cost study end to end
# --------------------------------------------------------------------------------------------
def test_cost_study_end_to_end(tmp_path):
    study = get_study("cost")
    cfg = dataclasses.replace(
        study.default_config(quick=True),
        norms=("none", "bn", "wn+mobn"),
        seeds=(0, 1),
        epochs=1,
        max_steps=8,
        limit=256,
        timing_repeats=3,
    )
    study.validate(cfg)
    configs = study.runs(cfg)
    assert len(configs) == 2 * 3 * 2
    # (normlab's numba backend resets torch's thread count the first time it runs in a process;
    # the runner must keep the count it started with.)
    torch.set_num_threads(1)
    results = run_sweep(study.name, configs, tmp_path, workers=1, progress=False)
    assert all(r.done for r in results), [r.error for r in results if not r.done]
    for r in results:
        f = r.final
        assert f["train_step_s"] > 0 and f["infer_step_s"] > 0 and f["saved_bytes"] > 0
        assert f["train_ratio_none"] > 0 and f["threads"] == 1
        if r.config["norm"] == "none":
            assert f["train_ratio_none"] == 1.0
        if r.config["norm"] in ("bn", "wn+mobn"):
            assert f["fold_pairs"] > 0
            assert f["fold_max_abs_diff"] <= 1e-5  # folded BN: identical outputs
            assert f["fold_speedup"] > 0
        if r.config["norm"] == "wn+mobn":
            assert f["init_max_deviation"] < 0.05
    cards = check_cards_and_figures(study, results, cfg, tmp_path, 2)
    assert cards[0].verdict == "answer" and cards[0].question
    assert "Pareto set" in cards[0].measurement
    # Parameters added are exact: BN adds γ and β per channel and drops the conv biases.
    none = next(r for r in results if r.config["model"] == "cnn" and r.config["norm"] == "none")
    bn = next(r for r in results if r.config["model"] == "cnn" and r.config["norm"] == "bn")
    assert bn.final["n_params"] - none.final["n_params"] == (16 + 32 + 32)  # +2C − C per layer


def test_cost_validate_rejects_bad_settings():
    study = get_study("cost")
    cfg = study.default_config(quick=True)
    with pytest.raises(ValueError):
        study.validate(dataclasses.replace(cfg, norms=("bn",)))
    with pytest.raises(ValueError):
        study.validate(dataclasses.replace(cfg, norms=("none", "nope")))


# --------------------------------------------------------------------------------------------
# the regularization study end to end (it uses the same runner)
# --------------------------------------------------------------------------------------------
def test_regularization_study_end_to_end(tmp_path):
    study = get_study("regularization")
    cfg = dataclasses.replace(study.default_config(quick=True), epochs=2, limit=160, seeds=(0, 1),
                              models=("mlp", "cnn"))
    study.validate(cfg)
    results = run_sweep(study.name, study.runs(cfg), tmp_path, workers=1, progress=False)
    assert all(r.done for r in results), [r.error for r in results if not r.done]
    for r in results:
        f = r.final
        assert f["gap_acc"] == pytest.approx(f["train_eval_acc"] - f["final_val_acc"])
        assert "train_step_s" not in f  # timings off for this study
    cards = check_cards_and_figures(study, results, cfg, tmp_path, 2)
    assert all(c.effect is not None for c in cards)
