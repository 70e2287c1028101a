"""Smoke study: does standardizing the inputs speed up gradient descent on least squares?

A tiny, self-contained study (numpy only, a few milliseconds per run) that exercises the whole
pipeline — runner registration, sweep, store, statistics, cards, figures, report — without the
training stack. It is hidden from ``normlab demo`` and from ``normlab studies`` (use ``--all``);
run it with ``normlab study smoke --quick``.

Each run fits ``y = Xw + b`` by full-batch gradient descent with the largest safe step
(``1/L``, ``L`` the largest eigenvalue of the Hessian), on features whose scales span two orders
of magnitude and whose means are far from zero — both make the Hessian ill-conditioned.
``norm="standardize"`` subtracts each feature's mean and divides by its standard deviation first,
which is what input normalization does for a network's first layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import plotting
from normlab.lab.analysis import group_values, ratio_interval, select
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import compare, format_interval, mean_ci
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure

NAME = "smoke"
TITLE = "Smoke test: input standardization and gradient descent"
SUMMARY = "Toy least-squares problem: standardized inputs make gradient descent converge faster."
ORDER = 10_000
HIDDEN = True

NORMS = ("none", "standardize")
CLAIM = (
    "Normalizing the inputs (zero mean, unit variance per feature) makes gradient descent "
    "converge faster, because it improves the conditioning of the loss surface."
)
QUESTION = "Which input preprocessing reaches the lowest loss within the step budget?"


@dataclass
class Config:
    """Full grid of the smoke study (``quick()`` is a smaller profile)."""

    norms: tuple[str, ...] = NORMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 20
    steps_per_epoch: int = 10
    samples: int = 256
    features: int = 8
    scale: float = 100.0  # ratio of the largest to the smallest feature scale
    offset: float = 3.0  # feature means, in units of their scale

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=(0, 1, 2), epochs=8)


def validate(cfg: Config) -> None:
    """Reject settings the runner cannot handle, before anything runs."""
    bad = [n for n in cfg.norms if n not in NORMS]
    if bad:
        raise ValueError(f"unknown norm(s) {', '.join(bad)}; this study knows {', '.join(NORMS)}")
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")


def runs(cfg: Config) -> list[dict[str, Any]]:
    """One run per (norm, seed)."""
    return [
        {
            "runner": "smoke-gd",
            "norm": norm,
            "seed": int(seed),
            "epochs": int(cfg.epochs),
            "steps_per_epoch": int(cfg.steps_per_epoch),
            "samples": int(cfg.samples),
            "features": int(cfg.features),
            "scale": float(cfg.scale),
            "offset": float(cfg.offset),
        }
        for norm in cfg.norms
        for seed in cfg.seeds
    ]


@register_runner("smoke-gd")
def gd_least_squares(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Full-batch gradient descent on a least-squares problem; logs the excess loss per epoch."""
    rng = np.random.default_rng(int(config["seed"]))
    n, d = int(config["samples"]), int(config["features"])
    scales = np.geomspace(1.0, float(config["scale"]), d)
    x = (rng.standard_normal((n, d)) + float(config["offset"])) * scales
    w_true = rng.standard_normal(d) / scales
    y = x @ w_true + 0.1 * rng.standard_normal(n)
    if config["norm"] == "standardize":
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    a = np.hstack([x, np.ones((n, 1))])  # bias column
    hessian = a.T @ a / n
    step = 1.0 / float(np.linalg.eigvalsh(hessian)[-1])
    w_opt, *_ = np.linalg.lstsq(a, y, rcond=None)
    best = float(np.mean((a @ w_opt - y) ** 2) / 2)

    w = np.zeros(d + 1)
    excess = math.nan
    for epoch in range(int(config["epochs"])):
        for _ in range(int(config["steps_per_epoch"])):
            w -= step * (a.T @ (a @ w - y) / n)
        loss = float(np.mean((a @ w - y) ** 2) / 2)
        # Relative excess loss, floored so that log10 stays finite once converged.
        excess = max((loss - best) / max(best, 1e-12), 1e-16)
        log(epoch, {"train_loss": loss, "excess": excess})
    return {
        "excess": excess,
        "log10_excess": math.log10(excess),
        "steps": int(config["epochs"]) * int(config["steps_per_epoch"]),
        "condition": float(np.linalg.cond(hessian)),
    }


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """The claim card (log10 excess loss, none − standardize) and a which-is-best answer card."""
    groups = group_values(results, "norm", "log10_excess")
    cards = [_card_claim(groups, cfg)]
    if groups:
        cards.append(_card_question(groups))
    return cards


def _card_claim(groups: dict[str, list[float]], cfg: Config) -> Card:
    if "none" in groups and "standardize" in groups:
        log_effect, verdict = compare(groups["none"], groups["standardize"], "greater", tolerance=0.0)
        effect = ratio_interval(log_effect)  # the verdict is on the log10 difference, > 0 ⇔ ratio > 1
        m_none, m_std = mean_ci(groups["none"]), mean_ci(groups["standardize"])
        measurement = (
            f"log10 relative excess loss after {cfg.epochs * cfg.steps_per_epoch} steps: "
            f"none {format_interval(m_none)}, standardize {format_interval(m_std)}; "
            f"difference {format_interval(log_effect)} (95% CI, Welch, "
            f"{effect.n} seeds per arm)"
        )
    else:
        effect, verdict = None, "inconclusive"
        measurement = "needs both 'none' and 'standardize' runs; got " + (
            ", ".join(map(str, groups)) or "no finished runs"
        )
    return Card(
        study=NAME,
        claim=CLAIM,
        measurement=measurement,
        verdict=verdict,
        effect=effect,
        effect_label="relative excess loss, none / standardize (×)",
        details="Ratio > 1 (log10 difference > 0) = standardized inputs reach a lower loss.",
    )


def _card_question(groups: dict[str, list[float]]) -> Card:
    best = min(groups, key=lambda k: float(np.mean(groups[k])))
    return Card(
        study=NAME,
        claim=QUESTION,
        question=QUESTION,
        measurement=f"lowest mean log10 excess loss: {best} "
        f"({format_interval(mean_ci(groups[best]))})",
        verdict="answer",
    )


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """Excess loss per epoch, mean over seeds, one line per preprocessing."""
    outdir.mkdir(parents=True, exist_ok=True)
    return [_fig_convergence(results, cfg, outdir)]


def _fig_convergence(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, ax = plotting.plt().subplots(figsize=(5, 3.2), dpi=100)
    for norm in cfg.norms:
        curve = plotting.mean_curve(select(results, norm=norm), "excess")
        if curve is not None:
            ax.semilogy(curve[0] * cfg.steps_per_epoch, curve[1], label=norm)
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("relative excess loss")
    ax.legend()
    return plotting.finish(
        fig,
        outdir / "excess_loss.png",
        title="Convergence of gradient descent",
        caption="Relative excess loss (mean over seeds) against gradient steps.",
    )
