"""Does BatchNorm regularize (a little)? The train–validation gap with and without BN.

The article's fifth benefit of normalization: "it helps the model regularize (only a little, not
significantly)". A regularizer narrows the gap between how well a model fits its training data
and how well it does on data it has not seen. This study trains the lab's MLP and CNN on digits
with and without BatchNorm (SGD with momentum 0.9, the pilots' learning rates: 0.05 for the MLP,
0.1 for the CNN, batch 32) long enough to fit the training set, then evaluates both the training
and the validation set **in eval mode** (BN with its running statistics, the same function on
both sets) and compares the gaps:

* accuracy gap = train accuracy − validation accuracy;
* loss gap = validation loss − train loss.

Claim: the gap is smaller with BN (Welch 95% CI of ``gap(BN) − gap(none)`` below 0), for both
the accuracy and the loss gap. A smaller gap can come from a better validation score or from a
worse fit of the training set: the card shows both sides.

Runs use the lab's ``measured-train`` runner (:mod:`normlab.lab.measured`; training-set evaluation
on, timings off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.lab import plotting
from normlab.lab.analysis import pct, select, values
from normlab.lab.measured import MEASURED_RUNNER, measured_config, study_settings
from normlab.lab.norms import get_norm
from normlab.lab.stats import Interval, combine_verdicts, diff_ci, format_interval, mean_ci, scale_interval, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure

NAME = "regularization"
TITLE = "Does BatchNorm regularize? The train–validation gap"
SUMMARY = "Train–validation gap (accuracy and loss, eval mode) of an MLP and a CNN with and without BN."
ORDER = 80

CLAIM = "BatchNorm regularizes a little: the gap between training and validation performance is smaller with BN."

#: Only what this study needs from the measured-train runner.
MEASURE: dict[str, Any] = {"init_check": False, "train_eval": True, "timing": False, "memory": False, "fold": False}


@dataclass
class Config:
    """Full grid of the regularization study (``quick()`` is the small profile)."""

    models: tuple[str, ...] = ("mlp", "cnn")
    norms: tuple[str, ...] = ("none", "bn")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 20
    data: str = "digits"
    batch_size: int = 32
    lrs: dict[str, float] = field(default_factory=lambda: {"mlp": 0.05, "cnn": 0.1})
    max_steps: int | None = None
    limit: int | None = None

    @classmethod
    def quick(cls) -> Config:
        # The full grid's budget (20 epochs on all the data) for the MLP only, three seeds: the
        # effect is about a point (the full grid: gap 1.1 points smaller with BN), and 6 epochs
        # on 480 images gave it the wrong sign on the MLP (+0.6). The MLP is the cheap model.
        return cls(models=("mlp",), seeds=(0, 1, 2), epochs=20, limit=None)


def validate(cfg: Config) -> None:
    for n in cfg.norms:
        get_norm(n)
    missing = [m for m in cfg.models if m not in cfg.lrs]
    if missing:
        raise ValueError(f"lrs has no learning rate for model(s) {missing}")
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")


def runs(cfg: Config) -> list[dict[str, Any]]:
    return [
        measured_config(
            model=model,
            norm=norm,
            seed=seed,
            **study_settings(cfg),
            optimizer="sgd",
            lr=cfg.lrs[model],
            measure=MEASURE,
        )
        for model in cfg.models
        for norm in cfg.norms
        for seed in cfg.seeds
    ]


def _where(cfg: Config, model: str) -> dict[str, Any]:
    return {"model": model, "data": cfg.data, "runner": MEASURED_RUNNER}


def _pts(iv: Interval) -> str:
    return pct(iv, unit=" pts")


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """One card per model: is the train–validation gap smaller with BN?"""
    return [_card_gap(results, cfg, model) for model in cfg.models]


def _card_gap(results: list[RunResult], cfg: Config, model: str) -> Card:
    where = _where(cfg, model)
    claim = f"{CLAIM} [{model}]"
    details = (
        f"{model} on {cfg.data}, SGD (momentum 0.9, lr {cfg.lrs.get(model)}), batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs. Both sets evaluated in eval mode after "
        "training. Verdict: Welch 95% CI of gap(BN) − gap(none) below 0 for the accuracy gap "
        "and for the loss gap (both must hold); 'not supported' when either CI lies above 0."
    )
    g = {n: values(results, "gap_acc", norm=n, **where) for n in ("bn", "none")}
    gl = {n: values(results, "gap_loss", norm=n, **where) for n in ("bn", "none")}
    if not all(g.values()) or not all(gl.values()):
        return Card(NAME, claim, f"{model}: needs finished 'bn' and 'none' runs", "inconclusive",
                    details=details)
    d_acc = diff_ci(g["bn"], g["none"])
    d_loss = diff_ci(gl["bn"], gl["none"])
    v = combine_verdicts([verdict(d_acc, "less"), verdict(d_loss, "less")])
    sides = []
    for n in ("none", "bn"):
        tr = mean_ci(values(results, "train_eval_acc", norm=n, **where))
        va = mean_ci(values(results, "final_val_acc", norm=n, **where))
        sides.append(f"{n}: train {100 * tr.mean:.2f}%, validation {100 * va.mean:.2f}%")
    measurement = (
        f"{model}, {d_acc.n} seeds: accuracy gap none {_pts(mean_ci(g['none']))}, BN "
        f"{_pts(mean_ci(g['bn']))}, difference BN − none {_pts(d_acc)}; loss gap none "
        f"{format_interval(mean_ci(gl['none']))}, BN {format_interval(mean_ci(gl['bn']))}, "
        f"difference {format_interval(d_loss)}. " + "; ".join(sides)
    )
    return Card(NAME, claim, measurement, v, effect=scale_interval(d_acc, 100), details=details,
                effect_label="train − validation accuracy gap, BN − none (points)")


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """Train vs validation accuracy, and the loss curves."""
    outdir.mkdir(parents=True, exist_ok=True)
    return [_fig_gap(results, cfg, outdir), _fig_curves(results, cfg, outdir)]


def _fig_gap(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    models = list(cfg.models)
    fig, axes = plotting.panels(1, len(models), (4.4, 3.3))
    for ax, model in zip(axes[0], models):
        where = _where(cfg, model)
        for i, n in enumerate(cfg.norms):
            for j, (metric, label) in enumerate((("train_eval_acc", "train"), ("final_val_acc", "validation"))):
                v = [100 * x for x in values(results, metric, norm=n, **where)]
                if not v:
                    continue
                iv = mean_ci(v)
                x = i + (j - 0.5) * 0.38
                ax.bar(x, iv.mean, 0.38, color=f"C{j}", label=label if i == 0 else None)
                if not iv.degenerate:
                    ax.errorbar(x, iv.mean, yerr=plotting.ci_yerr(iv), color="k", capsize=2)
        ax.set_xticks(range(len(cfg.norms)), cfg.norms)
        lo = min([100 * x for n in cfg.norms for x in values(results, "final_val_acc", norm=n, **where)] or [90])
        ax.set_ylim(max(0, lo - 3), 100.5)
        ax.set_ylabel("accuracy (%, eval mode)")
        ax.set_title(model)
        ax.legend(fontsize=8, loc="lower right")
    return plotting.finish(fig, outdir / "regularization_gap.png", "Train vs validation accuracy",
                  "Accuracy on the training and the validation set, both in eval mode, after "
                  "training (mean, 95% CI over seeds). The gap between each pair of bars is the "
                  "generalization gap.")


def _fig_curves(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    models = list(cfg.models)
    fig, axes = plotting.panels(1, len(models), (4.4, 3.3))
    for ax, model in zip(axes[0], models):
        where = _where(cfg, model)
        for i, n in enumerate(cfg.norms):
            for metric, ls in (("train_loss", "--"), ("val_loss", "-")):
                curve = plotting.mean_curve(select(results, norm=n, **where), metric)
                if curve is not None:
                    ax.plot(*curve, ls=ls, color=plotting.color(n) or f"C{i}",
                            label=f"{n} {metric.replace('_', ' ')}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(model)
        ax.legend(fontsize=7)
    return plotting.finish(fig, outdir / "regularization_curves.png", "Loss during training",
                  "Training loss (dashed: mean over the epoch's steps, in train mode) and validation "
                  "loss (solid), mean over seeds.")
