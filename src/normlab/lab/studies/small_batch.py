"""Small batches, today's answer: BatchNorm against the methods practitioners now use below 8.

The ``batch-size`` study asks the article's question with the 2018 candidates (BN vs GN/LN/IN).
This one compares BN with the methods proposed since for small batches — Batch Renormalization
(``brn``), Ghost BN (``gbn``), Weight Standardization + GN (``ws+gn``), Filter Response Norm +
TLU (``frn``), EvoNorm-S0, and LN, GN and no normalization — from batch size 1 to 128, on tasks
where BN's statistics are actually starved.

Design (pilots: ``/work/shared/LAB-PILOTS.md``):

* **Tasks** — ``mlp``: the digits MLP (64-128-128-10; BN pools ``N`` values per statistic, the
  pilots' 25.7 % vs 1.5 % collapse at batch 2); ``mnist1d``: MNIST-1D with the 1-D CNN (32
  channels; ``N·L`` values, L down to 10); ``tiles4``: the procedural 4×4 image task of
  :func:`normlab.lab.data.load_tiles4` with the 2-D CNN (16-32-32), whose last conv layer is 2×2:
  ``N·4`` values, 8 at batch 2 (digits' CNN pools ≥ 32 and does not degrade).
* **Which methods run where** (:func:`skip_reason` says why a cell is left out): batch size 1 is
  skipped for the batch-statistic methods (BN, Batch Renorm, Ghost BN) on the MLP — one value
  per feature has no variance, training mode is undefined; on a CNN a statistic still pools the
  positions and batch 1 is valid. WS+GN and FRN are conv-only (WS standardizes conv filters, so
  on the MLP it would be GN itself; FRN over one value per channel returns its sign). Ghost BN's
  virtual batch is ``ghost_batch`` (16): at batch sizes up to it Ghost BN *is* BN, so it runs only
  above (it is a large-batch method; the card on it says so).
* **Budget: the same number of samples at every batch size** (``epochs`` passes over the training
  set, no step cap). The linear learning-rate scaling rule (Goyal et al. 2017; the Group Norm
  paper) is a statement about equal samples: k steps of batch n at rate η ≈ one step of batch kn
  at rate kη. Under it a method without batch dependence gives a flat error-vs-batch-size line,
  so a method's rise at small batches is its own. A fixed number of *steps* would give batch 2
  64× fewer samples than batch 128 and make every method degrade at small batch (the budget's
  share, which the ``batch-size`` study has to subtract with a control). The price is time: a
  run's steps grow as ``1/bs``, so the small-batch cells dominate the sweep (a step at batch 2
  costs nearly as much as at batch 32 on a CPU).
* **Learning rate as a factor**: ``lr_scaling = "linear"`` (``lr = base · bs / base_batch``,
  base at 32) for the whole grid, and ``"none"`` (the base rate at every batch size) for
  ``lr_norms`` at ``lr_batch_sizes``: the card on the rule compares BN's small-batch gap under
  both.
* **Seeds**: ``seeds`` (5) at batch sizes ≤ ``small_max`` (8), ``large_seeds`` (3) above (large
  batches are cheap and their seed-to-seed spread is small).
* **Metric**: final validation error (%) in eval mode (BN with its running statistics). Means
  over seeds with intervals on the logit scale (:func:`normlab.lab.stats.rate_ci`: they
  stay in [0, 100] %); differences of errors in percentage points, Welch 95 % intervals.
* **Budgets** (``TASK_PRESETS``): MLP 3 epochs of the 1 437 training digits (4 311 samples: 2 155
  steps at batch 2, 134 at 32); tiles4 and MNIST-1D 2 epochs of 1 500 / 2 000 training samples.
  Large batches get few steps (tiles4 at 128: 23) and are undertrained: the price of equal samples,
  and why the reference batch size is 32, not 128. **Known open problem**: on tiles4 this budget
  leaves even batch 32 undertrained (93 steps). A partial grid (tiles4; BN, GN, WS+GN, FRN at
  batch 2 and 32; 42 runs, 357 CPU s) measured BN 38.1 % at 2 vs 40.7 % [20, 64.9] at 32, GN 43 %
  vs 72 %, WS+GN 29 % vs 38 %, FRN 80 % vs 88 % — so "BN degrades" is inconclusive there for lack
  of a trained reference, not for lack of starving (8 values per statistic at batch 2). A 4-epoch
  pilot of 2 000 samples (248 steps at 32) gave BN 17.5 % at 32: tiles4 needs ~8 000 samples,
  which roughly doubles the grid's cost — or a step floor for the batch sizes above 8.
* **Cost** (each run records its CPU seconds as ``cpu_time_s``). Measured on this project's 2-core
  machine, one thread per run: a training step costs ~4–6 ms of CPU on the MLP (BN 4.6, Batch
  Renorm 6, GN 3.8 at batch 2) and ~10 ms on the tiles4 CNN at batch 2 (~20 ms at 32). From those
  per-step costs and the run list, the default grid (MLP + tiles4, 424 runs) needs ~3 300 CPU
  seconds: ~28 min with ``--workers 2`` on an idle 2-core machine (an estimate: the full grid was
  not run on an idle machine); adding MNIST-1D (``--model mlp,tiles4,mnist1d``) about doubles it.
  The quick profile (MLP only; BN, Batch Renorm, GN at batch 2 and 32, 3 seeds, BN also at a
  fixed rate at batch 2; 21 runs of at most 1 000 steps): 58 CPU seconds in its runs, 80 s of
  user time for the whole command with the report; 6 min 17 s of wall time here with
  ``--workers 2`` while other jobs loaded the machine ~8× (21 % CPU share), so ~40 s on two idle
  cores. Its verdicts (seeds 0-2): BN 29.6 % at batch 2 vs 5.9 % at 32 (gap 23.8 [20, 27.6]
  points, supported); Batch Renorm closes 17 [12.9, 21] points, 71 % [64, 78] of it; the lr
  rule's part −60 [−64, −56] points (not supported: a fixed rate of 0.05 at batch 2 makes BN
  diverge); at batch 2 use GN (9.7 %), tied with Batch Renorm.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import plotting
from normlab.lab.analysis import n_val, select
from normlab.lab.hooks import ShapeProbe, stat_values
from normlab.lab.norms import get_norm
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import Interval, diff_ci, format_interval, rate_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure, Ranking
from normlab.lab.train import train

NAME = "small-batch"
TITLE = "Small batches: BatchNorm vs Batch Renorm, Ghost BN, WS+GN, FRN, EvoNorm, GN, LN"
SUMMARY = (
    "Validation error vs batch size (1 … 128) for BN and the small-batch fixes (Batch Renorm, "
    "Ghost BN, WS+GN, FRN+TLU, EvoNorm-S0) with GN, LN and no norm, on the digits MLP, MNIST-1D "
    "and a 4×4 image task where BN's statistics starve; linear lr scaling vs fixed lr."
)
ORDER = 21

METHODS = ("bn", "brn", "gbn", "gn", "ws+gn", "frn", "evonorm-s0", "ln", "none")
TASKS = ("mlp", "mnist1d", "tiles4")
#: Methods whose statistics are pooled over the batch (their noise depends on the batch size).
BATCH_METHODS = ("bn", "brn", "gbn")
#: The methods whose gap-closing is a card of its own.
FIXES = ("brn", "ws+gn", "frn")

#: Per task: data, model and the pilots' training settings. ``epochs``: the sample budget.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "mlp": {"data": "digits", "model": "mlp", "lr": 0.05, "weight_decay": 0.0, "epochs": 3,
            "model_options": {"hidden": [128, 128]}, "data_options": {}},
    "mnist1d": {"data": "mnist1d", "model": "cnn", "lr": 0.05, "weight_decay": 1e-4, "epochs": 2,
                "model_options": {"channels": [32, 32, 32]}, "data_options": {"limit": 2000}},
    "tiles4": {"data": "tiles4", "model": "cnn", "lr": 0.1, "weight_decay": 0.0, "epochs": 2,
               "model_options": {"channels": [16, 32, 32]}, "data_options": {"limit": 1500}},
}
TASK_LABELS = {"mlp": "digits MLP", "mnist1d": "MNIST-1D 1-D CNN", "tiles4": "tiles4 4×4 CNN"}

CLAIM_DEGRADES = "BatchNorm degrades below a batch size (its batch statistics starve)."
CLAIM_FIX = "{m} closes BatchNorm's small-batch gap."
CLAIM_LR = "The linear learning-rate scaling rule has a part in BatchNorm's small-batch gap."
Q_SMALL = "At batch size ≤ 4, which normalization should one use?"
METHOD_LABELS = {
    "bn": "BN", "brn": "Batch Renorm", "gbn": "Ghost BN", "gn": "GN", "ws+gn": "WS+GN",
    "frn": "FRN+TLU", "evonorm-s0": "EvoNorm-S0", "ln": "LN", "none": "no norm",
}


@dataclass
class Config:
    """Full grid (``quick()`` is the small profile for the demo).

    Attributes:
        norms: methods compared (names of :mod:`normlab.lab.norms`).
        batch_sizes: training batch sizes (1 where the method allows it).
        seeds: seeds at batch sizes 2 … ``small_max``; ``large_seeds``: above it; ``tiny_seeds``:
            at batch size 1 (its runs cost twice those at 2).
        model: tasks, comma-separated, from ``mlp``, ``tiles4``, ``mnist1d`` (default
            ``"mlp,tiles4"``: MNIST-1D doubles the cost, add it with ``--model``).
        epochs: passes over the training set at every batch size (None: per-task preset) — the
            same number of samples for every batch size.
        limit: training samples per task (None: the preset's; 0: all).
        base_batch: batch size at which the base learning rate applies (linear scaling rule).
        normal_batch: the reference batch size BN's small-batch error is compared with.
        ghost_batch: Ghost BN's virtual batch (Ghost BN runs only above it).
        lr_norms / lr_batch_sizes: the cells also trained at a fixed (unscaled) learning rate.
        small_max: batch sizes up to this count as "small" (more seeds).
        answer_max: the answer card ranks the methods over batch sizes up to this one.
        tolerance: smallest error difference (points) that counts.
    """

    norms: tuple[str, ...] = METHODS
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 128)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    large_seeds: tuple[int, ...] = (0, 1, 2)
    tiny_seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "mlp,tiles4"
    epochs: int | None = None
    limit: int | None = None
    base_batch: int = 32
    normal_batch: int = 32
    ghost_batch: int = 16
    lr_norms: tuple[str, ...] = ("bn", "gn")
    lr_batch_sizes: tuple[int, ...] = (2, 4, 32)
    small_max: int = 8
    answer_max: int = 4
    tolerance: float = 1.0

    @classmethod
    def quick(cls) -> Config:
        # The MLP collapse only: 1 000 digits × 2 epochs = 1 000 steps at batch 2 per run.
        return cls(
            norms=("bn", "brn", "gn"),
            batch_sizes=(2, 32),
            seeds=(0, 1, 2),
            large_seeds=(0, 1, 2),
            tiny_seeds=(0, 1, 2),
            model="mlp",
            epochs=2,
            limit=1000,
            lr_norms=("bn",),
            lr_batch_sizes=(2, 32),
        )


def tasks(cfg: Config) -> list[str]:
    """The tasks of ``cfg.model``, in order."""
    return [t.strip() for t in str(cfg.model).split(",") if t.strip()]


def validate(cfg: Config) -> None:
    """Reject settings the study cannot run, with the argument named."""
    ts = tasks(cfg)
    bad = [t for t in ts if t not in TASKS]
    if not ts or bad:
        raise ValueError(f"model: expected a comma-separated subset of {list(TASKS)}, got {cfg.model!r}")
    for n in tuple(cfg.norms) + tuple(cfg.lr_norms):
        get_norm(n)  # raises ValueError with the valid names
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ValueError(f"batch_sizes: expected sizes >= 1, got {cfg.batch_sizes}")
    if not cfg.seeds or not cfg.large_seeds or not cfg.tiny_seeds:
        raise ValueError("seeds, large_seeds, tiny_seeds: at least one seed each is needed")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ValueError(f"epochs: expected >= 1, got {cfg.epochs}")
    if cfg.normal_batch not in cfg.batch_sizes:
        raise ValueError(f"normal_batch: expected one of batch_sizes {cfg.batch_sizes}, got {cfg.normal_batch}")
    if cfg.tolerance < 0:
        raise ValueError(f"tolerance: expected >= 0, got {cfg.tolerance}")


def skip_reason(task: str, method: str, bs: int, ghost_batch: int = 16) -> str | None:
    """Why ``method`` does not run at batch size ``bs`` on ``task`` (None: it runs)."""
    conv = task != "mlp"
    base = method.split(":")[0]
    if base in BATCH_METHODS and bs == 1 and not conv:
        return (f"{method} at batch 1 on an MLP: one value per feature has no variance, so its "
                "training-mode statistics are undefined")
    if base in ("frn", "ws+gn") and not conv:
        return (f"{method} on an MLP: " + ("FRN over one value per channel returns its sign"
                if base == "frn" else "WS standardizes conv filters, so this would be GN itself"))
    if base == "gbn":
        g = int(method.split(":")[1]) if ":" in method else ghost_batch
        if bs <= g:
            return f"Ghost BN with virtual batch {g} is BN itself at batch {bs}"
    return None


def _ghost(method: str, ghost_batch: int) -> str:
    return f"gbn:{ghost_batch}" if method == "gbn" else method


def _preset(cfg: Config, task: str) -> dict[str, Any]:
    p = dict(TASK_PRESETS[task])
    p["data_options"] = dict(p["data_options"])
    if cfg.epochs is not None:
        p["epochs"] = int(cfg.epochs)
    if cfg.limit is not None:
        if cfg.limit:
            p["data_options"]["limit"] = int(cfg.limit)
        else:
            p["data_options"].pop("limit", None)
    return p


def _run(cfg: Config, task: str, method: str, bs: int, seed: int, lr_scaling: str) -> dict[str, Any]:
    p = _preset(cfg, task)
    return {
        "runner": "small-batch-train",
        "task": task,
        "method": method,
        "data": p["data"],
        "model": p["model"],
        "norm": _ghost(method, cfg.ghost_batch),
        "batch_size": int(bs),
        "seed": int(seed),
        "lr": float(p["lr"]),
        "lr_scaling": lr_scaling,
        "base_batch": int(cfg.base_batch),
        "weight_decay": float(p["weight_decay"]),
        "model_options": p["model_options"],
        "data_options": p["data_options"],
        "epochs": int(p["epochs"]),
    }


def _seeds(cfg: Config, bs: int) -> tuple[int, ...]:
    if bs == 1:
        return cfg.tiny_seeds
    return cfg.seeds if bs <= cfg.small_max else cfg.large_seeds


def runs(cfg: Config) -> list[dict[str, Any]]:
    """Task × method × batch size × seed at the scaled rate, then the fixed-rate cells.

    Skipped cells (:func:`skip_reason`) are left out. Small batch sizes first, so that the long
    runs start early.
    """
    out: list[dict[str, Any]] = []
    for bs in sorted(cfg.batch_sizes):
        for task in tasks(cfg):
            for method in cfg.norms:
                if skip_reason(task, method, bs, cfg.ghost_batch) is None:
                    out += [_run(cfg, task, method, bs, s, "linear") for s in _seeds(cfg, bs)]
    for bs in sorted(b for b in cfg.lr_batch_sizes if b in cfg.batch_sizes):
        for task in tasks(cfg):
            for method in cfg.lr_norms:
                if skip_reason(task, method, bs, cfg.ghost_batch) is None:
                    # At base_batch both rules give the same rate: the scaled run is that cell.
                    if bs != cfg.base_batch:
                        out += [_run(cfg, task, method, bs, s, "none") for s in _seeds(cfg, bs)]
    return out


def skipped(cfg: Config) -> list[tuple[str, str, int, str]]:
    """``(task, method, batch size, reason)`` of every cell of the grid left out."""
    return [(t, m, bs, r) for t in tasks(cfg) for m in cfg.norms for bs in sorted(cfg.batch_sizes)
            if (r := skip_reason(t, m, bs, cfg.ghost_batch)) is not None]


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------
_TRAIN_KEYS = ("data", "model", "norm", "batch_size", "seed", "lr", "lr_scaling", "base_batch",
               "weight_decay", "model_options", "data_options", "epochs")


@register_runner("small-batch-train")
def small_batch_runner(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train one cell for ``epochs`` epochs (same samples at every batch size), evaluating once."""
    tcfg = {k: config[k] for k in _TRAIN_KEYS}
    tcfg["eval_every"] = int(config["epochs"])  # only the final evaluation: it is the metric
    probe = ShapeProbe()
    cpu0 = time.process_time()
    result = train(tcfg, log, hooks=[probe])
    probe.close()
    counts = [stat_values(s) for s in probe.shapes]
    acc = result.get("final_val_acc")
    err = 100.0 * (1.0 - acc) if acc is not None and math.isfinite(acc) else None
    if err is None and result.get("diverged"):
        err = 100.0  # a diverged net classifies nothing: count it as the failure it is
    result.update(
        val_err=err,
        cpu_time_s=time.process_time() - cpu0,
        stat_values_min=min(counts) if counts else None,
        layer_shapes=[list(s) for s in probe.shapes],
    )
    return result


# ---------------------------------------------------------------------------------------------
# Analysis helpers
# ---------------------------------------------------------------------------------------------
def errors(results: list[RunResult], task: str, method: str, bs: int, lr_scaling: str = "linear") -> list[float]:
    """Final validation errors (%) of the finished runs of one cell, in seed order."""
    by_seed = errors_by_seed(results, task, method, bs, lr_scaling)
    return [by_seed[s] for s in sorted(by_seed)]


def rate(results: list[RunResult], task: str, method: str, bs: int, lr_scaling: str = "linear") -> Interval | None:
    """Mean error (%) of a cell with its logit-scale interval (None: no finished run)."""
    e = errors(results, task, method, bs, lr_scaling)
    return rate_ci(e, n_val(results, task=task)) if e else None


def _rate_text(iv: Interval | None) -> str:
    return "n/a" if iv is None else format_interval(iv, digits=3, unit=" %")


def _sizes(results: list[RunResult], task: str, method: str, lr_scaling: str = "linear") -> list[int]:
    return sorted({int(r.config["batch_size"]) for r in select(results, task=task, method=method, lr_scaling=lr_scaling)})


def bn_gap(results: list[RunResult], cfg: Config, task: str, bs: int, lr_scaling: str = "linear") -> Interval | None:
    """BN's error at ``bs`` minus at ``normal_batch`` (points, Welch), or None without both cells."""
    a = errors(results, task, "bn", bs, lr_scaling)
    b = errors(results, task, "bn", cfg.normal_batch, lr_scaling)
    return diff_ci(a, b) if a and b else None


def _card_degrades(results: list[RunResult], cfg: Config, task: str) -> Card:
    """The largest batch size at which BN is worse than at ``normal_batch`` by > tolerance."""
    claim = f"{CLAIM_DEGRADES} [{TASK_LABELS[task]}]"
    small = [b for b in _sizes(results, task, "bn") if b < cfg.normal_batch]
    gaps = {b: g for b in small if (g := bn_gap(results, cfg, task, b)) is not None}
    if not gaps:
        return Card(NAME, claim, f"needs BN runs at batch {cfg.normal_batch} and below ({TASK_LABELS[task]})",
                    "inconclusive")
    per_bs = {b: verdict(g, "greater", cfg.tolerance) for b, g in gaps.items()}
    degraded = [b for b, v in per_bs.items() if v == "supported"]
    threshold = max(degraded) if degraded else None
    smallest = min(gaps)
    # The effect shown is the one the verdict comes from: the gap at the threshold when there is
    # one; otherwise the gap closest to supporting it (highest upper bound), which is "not
    # supported" only when every gap is.
    at = threshold if threshold is not None else max(gaps, key=lambda b: gaps[b].hi)
    v = per_bs[at]
    ref = rate(results, task, "bn", cfg.normal_batch)
    items = [f"bs {b}: {_rate_text(rate(results, task, 'bn', b))} (gap {format_interval(gaps[b])} points)"
             for b in sorted(gaps)]
    found = (f"BN is worse than at batch {cfg.normal_batch} by more than {cfg.tolerance:g} point(s) at batch "
             f"{threshold} and below" if threshold is not None and all(per_bs[b] == "supported" for b in gaps if b <= threshold)
             else f"largest batch size with a gap above {cfg.tolerance:g} point(s): {threshold}" if threshold is not None
             else f"no batch size below {cfg.normal_batch} with a gap above {cfg.tolerance:g} point(s)")
    counts = [r.metric("stat_values_min") for r in select(results, task=task, method="bn", batch_size=smallest)]
    return Card(
        NAME, claim,
        f"BN validation error at batch {cfg.normal_batch}: {_rate_text(ref)}; " + "; ".join(items)
        + f". {found}.",
        v,
        effect=gaps[at],
        effect_label=f"BN error at bs {at} − BN error at bs {cfg.normal_batch} (points)",
        details=(
            f"Gap = BN's mean error at a batch size minus at {cfg.normal_batch}, Welch 95% interval over "
            f"seeds. The threshold is the largest batch size whose gap lies entirely above +{cfg.tolerance:g} "
            "point(s); supported when there is one (the effect is its gap), not supported when every gap lies "
            "entirely below (the effect is the one with the highest upper bound), inconclusive otherwise. "
            "Each batch size is its own 95% test (no multiplicity correction: the tolerance guards against "
            "tiny differences, not against one chance crossing among several). Error rates: logit-scale "
            "intervals. At batch "
            f"{smallest} BN's smallest statistic pools {counts[0] if counts else '?'} values. Same number "
            "of samples at every batch size, linear learning-rate scaling."
        ),
    )


def _bootstrap_share(closed: tuple[list[float], list[float]], gap: tuple[list[float], list[float]],
                     n_boot: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of ``100 · (mean a − mean b) / (mean c − mean d)``.

    ``closed = (BN errors at small bs, method errors at small bs)``, ``gap = (BN at small bs,
    BN at the normal bs)``; each arm is resampled on its own (fixed generator: reproducible).
    BN's small-batch errors are the same draw in numerator and denominator.
    """
    rng = np.random.default_rng(0)
    bn_s, m_s = (np.asarray(v, float) for v in closed)
    bn_n = np.asarray(gap[1], float)
    out = []
    for _ in range(n_boot):
        a = bn_s[rng.integers(0, len(bn_s), len(bn_s))].mean()
        b = m_s[rng.integers(0, len(m_s), len(m_s))].mean()
        d = bn_n[rng.integers(0, len(bn_n), len(bn_n))].mean()
        if a - d > 0:
            out.append(100.0 * (a - b) / (a - d))
    if len(out) < n_boot // 2:
        return math.nan, math.nan
    return float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))


def _fix_on_task(results: list[RunResult], cfg: Config, task: str, method: str) -> dict[str, Any] | None:
    """Gap closed by ``method`` at the smallest batch size both it and BN ran on ``task``."""
    both = [b for b in _sizes(results, task, method) if b < cfg.normal_batch and errors(results, task, "bn", b)]
    ref = errors(results, task, "bn", cfg.normal_batch)
    if not both or not ref:
        return None
    bs = min(both)
    bn_s, m_s = errors(results, task, "bn", bs), errors(results, task, method, bs)
    gap = diff_ci(bn_s, ref)
    closed = diff_ci(bn_s, m_s)
    share = 100.0 * closed.mean / gap.mean if gap.mean > 0 else math.nan
    lo, hi = _bootstrap_share((bn_s, m_s), (bn_s, ref)) if gap.mean > 0 else (math.nan, math.nan)
    return {"task": task, "bs": bs, "gap": gap, "closed": closed, "share": share, "share_lo": lo,
            "share_hi": hi, "gap_v": verdict(gap, "greater", cfg.tolerance)}


def _card_fix(results: list[RunResult], cfg: Config, method: str) -> Card:
    """How much of BN's small-batch gap ``method`` closes, in points and in % of the gap.

    Primary task: the one (where the method runs) with BN's largest gap; the others are listed.
    """
    name = METHOD_LABELS.get(method, method)
    claim = CLAIM_FIX.format(m=name)
    found = [f for t in tasks(cfg) if (f := _fix_on_task(results, cfg, t, method)) is not None]
    if not found:
        return Card(NAME, claim, f"needs {name} and BN runs below and at batch {cfg.normal_batch}",
                    "inconclusive")
    main = max(found, key=lambda f: f["gap"].mean)
    parts = []
    for f in found:
        share = "n/a (BN has no gap)" if math.isnan(f["share"]) else (
            f"{f['share']:.0f} % [{f['share_lo']:.0f}, {f['share_hi']:.0f}] of it")
        parts.append(
            f"{TASK_LABELS[f['task']]} at bs {f['bs']}: BN's gap {format_interval(f['gap'])} points; "
            f"{name} {_rate_text(rate(results, f['task'], method, f['bs']))} vs BN "
            f"{_rate_text(rate(results, f['task'], 'bn', f['bs']))}: closes {format_interval(f['closed'])} points, {share}"
        )
    if main["gap_v"] != "supported":
        v = "inconclusive"
        why = f"BN has no gap above {cfg.tolerance:g} point(s) to close on any task where {name} runs."
    else:
        v = verdict(main["closed"], "greater", cfg.tolerance)
        why = ""
    return Card(
        NAME, claim,
        "; ".join(parts) + ". " + why,
        v,
        effect=main["closed"],
        effect_label=(f"BN error − {name} error at bs {main['bs']}, {TASK_LABELS[main['task']]} (points)"),
        details=(
            f"Gap closed = BN's error minus {name}'s at the same small batch size (Welch 95% interval, "
            f"points); as a share of BN's gap (BN at that size minus BN at {cfg.normal_batch}) with a "
            "percentile bootstrap interval over seeds: 100 % means the method at small batch matches BN "
            "at the normal batch, above 100 % that it beats it. Verdict on the task with BN's largest gap: "
            f"supported when the points closed lie above +{cfg.tolerance:g}, not supported when below; "
            "inconclusive when BN has no gap there."
            + (" Ghost BN is not compared: at batch sizes up to its virtual batch it is BN itself."
               if method == "gbn" else "")
        ),
    )


def _card_lr(results: list[RunResult], cfg: Config) -> Card:
    """BN's small-batch gap with the linear scaling rule minus with a fixed rate."""
    rows = []
    for task in tasks(cfg):
        for bs in sorted(b for b in cfg.lr_batch_sizes if b < cfg.normal_batch):
            scaled = bn_gap(results, cfg, task, bs, "linear")
            fa, fb = errors(results, task, "bn", bs, "none"), errors(results, task, "bn", cfg.normal_batch)
            if scaled is None or not fa or not fb:
                continue
            fixed = diff_ci(fa, fb)
            part = diff_ci(errors(results, task, "bn", bs, "linear"), fa)
            rows.append((task, bs, scaled, fixed, part))
    if not rows:
        return Card(NAME, CLAIM_LR, "needs BN runs at a fixed and at a scaled learning rate below batch "
                    f"{cfg.normal_batch}", "inconclusive")
    main = max(rows, key=lambda r: r[2].mean)  # where BN's (scaled) gap is largest
    task, bs, scaled, fixed, part = main
    items = []
    for t, b, s, f, p in rows:
        gn_s, gn_f = rate(results, t, "gn", b, "linear"), rate(results, t, "gn", b, "none")
        ctrl = f"; GN {_rate_text(gn_s)} scaled vs {_rate_text(gn_f)} fixed" if gn_s and gn_f else ""
        items.append(f"{TASK_LABELS[t]} bs {b}: BN's gap {format_interval(s)} points with the rule, "
                     f"{format_interval(f)} at the fixed rate (BN {_rate_text(rate(results, t, 'bn', b, 'none'))}); "
                     f"the rule's part {format_interval(p)}{ctrl}")
    p0 = TASK_PRESETS[task]["lr"]
    return Card(
        NAME, CLAIM_LR,
        "; ".join(items) + ".",
        verdict(part, "greater", cfg.tolerance),
        effect=part,
        effect_label=(f"BN error at bs {bs} with lr ∝ bs − with lr fixed at {p0:g}, "
                      f"{TASK_LABELS[task]} (points)"),
        details=(
            f"The linear rule gives batch {bs} the rate {p0:g}·{bs}/{cfg.base_batch}; the fixed arm keeps {p0:g} "
            f"at every batch size (the two coincide at {cfg.base_batch}, which both gaps use as reference). "
            "The rule's part = BN's error under the rule minus under the fixed rate at the same small batch "
            f"(Welch, points). Supported when it lies above +{cfg.tolerance:g}: the smaller scaled rate "
            "accounts for part of the degradation; not supported when below — the statistics, not the rate, "
            "are to blame (or the fixed rate is worse still). GN, with no batch statistics, is the control."
        ),
    )


def errors_by_seed(results: list[RunResult], task: str, method: str, bs: int,
                   lr_scaling: str = "linear") -> dict[int, float]:
    """``{seed: final validation error %}`` of one cell's finished runs."""
    rs = select(results, task=task, method=method, batch_size=int(bs), lr_scaling=lr_scaling)
    return {int(r.config["seed"]): float(r.metric("val_err")) for r in rs if r.metric("val_err") is not None}


def _small_errors(results: list[RunResult], task: str, method: str, sizes: list[int]) -> list[float]:
    """Per seed: the mean error over ``sizes`` (seeds that have every size)."""
    per = [errors_by_seed(results, task, method, b) for b in sizes]
    seeds = set.intersection(*(set(d) for d in per)) if per else set()
    return [float(np.mean([d[s] for d in per])) for s in sorted(seeds)]


def _small_batch_errors(results: list[RunResult], cfg: Config, task: str) -> tuple[list[int], dict[str, list[float]]]:
    """(batch sizes ≤ ``answer_max`` every method ran at, {method: errors over those cells})."""
    # Rank on the batch sizes every candidate ran at, so that each is averaged over the same
    # cells (BN-type methods skip batch 1 on the MLP: there the ranking is over 2 … answer_max).
    ran = {m: {b for b in _sizes(results, task, m) if b <= cfg.answer_max} for m in cfg.norms}
    ran = {m: bs_ for m, bs_ in ran.items() if bs_}
    sizes = sorted(set.intersection(*ran.values())) if ran else []
    per = {m: vals for m in ran if sizes and (vals := _small_errors(results, task, m, sizes))}
    return sizes, per


def ranking(results: list[RunResult], cfg: Config) -> list[Ranking]:
    """Validation error (%) of every method at small batch, per task (the report's answer to
    "what happens when the batch size changes?")."""
    out = []
    for task in tasks(cfg):
        sizes, per = _small_batch_errors(results, cfg, task)
        if per:
            out.append(Ranking(study=NAME, task=f"{TASK_LABELS[task]}, batch {', '.join(map(str, sizes))}",
                               metric="validation error", values=per, unit="%", bounds=(0.0, 100.0),
                               question="batch-size", evidence=Q_SMALL, figure="small_batch_error.png"))
    return out


def _card_answer(results: list[RunResult], cfg: Config) -> Card:
    """At batch ≤ ``answer_max``: the method with the lowest error per task, and the ties."""
    parts: list[str] = []
    for task in tasks(cfg):
        sizes, per = _small_batch_errors(results, cfg, task)
        if not per:
            continue
        order = sorted(per, key=lambda m: float(np.mean(per[m])))
        best = order[0]
        tied = [m for m in order[1:] if len(per[m]) > 1 and len(per[best]) > 1 and diff_ci(per[m], per[best]).lo <= 0]
        trials = n_val(results, task=task)
        ranking = ", ".join(f"{METHOD_LABELS.get(m, m)} {rate_ci(per[m], trials).mean:.3g} %" for m in order)
        use = METHOD_LABELS.get(best, best) + (f" (tied: {', '.join(METHOD_LABELS.get(m, m) for m in tied)})" if tied else "")
        parts.append(f"{TASK_LABELS[task]} (batch {', '.join(map(str, sizes))}): use {use}; "
                     f"best {_rate_text(rate_ci(per[best], trials))}; ranking {ranking}")
    if not parts:
        return Card(NAME, Q_SMALL, "no finished runs at small batch sizes", "answer", question=Q_SMALL)
    return Card(
        NAME, Q_SMALL,
        " | ".join(parts) + ".",
        "answer",
        question=Q_SMALL,
        answers="batch-size",
        figure="small_batch_error.png",
        details=(
            f"Per task, each method's error is averaged per seed over the batch sizes ≤ {cfg.answer_max} that "
            "every method ran at (BN, Batch Renorm and Ghost BN skip batch 1 on the MLP, Ghost BN runs only "
            "above its virtual batch and is then not a candidate); 'tied' = the Welch 95% interval of the "
            "difference to the best includes 0. Error rates with logit-scale intervals."
        ),
    )


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """Answer card, BN-degrades per task, one gap-closing card per fix, the lr-rule card."""
    cards = [_card_answer(results, cfg)]
    cards += [_card_degrades(results, cfg, t) for t in tasks(cfg)]
    cards += [_card_fix(results, cfg, m) for m in FIXES if m in cfg.norms]
    cards.append(_card_lr(results, cfg))
    return cards


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """The Group Norm paper's figure per task, and error vs values per statistic per method."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ts = [t for t in tasks(cfg) if select(results, task=t)]
    if not ts:
        return []
    return [_fig_error(results, cfg, ts, outdir), _fig_stat_values(results, cfg, ts, outdir)]


def _curve(results: list[RunResult], task: str, method: str, sizes: list[int],
           x_of: Any = None) -> tuple[list[float], list[float], list[float], list[float]]:
    xs, ys, lo, hi = [], [], [], []
    for b in sizes:
        iv = rate(results, task, method, b)
        x = b if x_of is None else x_of(task, method, b)
        if iv is None or x is None:
            continue
        xs.append(x), ys.append(iv.mean), lo.append(iv.lo), hi.append(iv.hi)
    return xs, ys, lo, hi


def _fig_error(results: list[RunResult], cfg: Config, ts: list[str], outdir: Path) -> Figure:
    sizes = sorted(cfg.batch_sizes)
    fig, axes = plotting.panels(1, len(ts), (4.6, 3.8))
    for ax, task in zip(axes[0], ts):
        for m in cfg.norms:
            xs, ys, lo, hi = _curve(results, task, m, sizes)
            if not xs:
                continue
            ax.plot(xs, ys, marker=plotting.marker(m), color=plotting.color(m), lw=1.3, ms=4,
                    label=METHOD_LABELS.get(m, m))
            plotting.band(ax, xs, lo, hi, plotting.color(m), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(b) for b in sizes])
        ax.invert_xaxis()  # as in the Group Norm paper: batch size decreasing to the right
        ax.set_xlabel("batch size (samples per step)")
        ax.set_ylabel("validation error (%)")
        ax.set_title(TASK_LABELS[task], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
    return plotting.finish(
        fig, outdir / "small_batch_error.png",
        title="Validation error vs batch size (the Group Norm paper's figure, with today's methods)",
        caption=(
            "Mean final validation error over seeds, bands = 95% intervals on the logit scale (they stay in "
            "[0, 100] %); log2 batch axis, decreasing to the right. Same number of samples at every batch "
            "size, linear learning-rate scaling. Missing points are skipped cells (BN-type methods at batch 1 "
            "on the MLP, conv-only methods on the MLP, Ghost BN at or below its virtual batch)."
        ),
    )


def _stat_count(results: list[RunResult], task: str, bs: int) -> int | None:
    """Values per batch statistic in this task's network at ``bs`` (smallest layer)."""
    for r in select(results, task=task, batch_size=int(bs)):
        if r.metric("stat_values_min"):
            return int(r.metric("stat_values_min"))
    return None


def _fig_stat_values(results: list[RunResult], cfg: Config, ts: list[str], outdir: Path) -> Figure:
    ms = [m for m in cfg.norms if any(select(results, task=t, method=m) for t in ts)]
    cols = min(3, len(ms))
    rows = math.ceil(len(ms) / cols)
    fig, axes = plotting.panels(rows, cols, (3.3, 2.7), sharex=True, sharey=True)
    fills = {"mlp": "none", "mnist1d": "full", "tiles4": "left"}
    lines = {"mlp": "--", "mnist1d": "-", "tiles4": ":"}
    for i, m in enumerate(ms):
        ax = axes[i // cols][i % cols]
        for task in ts:
            xs, ys, lo, hi = _curve(results, task, m, sorted(cfg.batch_sizes),
                                    lambda t, _m, b: _stat_count(results, t, b))
            if xs:
                ax.plot(xs, ys, marker=plotting.marker(m), color=plotting.color(m), fillstyle=fills[task],
                        ls=lines[task], lw=1.1, ms=4, label=TASK_LABELS[task])
                plotting.band(ax, xs, lo, hi, plotting.color(m), alpha=0.1)
        ax.axvline(16, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(METHOD_LABELS.get(m, m), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if i % cols == 0:
            ax.set_ylabel("val. error (%)")
        if i // cols == rows - 1:
            ax.set_xlabel("values per batch statistic")
        ax.legend(fontsize=5)
    for j in range(len(ms), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    return plotting.finish(
        fig, outdir / "small_batch_stat_values.png",
        title="Error vs values per statistic, per method",
        caption=(
            "The same runs placed by the number of values a batch statistic would pool in each network "
            "(smallest layer): N after a linear layer (MLP), N·L (MNIST-1D), N·H·W (tiles4). Only BN, Batch "
            "Renorm and Ghost BN actually pool over the batch; for the others the axis is the batch size "
            "rescaled, shown so that the per-sample methods' flat lines are the reference. Dotted line: 16."
        ),
    )
