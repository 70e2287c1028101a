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

Runs use the cost study's ``measured-train`` runner (training-set evaluation on, timings off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.stats import combine_verdicts
from normlab.lab.stats import Interval, diff_ci, format_interval, mean_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure, save_png, select
from normlab.lab.studies.cost import measured_config

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
        return cls(seeds=(0, 1), epochs=6, limit=480)


def validate(cfg: Config) -> None:
    from normlab.lab.norms import get_norm

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
            epochs=cfg.epochs,
            data=cfg.data,
            batch_size=cfg.batch_size,
            optimizer="sgd",
            lr=cfg.lrs[model],
            max_steps=cfg.max_steps,
            limit=cfg.limit,
            measure=MEASURE,
        )
        for model in cfg.models
        for norm in cfg.norms
        for seed in cfg.seeds
    ]


def _vals(results: list[RunResult], metric: str, **where: Any) -> list[float]:
    out = []
    for r in select(results, **where):
        v = r.metric(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out.append(float(v))
    return out


def _pts(iv: Interval) -> str:
    return format_interval(Interval(100 * iv.mean, 100 * iv.lo, 100 * iv.hi, iv.n, iv.level), 3, " pts")


def _where(cfg: Config, model: str) -> dict[str, Any]:
    return {"model": model, "data": cfg.data, "runner": "measured-train"}


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    cards = []
    for model in cfg.models:
        where = _where(cfg, model)
        claim = f"{CLAIM} [{model}]"
        details = (
            f"{model} on {cfg.data}, SGD (momentum 0.9, lr {cfg.lrs.get(model)}), batch "
            f"{cfg.batch_size}, {cfg.epochs} epochs. Both sets evaluated in eval mode after "
            "training. Verdict: Welch 95% CI of gap(BN) − gap(none) below 0 for the accuracy gap "
            "and for the loss gap (both must hold); 'not supported' when either CI lies above 0."
        )
        g = {n: _vals(results, "gap_acc", norm=n, **where) for n in ("bn", "none")}
        gl = {n: _vals(results, "gap_loss", norm=n, **where) for n in ("bn", "none")}
        if not all(g.values()) or not all(gl.values()):
            cards.append(Card(NAME, claim, f"{model}: needs finished 'bn' and 'none' runs", "inconclusive",
                              details=details))
            continue
        d_acc = diff_ci(g["bn"], g["none"])
        d_loss = diff_ci(gl["bn"], gl["none"])
        v = combine_verdicts([verdict(d_acc, "less"), verdict(d_loss, "less")])
        sides = []
        for n in ("none", "bn"):
            tr = mean_ci(_vals(results, "train_eval_acc", norm=n, **where))
            va = mean_ci(_vals(results, "final_val_acc", norm=n, **where))
            sides.append(f"{n}: train {100 * tr.mean:.2f}%, validation {100 * va.mean:.2f}%")
        measurement = (
            f"{model}, {d_acc.n} seeds: accuracy gap none {_pts(mean_ci(g['none']))}, BN "
            f"{_pts(mean_ci(g['bn']))}, difference BN − none {_pts(d_acc)}; loss gap none "
            f"{format_interval(mean_ci(gl['none']))}, BN {format_interval(mean_ci(gl['bn']))}, "
            f"difference {format_interval(d_loss)}. " + "; ".join(sides)
        )
        cards.append(Card(NAME, claim, measurement, v, effect=d_acc, details=details))
    return cards


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    models = list(cfg.models)
    fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 3.3), dpi=100, squeeze=False)
    for ax, model in zip(axes[0], models):
        where = _where(cfg, model)
        for i, n in enumerate(cfg.norms):
            for j, (metric, label) in enumerate((("train_eval_acc", "train"), ("final_val_acc", "validation"))):
                v = [100 * x for x in _vals(results, metric, norm=n, **where)]
                if not v:
                    continue
                iv = mean_ci(v)
                x = i + (j - 0.5) * 0.38
                ax.bar(x, iv.mean, 0.38, color=f"C{j}", label=label if i == 0 else None)
                if math.isfinite(iv.lo):
                    ax.errorbar(x, iv.mean, yerr=[[iv.mean - iv.lo], [iv.hi - iv.mean]], color="k", capsize=2)
        ax.set_xticks(range(len(cfg.norms)), cfg.norms)
        lo = min([100 * x for n in cfg.norms for x in _vals(results, "final_val_acc", norm=n, **where)] or [90])
        ax.set_ylim(max(0, lo - 3), 100.5)
        ax.set_ylabel("accuracy (%, eval mode)")
        ax.set_title(model)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path1 = outdir / "regularization_gap.png"
    save_png(fig, path1)

    fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 3.3), dpi=100, squeeze=False)
    for ax, model in zip(axes[0], models):
        where = _where(cfg, model)
        for i, n in enumerate(cfg.norms):
            for metric, ls in (("train_loss", "--"), ("val_loss", "-")):
                curves = [r.curve(metric) for r in select(results, norm=n, **where)]
                curves = [[v for v in c if v is not None] for c in curves]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                ax.plot(np.arange(1, length + 1), np.mean([c[:length] for c in curves], axis=0), ls=ls,
                        color=f"C{i}", label=f"{n} {metric.replace('_', ' ')}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path2 = outdir / "regularization_curves.png"
    save_png(fig, path2)
    return [
        Figure("Train vs validation accuracy", path1,
               "Accuracy on the training and the validation set, both in eval mode, after "
               "training (mean, 95% CI over seeds). The gap between each pair of bars is the "
               "generalization gap."),
        Figure("Loss during training", path2,
               "Training loss (dashed: mean over the epoch's steps, in train mode) and validation "
               "loss (solid), mean over seeds."),
    ]
