"""``normlab advise``: which normalization for *your* model and data, measured.

The article ends "if your model trains badly, try other methods for your problem"; this study is
that advice as an experiment. The user's model is taken as written (a function with no ``norm``
parameter, see :func:`normlab.lab.models.build_model`); each candidate method replaces its
normalization layers with :func:`normlab.convert`, and every (method, batch size) is trained for the
same step budget:

1. **learning-rate search**: each learning rate of ``lrs`` once, with seed 0;
2. **evaluation**: the best of them (lowest validation loss) with fresh seeds ``1..seeds`` — the
   reported numbers never include the run that chose the learning rate, so they are not biased
   towards the method that got lucky in the search.

The answer per batch size: validation error (or loss, for regression) with a 95% interval over
seeds, step time and activation memory from the calibration (:mod:`normlab.lab.advise`), the Pareto
front of (step time, error), and one recommendation computed from the data: the cheapest method
whose error cannot be told apart from the best one's (paired per-seed difference; its interval
contains 0). Error-rate intervals are computed on the logit scale (:func:`normlab.lab.stats.rate_ci`), so
they stay inside [0, 100] %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.models import OWN
from normlab.lab.stats import Interval, format_interval, mean_ci, paired_diff_ci, rate_ci
from normlab.lab.store import RunResult
from normlab.lab.analysis import select
from normlab.lab.plotting import color, marker, plt, save_png
from normlab.lab.studies import Card, Figure

NAME = "advise"
TITLE = "Advice for your model: which normalization, measured on your data"
SUMMARY = "Swap your model's normalization for each candidate method; train, compare, recommend."
ORDER = 5
HIDDEN = True

#: candidate methods, in the order they are tried (``own`` = the model as written).
METHODS: tuple[str, ...] = (OWN, "bn", "gn", "ln", "rms", "ws+gn", "frn", "brn", "none")
LRS: dict[str, tuple[float, ...]] = {"adam": (3e-4, 1e-3, 3e-3), "sgd": (0.03, 0.1, 0.3)}
QUESTION = "Which normalization should this model use, at this batch size?"


@dataclass
class Config:
    """One ``normlab advise`` run: the user's model and data, and the budget's plan.

    ``steps`` (optimizer steps per run) is what the budget bought, fixed once by the calibration
    and recorded so that a resumed command does the same runs. ``chosen`` maps
    ``"method@batch"`` to the learning rate the search picked (filled after phase 1).
    ``calibration`` maps ``"method@batch"`` to ``{"step_s": ..., "activation_mb": ...}``;
    ``asked``: the methods the command asked for (``methods``: those that apply to the model).
    """

    model: str = ""
    data: str = ""
    model_options: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = METHODS
    batch_sizes: tuple[int, ...] = (32,)
    seeds: int = 3
    optimizer: str = "adam"
    lrs: tuple[float, ...] = LRS["adam"]
    steps: int = 100
    budget_s: float | None = None
    chosen: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    asked: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=2, steps=30)


def key(method: str, batch_size: int) -> str:
    return f"{method}@{batch_size}"


def validate(cfg: Config) -> None:
    if not cfg.model or not cfg.data:
        raise ValueError("advise needs a model (--model pkg.mod:fn) and data (--data SPEC)")
    if cfg.seeds < 2:
        raise ValueError(f"seeds: expected >= 2 (an interval needs two), got {cfg.seeds}")
    if cfg.steps < 1:
        raise ValueError(f"steps: expected a positive int, got {cfg.steps}")
    if not cfg.methods or not cfg.batch_sizes or not cfg.lrs:
        raise ValueError("methods, batch sizes and learning rates must be non-empty")


def _run(cfg: Config, method: str, bs: int, lr: float, seed: int) -> dict[str, Any]:
    return {
        "runner": "train", "model": cfg.model, "model_options": dict(cfg.model_options),
        "data": cfg.data, "data_options": dict(cfg.data_options), "norm": method, "batch_size": bs, "optimizer": cfg.optimizer,
        "lr": lr, "lr_scaling": "none", "seed": seed, "max_steps": cfg.steps,
        # the step budget ends training; evaluation happens once, at the last step
        "epochs": 1_000_000, "eval_every": 1_000_000,
    }


def search_runs(cfg: Config) -> list[dict[str, Any]]:
    """Phase 1: every learning rate once (seed 0) for each method and batch size."""
    return [_run(cfg, m, b, lr, 0) for b in cfg.batch_sizes for m in cfg.methods for lr in cfg.lrs]


def runs(cfg: Config) -> list[dict[str, Any]]:
    """Phase 1, plus phase 2 (fresh seeds at the chosen rate) once ``cfg.chosen`` is filled."""
    out = search_runs(cfg)
    for b in cfg.batch_sizes:
        for m in cfg.methods:
            lr = cfg.chosen.get(key(m, b))
            if lr is not None:
                out += [_run(cfg, m, b, lr, s) for s in range(1, cfg.seeds + 1)]
    return out


def _search_score(r: RunResult) -> float:
    loss = r.metric("final_val_loss")
    return float(loss) if loss is not None and math.isfinite(loss) and not r.metric("diverged") else math.inf


def choose_lrs(results: list[RunResult], cfg: Config) -> dict[str, float]:
    """The learning rate with the lowest validation loss per (method, batch size); a method whose
    every rate failed or diverged gets none (it is then reported as such, not evaluated)."""
    chosen: dict[str, float] = {}
    for b in cfg.batch_sizes:
        for m in cfg.methods:
            scored = [(_search_score(r), r.config["lr"]) for r in
                      select(results, norm=m, batch_size=b, seed=0, max_steps=cfg.steps)
                      if r.config["lr"] in cfg.lrs]
            scored = [s for s in scored if math.isfinite(s[0])]
            if scored:
                chosen[key(m, b)] = min(scored)[1]
    return chosen


# -- analysis -----------------------------------------------------------------------------------


@dataclass
class Arm:
    """One (method, batch size) at its chosen rate: per-seed values, in seed order."""

    method: str
    batch_size: int
    lr: float | None
    values: list[float]  # error in % (classification) or validation loss (regression)
    seeds: list[int]
    diverged: int
    step_s: float | None
    activation_mb: float | None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan


def _is_classification(results: list[RunResult]) -> bool:
    return any(r.metric("final_val_acc") is not None for r in results)


def _value(r: RunResult, classification: bool) -> float:
    if classification:
        acc = r.metric("final_val_acc")
        return 100.0 if r.metric("diverged") or acc is None else 100.0 * (1.0 - float(acc))
    loss = r.metric("final_val_loss")
    return math.inf if r.metric("diverged") or loss is None else float(loss)


def arms(results: list[RunResult], cfg: Config) -> list[Arm]:
    classification = _is_classification(results)
    out = []
    for b in cfg.batch_sizes:
        for m in cfg.methods:
            lr = cfg.chosen.get(key(m, b))
            rs = [] if lr is None else sorted(
                (r for r in select(results, norm=m, batch_size=b, lr=lr, max_steps=cfg.steps)
                 if r.config["seed"] >= 1), key=lambda r: r.config["seed"])
            cal = cfg.calibration.get(key(m, b), {})
            steps = [r.metric("time_per_step_s") for r in rs if r.metric("time_per_step_s")]
            out.append(Arm(m, b, lr, [_value(r, classification) for r in rs],
                           [r.config["seed"] for r in rs], sum(bool(r.metric("diverged")) for r in rs),
                           float(np.median(steps)) if steps else cal.get("step_s"),
                           cal.get("activation_mb")))
    return out


def _n_val(results: list[RunResult]) -> int | None:
    for r in results:
        if r.metric("n_val"):
            return int(r.metric("n_val"))
    return None


def interval(arm: Arm, classification: bool, n_val: int | None) -> Interval:
    if not arm.values:
        return Interval(math.nan, math.nan, math.nan, 0, 0.95)
    return rate_ci(arm.values, n_val) if classification else mean_ci(arm.values)


def pareto(arms_: list[Arm]) -> list[Arm]:
    """Arms no other arm beats on both step time and error (ties kept)."""
    ok = [a for a in arms_ if a.values and a.step_s is not None and math.isfinite(a.mean)]
    return [a for a in ok if not any(
        (o.step_s <= a.step_s and o.mean <= a.mean) and (o.step_s < a.step_s or o.mean < a.mean)
        for o in ok)]


def label(cfg: Config, method: str) -> str:
    return cfg.labels.get(method, method)


def _paired(a: Arm, ref: Arm) -> Interval | None:
    """Paired per-seed interval of ``a − ref`` (the same seeds share init and batch order)."""
    common = sorted(set(a.seeds) & set(ref.seeds))
    if len(common) < 2:
        return None
    return paired_diff_ci([a.values[a.seeds.index(s)] for s in common],
                          [ref.values[ref.seeds.index(s)] for s in common])


def recommend(arms_: list[Arm], cfg: Config, classification: bool, n_val: int | None) -> Card:
    """The recommendation for one batch size, computed from its arms.

    The method with the lowest mean error, unless a method at least 10% cheaper per step is within
    a practical tolerance of it (1 point or 10% of its error, whichever is larger; 2% of the loss
    for regression) and not distinguishable from it by the paired interval: then that one.
    """
    b = arms_[0].batch_size
    unit, what = (" %", "error") if classification else ("", "validation loss")
    ok = [a for a in arms_ if len(a.values) >= 2 and math.isfinite(a.mean)]
    failed = [label(cfg, a.method) for a in arms_ if a not in ok]
    title = f"Batch size {b}: which normalization for your model?"
    if not ok:
        return Card(NAME, title, f"At batch {b}: no method finished two seeds.", "inconclusive", QUESTION)
    best = min(ok, key=lambda a: a.mean)
    tol = max(1.0, 0.1 * best.mean) if classification else 0.02 * abs(best.mean)

    def cheaper_and_as_good(a: Arm) -> bool:
        d = _paired(a, best)
        return (a is not best and a.step_s is not None and best.step_s is not None
                and a.step_s <= 0.9 * best.step_s and a.mean - best.mean <= tol
                and d is not None and d.lo <= 0.0)

    alternatives = [a for a in ok if cheaper_and_as_good(a)]
    pick = min(alternatives, key=lambda a: a.step_s) if alternatives else best
    own = next((a for a in ok if a.method == OWN), None)
    n = len(pick.values)
    iv = interval(pick, classification, n_val)
    if pick.method == OWN:
        text = f"At batch {b}: keep {label(cfg, OWN)}: {what} {format_interval(iv, 3, unit)} over {n} seeds"
    else:
        text = f"At batch {b}: use {label(cfg, pick.method)}: {what} {format_interval(iv, 3, unit)} over {n} seeds"
    if pick is best:
        text += f", the lowest of the {len(ok)} methods evaluated"
    else:
        ratio = pick.step_s / best.step_s
        text += (f", within {pick.mean - best.mean:.2g}{unit.strip() and ' points'} of the lowest "
                 f"({label(cfg, best.method)}, {best.mean:.3g}{unit}) at {ratio:.2f}× its step time")
    effect = None
    if own is not None and own is not pick:
        effect = _paired(pick, own)
        text += f". Your model as written: {format_interval(interval(own, classification, n_val), 3, unit)}"
        if effect is not None:
            pts = " points" if classification else ""
            beyond = effect.hi < 0
            text += (f"; the difference is {format_interval(effect, 3, pts)}, "
                     + ("better beyond the seed noise" if beyond else "not beyond the seed noise "
                        f"at {effect.n} seeds"))
        if pick.step_s and own.step_s:
            text += f"; {pick.step_s / own.step_s:.2f}× your step time"
    close = [a for a in ok if a is not pick and (d := _paired(a, pick)) is not None and d.lo <= 0.0 <= d.hi]
    if close:
        text += (f". Not distinguishable from it at this number of seeds: "
                 f"{', '.join(label(cfg, a.method) for a in close)} (more --seeds would separate them)")
    if failed:
        text += f". Not evaluated (every rate diverged or failed): {', '.join(failed)}"
    details = (f"learning rate chosen per method among {list(cfg.lrs)} ({cfg.optimizer}) by a seed-0 "
               f"search; reported seeds 1..{cfg.seeds}; {cfg.steps} steps per run; intervals 95%, "
               "error rates on the logit scale, differences paired by seed.")
    effect_label = ""
    if effect is not None:
        effect_label = (f"{what} at batch {b}, {label(cfg, pick.method)} − {label(cfg, OWN)}"
                        + (" (points)" if classification else " (loss units)"))
    return Card(NAME, title, text + ".", "answer", QUESTION, effect=effect, details=details,
                effect_label=effect_label)


def _table(arms_: list[Arm], cfg: Config, classification: bool, n_val: int | None) -> str:
    unit = " %" if classification else ""
    front = {id(a) for a in pareto(arms_)}
    rows = []
    for a in arms_:
        if not a.values:
            rows.append(f"{label(cfg, a.method)}: not evaluated")
            continue
        parts = [f"{label(cfg, a.method)}: {format_interval(interval(a, classification, n_val), 3, unit)}",
                 f"lr {a.lr:g}"]
        if a.step_s is not None:
            parts.append(f"{1e3 * a.step_s:.3g} ms/step")
        if a.activation_mb is not None:
            parts.append(f"{a.activation_mb:.3g} MB activations")
        if a.diverged:
            parts.append(f"{a.diverged} seed(s) diverged")
        if id(a) in front:
            parts.append("Pareto front")
        rows.append(", ".join(parts))
    return "; ".join(rows)


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    classification = _is_classification(results)
    n_val = _n_val(results)
    all_arms = arms(results, cfg)
    cards = []
    for b in cfg.batch_sizes:
        mine = [a for a in all_arms if a.batch_size == b]
        card = recommend(mine, cfg, classification, n_val)
        card.details = f"{_table(mine, cfg, classification, n_val)}. {card.details}"
        cards.append(card)
    return cards


# -- figures ------------------------------------------------------------------------------------


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    plt_ = plt()
    classification = _is_classification(results)
    n_val = _n_val(results)
    ylabel = "validation error (%)" if classification else "validation loss"
    all_arms = arms(results, cfg)
    figs = []
    bss = list(cfg.batch_sizes)
    fig, axes = plt_.subplots(1, len(bss), figsize=(4.8 * len(bss), 3.8), squeeze=False)
    for ax, b in zip(axes[0], bss):
        mine = [a for a in all_arms if a.batch_size == b and a.values and a.step_s]
        front = {id(a) for a in pareto(mine)}
        for a in mine:
            iv = interval(a, classification, n_val)
            lo, hi = max(a.mean - iv.lo, 0.0), max(iv.hi - a.mean, 0.0)
            yerr = [[lo if math.isfinite(lo) else 0.0], [hi if math.isfinite(hi) else 0.0]]
            ax.errorbar([1e3 * a.step_s], [a.mean], yerr=yerr, fmt="o" if id(a) in front else "s",
                        capsize=3, color="C0" if id(a) in front else "0.55")
            ax.annotate(label(cfg, a.method), (1e3 * a.step_s, a.mean), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        pts = sorted((1e3 * a.step_s, a.mean) for a in mine if id(a) in front)
        if len(pts) > 1:
            ax.plot(*zip(*pts), "-", color="C0", alpha=0.5)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("step time (ms)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = save_png(fig, outdir / "advise_pareto.png")
    figs.append(Figure("Error vs cost per method", path,
                       "Each point: one method at its chosen learning rate, mean over seeds with 95% "
                       "interval; blue points and line: the Pareto front (no method is both faster "
                       "and better)."))

    fig, axes = plt_.subplots(1, len(bss), figsize=(4.8 * len(bss), 3.6), squeeze=False)
    for ax, b in zip(axes[0], bss):
        for i, m in enumerate(cfg.methods):
            pts = sorted((r.config["lr"], _search_score(r)) for r in
                         select(results, norm=m, batch_size=b, seed=0, max_steps=cfg.steps))
            pts = [(lr, v) for lr, v in pts if math.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts), "-", marker=marker(m), label=label(cfg, m), color=color(m) or f"C{i % 10}")
        ax.set_xscale("log")
        ax.set_title(f"batch {b}: learning-rate search (seed 0)")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = save_png(fig, outdir / "advise_lr_search.png")
    figs.append(Figure("Learning-rate search", path,
                       "Validation loss after the step budget for each rate tried (seed 0); the lowest "
                       "point of each line is the rate used for the evaluation seeds. Missing points "
                       "diverged."))
    return figs
