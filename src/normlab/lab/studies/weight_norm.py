"""Weight normalization study: does WN + mean-only BN match BatchNorm, and at what cost?

The article cites Salimans & Kingma (2016): weight normalization (``w = g·v/‖v‖``) combined with
mean-only batch normalization (subtract the batch mean, no division by the std) gave their best
CIFAR-10 result. Their test errors: no normalization 8.43%, BN 8.05%, WN 8.46%, WN + mean-only BN
7.31%. This study trains the lab's CNN on digits (or the user's data, ``--data``) with the same
five choices — ``none``, ``bn``, ``wn``, ``mobn``, ``wn+mobn`` — and checks three things:

1. **Accuracy**: is WN + mean-only BN at least as accurate as BN? Non-inferiority: the 95% CI
   (Welch) of ``acc(wn+mobn) − acc(bn)`` must lie above ``−margin`` (default half a point:
   smaller than the 0.74-point edge over BN that the paper reports, so that "as accurate" cannot
   hide a loss of the size of the effect in question).
2. **Data-dependent initialization**: weight norm's init (Salimans & Kingma §3, the lab's
   ``init_weight_norm_``) sets ``g`` and the bias so that each unit's pre-activation has zero
   mean and unit variance on the init batch. Measured on that batch right after the init (and,
   for contrast, for the other norms with their default init): the output of every conv/linear
   layer after the norm layer it feeds (mean-only BN for ``wn+mobn``), logits included, per unit:
   ``|mean| < 0.05`` and ``std ∈ [0.95, 1.05]``.
3. **Cost**: is a WN training step cheaper than a BN one? Each run times its model in turns with
   the same CNN with BN (median of repeated steps, same process), so the ratio is immune to the
   machine's load drifting.

Setup: Adam (Salimans & Kingma trained their CIFAR-10 models with Adam) at lr 0.003, batch 32 —
a setting in which every arm trains in a pilot (with SGD at the lab's usual lr 0.1, plain WN
diverged). The runner is the lab's ``measured-train`` (:mod:`normlab.lab.measured`), as for
the cost study: the CNN runs of both studies coincide when their settings do, and are then
computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import plotting
from normlab.lab.analysis import log_ratio_ci, n_val, pct, select, values
from normlab.lab.measured import measured_config, study_settings
from normlab.lab.norms import get_norm
from normlab.lab.stats import (
    combine_verdicts,
    diff_ci,
    format_interval,
    mean_ci,
    rate_ci,
    scale_interval,
    shift_interval,
    verdict,
)
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure
from normlab.lab.train import TrainConfig

NAME = "weight-norm"
TITLE = "Weight normalization and mean-only BatchNorm (Salimans & Kingma 2016)"
SUMMARY = (
    "CNN with none / BN / WN / mean-only BN / WN + mean-only BN: accuracy vs BN, the "
    "data-dependent init, and time per training step vs BN."
)
ORDER = 50

NORMS: tuple[str, ...] = ("none", "bn", "wn", "mobn", "wn+mobn")
#: Salimans & Kingma (2016), CIFAR-10 test error (%), their table 1.
REFERENCE_ERRORS: dict[str, float] = {"none": 8.43, "bn": 8.05, "wn": 8.46, "wn+mobn": 7.31}
REFERENCE_LABELS: dict[str, str] = {
    "none": "normal param.",
    "bn": "batch norm",
    "wn": "weight norm",
    "wn+mobn": "WN + mean-only BN",
}

ACC_CLAIM = "Weight norm + mean-only BatchNorm is at least as accurate as BatchNorm."
INIT_CLAIM = (
    "Weight norm's data-dependent initialization gives zero-mean, unit-variance pre-activations."
)
TIME_CLAIM = "Weight normalization is cheaper per training step than BatchNorm."


@dataclass
class Config:
    """Full grid of the weight-norm study (``quick()`` is the small profile)."""

    norms: tuple[str, ...] = NORMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 10
    data: str = "digits"
    model: str = "cnn"
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.003
    max_steps: int | None = None
    limit: int | None = None
    timing_repeats: int = 30
    margin: float = 0.005  # non-inferiority margin on accuracy (fraction: 0.005 = half a point)
    init_tolerance: float = 0.05  # |mean| and |std − 1| bounds of the init check

    @classmethod
    def quick(cls) -> Config:
        # Same CNN settings as the cost study's quick profile: shared runs are computed once.
        return cls(seeds=(0, 1), epochs=3, max_steps=60, limit=640, timing_repeats=12)


def validate(cfg: Config) -> None:
    for n in cfg.norms:
        get_norm(n)
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if not 0 <= cfg.margin < 1 or not 0 < cfg.init_tolerance < 1:
        raise ValueError("margin must be in [0, 1) and init_tolerance in (0, 1)")


def runs(cfg: Config) -> list[dict[str, Any]]:
    return [
        measured_config(
            model=cfg.model,
            norm=norm,
            seed=seed,
            **study_settings(cfg),
            measure={"timing_repeats": cfg.timing_repeats},
        )
        for norm in cfg.norms
        for seed in cfg.seeds
    ]


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------
def _where(cfg: Config) -> dict[str, Any]:
    return {"model": cfg.model, "data": cfg.data}


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """Accuracy vs BN (non-inferiority), the data-dependent init, time per step vs BN."""
    return [_card_accuracy(results, cfg), _card_init(results, cfg), _card_time(results, cfg)]


def _card_accuracy(results: list[RunResult], cfg: Config) -> Card:
    where = _where(cfg)
    errors = {n: [1 - a for a in values(results, "final_val_acc", norm=n, **where)] for n in cfg.norms}
    nv = n_val(results, **where)
    err_text = "; ".join(f"{n} {pct(rate_ci(e, nv, scale=1))}" for n, e in errors.items() if e)
    ref_text = ", ".join(f"{REFERENCE_LABELS[n]} {REFERENCE_ERRORS[n]:.2f}%" for n in REFERENCE_ERRORS)
    a = values(results, "final_val_acc", norm="wn+mobn", **where)
    b = values(results, "final_val_acc", norm="bn", **where)
    details = (
        f"Non-inferiority test: supported when the 95% CI (Welch) of acc(wn+mobn) − acc(bn) lies "
        f"above −{100 * cfg.margin:g} points, not supported when it lies entirely below. "
        f"Reference (Salimans & Kingma 2016, CIFAR-10 test error): {ref_text}. Their gap "
        "(WN + mean-only BN 0.74 points better than BN) was on a much larger task; digits is "
        "easy enough that all normalized arms may land within a point of each other."
    )
    if not a or not b:
        return Card(NAME, ACC_CLAIM, f"needs finished 'bn' and 'wn+mobn' runs; validation error: "
                    f"{err_text or 'no runs'}", "inconclusive", details=details)
    effect = diff_ci(a, b)
    v = verdict(shift_interval(effect, cfg.margin), "greater")
    measurement = (
        f"validation error after {cfg.epochs} epochs on {cfg.data} ({cfg.model}): {err_text}. "
        f"Accuracy difference wn+mobn − bn: {effect.mean * 100:+.2f} points, 95% CI "
        f"[{effect.lo * 100:+.2f}, {effect.hi * 100:+.2f}] ({effect.n} seeds per arm; margin "
        f"{100 * cfg.margin:g} points)"
    )
    return Card(NAME, ACC_CLAIM, measurement, v, effect=scale_interval(effect, 100), details=details,
                effect_label="validation accuracy, WN + mean-only BN − BN (points)")


def cfg_init_samples() -> int:
    """Size of the batch used by weight norm's data-dependent init (TrainConfig's default)."""
    return TrainConfig().init_samples


def _card_init(results: list[RunResult], cfg: Config) -> Card:
    where = _where(cfg)
    tol = cfg.init_tolerance
    wn_runs = [r for r in select(results, **where) if r.metric("init_data_dependent")]
    devs = [float(r.metric("init_max_deviation")) for r in wn_runs if r.metric("init_max_deviation") is not None]
    details = (
        f"Measured on the init batch (the {cfg_init_samples()} training samples the init used), in "
        "train mode, right after the init: the output of every conv/linear layer after the norm "
        "layer it feeds (logits included), per unit (channel), pooled over samples and positions. "
        f"Pass: |mean| < {tol:g} and std in [{1 - tol:g}, {1 + tol:g}] for every unit; "
        "verdict: supported when every weight-normalized run passes and the 95% CI of the largest "
        f"deviation lies below {tol:g}."
    )
    contrast = []
    for n in cfg.norms:
        d = values(results, "init_max_deviation", norm=n, **where)
        if d and not any(r.metric("init_data_dependent") for r in select(results, norm=n, **where)):
            contrast.append(f"{n} {format_interval(mean_ci(d))}")
    if not devs:
        return Card(NAME, INIT_CLAIM, "needs finished weight-norm runs (wn, wn+mobn)", "inconclusive",
                    details=details)
    per_norm = []
    for n in cfg.norms:
        d = [float(r.metric("init_max_deviation")) for r in wn_runs if r.config.get("norm") == n]
        if d:
            m = [float(r.metric("init_max_abs_mean")) for r in wn_runs if r.config.get("norm") == n]
            lo = [float(r.metric("init_min_std")) for r in wn_runs if r.config.get("norm") == n]
            hi = [float(r.metric("init_max_std")) for r in wn_runs if r.config.get("norm") == n]
            per_norm.append(
                f"{n}: max |mean| {max(m):.2g}, std in [{min(lo):.4f}, {max(hi):.4f}] ({len(d)} runs)"
            )
    effect = mean_ci(devs)
    passed = sum(d <= tol for d in devs)
    v_all = "supported" if passed == len(devs) else "not supported"
    v_ci = verdict(shift_interval(effect, -tol), "less")
    measurement = (
        f"largest deviation from (mean 0, std 1) over all units: {format_interval(effect)} "
        f"(max {max(devs):.2g}); {passed}/{len(devs)} runs within {tol:g}. "
        + "; ".join(per_norm)
        + (f". Default init, for contrast: {'; '.join(contrast)}" if contrast else "")
    )
    return Card(NAME, INIT_CLAIM, measurement, combine_verdicts([v_all, v_ci]), effect=effect, details=details,
                effect_label="largest |mean| or |std − 1| of a unit after the data-dependent init (output units)")


def _card_time(results: list[RunResult], cfg: Config) -> Card:
    where = _where(cfg)
    ratios = values(results, "train_ratio_bn", norm="wn", **where)
    lines = []
    for n in cfg.norms:
        r = values(results, "train_ratio_bn", norm=n, **where)
        ms = values(results, "train_step_s", norm=n, **where)
        if r and n != "bn":
            lines.append(f"{n} {format_interval(log_ratio_ci(r)[1])}× BN ({1e3 * float(np.mean(ms)):.2f} ms)")
        elif ms:
            lines.append(f"bn {1e3 * float(np.mean(ms)):.2f} ms")
    details = (
        "Each run times its own model and the same architecture with BatchNorm in turns, in the "
        "same process (median of repeated forward+backward+Adam steps on one batch); the ratio is "
        "averaged over seeds on the log scale (geometric mean, 95% CI). Verdict: supported when "
        "the CI of the WN/BN ratio lies below 1. On a CPU with tiny feature maps, weight norm "
        "recomputes g·v/‖v‖ for every weight at every step, while BN's cost grows with the "
        "activations: which is cheaper depends on the ratio of weights to activations."
    )
    if not ratios:
        return Card(NAME, TIME_CLAIM, "needs finished 'wn' runs with timings", "inconclusive", details=details)
    log_ci, ratio = log_ratio_ci(ratios)
    return Card(
        NAME,
        TIME_CLAIM,
        f"time per training step of WN relative to BN: {format_interval(ratio)}× "
        f"({len(ratios)} runs). All: " + "; ".join(lines),
        verdict(log_ci, "less"),
        effect=ratio,
        effect_label="time per training step, WN / BN (×)",
        details=details,
    )


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """Error per norm (with the paper's), time vs BN, the init check, accuracy curves."""
    outdir.mkdir(parents=True, exist_ok=True)
    norms = [n for n in cfg.norms if values(results, "final_val_acc", norm=n, **_where(cfg))]
    return [
        _fig_error(results, cfg, norms, outdir),
        _fig_time(results, cfg, norms, outdir),
        _fig_init(results, cfg, norms, outdir),
        _fig_curves(results, cfg, norms, outdir),
    ]


def _fig_error(results: list[RunResult], cfg: Config, norms: list[str], outdir: Path) -> Figure:
    """Error per norm, next to Salimans & Kingma's CIFAR-10 errors."""
    where = _where(cfg)
    fig, (ax1, ax2) = plotting.plt().subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for i, n in enumerate(norms):
        e = [100 * (1 - a) for a in values(results, "final_val_acc", norm=n, **where)]
        iv = mean_ci(e)
        ax1.bar(i, iv.mean, color=plotting.color(n) or f"C{i}")
        ax1.errorbar(i, iv.mean, yerr=plotting.ci_yerr(iv), color="k", capsize=3)
        ax1.scatter([i] * len(e), e, color="k", s=8, zorder=3)
    ax1.set_xticks(range(len(norms)), norms)
    ax1.set_ylabel("validation error (%)")
    ax1.set_title(f"this lab: {cfg.model} on {cfg.data}")
    refs = [n for n in REFERENCE_ERRORS if n in cfg.norms]
    ax2.bar(range(len(refs)), [REFERENCE_ERRORS[n] for n in refs],
            color=[plotting.color(n) or f"C{cfg.norms.index(n)}" for n in refs])
    ax2.set_xticks(range(len(refs)), refs)
    ax2.set_ylim(6.5, 9)
    ax2.set_ylabel("test error (%)")
    ax2.set_title("Salimans & Kingma 2016, CIFAR-10")
    return plotting.finish(fig, outdir / "wn_error.png", "Error by normalization, and the paper's CIFAR-10 errors",
                  "Left: validation error (mean, 95% CI, dots = seeds). Right: the "
                  "reference errors reported by Salimans & Kingma (2016) on CIFAR-10.")


def _fig_time(results: list[RunResult], cfg: Config, norms: list[str], outdir: Path) -> Figure:
    """Time per step relative to BN."""
    where = _where(cfg)
    fig, ax = plotting.plt().subplots(figsize=(5, 3.2), dpi=100)
    for i, n in enumerate(norms):
        for j, (metric, label) in enumerate((("train_ratio_bn", "training step"), ("infer_ratio_bn", "inference"))):
            r = values(results, metric, norm=n, **where)
            if not r:
                continue
            _, iv = log_ratio_ci(r)
            ax.bar(i + (j - 0.5) * 0.4, iv.mean, 0.4, color=f"C{j}", label=label if i == 0 else None)
            ax.errorbar(i + (j - 0.5) * 0.4, iv.mean, yerr=plotting.ci_yerr(iv), color="k", capsize=2)
    ax.axhline(1.0, color="0.3", ls="--", lw=0.8)
    ax.set_xticks(range(len(norms)), norms)
    ax.set_ylabel("time (× BatchNorm)")
    ax.legend(fontsize=8)
    return plotting.finish(fig, outdir / "wn_time.png", "Time per step relative to BatchNorm",
                  "Median time per training step (forward, backward, Adam) and per "
                  "inference step, relative to the same CNN with BatchNorm timed in turns "
                  "in the same process (geometric mean over seeds, 95% CI).")


def _fig_init(results: list[RunResult], cfg: Config, norms: list[str], outdir: Path) -> Figure:
    """Per-unit mean and std of the pre-activations on the init batch."""
    where = _where(cfg)
    plt = plotting.plt()
    fig, axes = plotting.panels(1, len(norms) or 1, (2.4, 2.8))
    tol = cfg.init_tolerance
    for ax, n in zip(axes[0], norms):
        runs_n = [r for r in select(results, norm=n, **where) if r.metric("init_unit_means")]
        for r in runs_n:
            ax.scatter(r.metric("init_unit_means"), r.metric("init_unit_stds"), s=5, alpha=0.6)
        ax.add_patch(plt.Rectangle((-tol, 1 - tol), 2 * tol, 2 * tol, fill=False, color="r", lw=1))
        ax.set_title(n + (" (data init)" if runs_n and runs_n[0].metric("init_data_dependent") else ""),
                     fontsize=9)
        ax.set_xlabel("unit mean", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("unit std", fontsize=8)
    return plotting.finish(fig, outdir / "wn_init.png", "Pre-activations at initialization",
                  "Each dot is one unit (channel) of a conv/linear output after its norm "
                  "layer, measured on the init batch before training (all seeds). Red box: |mean| < "
                  f"{tol:g}, std within [{1 - tol:g}, {1 + tol:g}]. Weight norm's "
                  "data-dependent init puts every unit in the box (logits "
                  "included); BN standardizes its layers by construction but not the "
                  "head's logits; the default init standardizes nothing.")


def _fig_curves(results: list[RunResult], cfg: Config, norms: list[str], outdir: Path) -> Figure:
    """Validation accuracy per epoch."""
    where = _where(cfg)
    fig, ax = plotting.plt().subplots(figsize=(5, 3.2), dpi=100)
    for i, n in enumerate(norms):
        curve = plotting.mean_curve(select(results, norm=n, **where), "val_acc")
        if curve is not None:
            ax.plot(curve[0], 100 * curve[1], marker="o", ms=3, color=plotting.color(n) or f"C{i}", label=n)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    return plotting.finish(fig, outdir / "wn_curves.png", "Validation accuracy during training",
                  "Mean over seeds, evaluated after each epoch (eval mode).")
