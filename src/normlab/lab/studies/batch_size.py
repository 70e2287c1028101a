"""What happens when the batch size changes? BatchNorm vs batch-independent normalizations.

The article warns that BatchNorm's statistics become noisy with small mini-batches (and undefined
at batch size 1), and presents GroupNorm as its replacement, "independent of the batch size, with
stable accuracy over a wide range of batch sizes". The Group Norm paper's Figure 1 (ResNet-50,
ImageNet) is the reference: BN's error rises from 23.6% at 32 images per GPU to 34.7% at 2, GN
stays near 24%.

Design (see also ``/work/shared/LAB-PILOTS.md``):

* Grid: norms ``{bn, gn, ln, in, wn+mobn, none}`` × batch sizes ``{2, …, 64}`` × seeds, for a CNN
  and an MLP (``model``: ``"cnn,mlp"``, ``"cnn"`` or ``"mlp"``; the MLP has no ``in``: a linear
  layer's features have no positions to normalize over).
* Learning rate: the linear scaling rule of the Group Norm paper, ``lr = base · bs / base_batch``,
  SGD with momentum 0.9, constant rate.
* Budget: every run trains for **at least** ``epochs`` epochs (per-model preset on digits: CNN 4,
  MLP 8; an MLP step is cheaper) **and at least** ``min_steps`` optimizer steps, whichever is
  longer. A fixed number of epochs gives small batches many more updates but, with the linearly
  scaled rate, the same total "learning-rate distance" per epoch, and it left the pilots' large
  batches under-trained (non-BN nets at bs 32 after 8 epochs); a fixed number of steps gives large
  batches many more samples. With both floors every run gets near convergence; the small batches
  remain the least trained (3–4 epochs against ~18 at bs 32), so the "BN degrades" verdict is
  taken on BN's change *beyond* that of the per-sample norms (GN, LN, IN) over the same batch
  sizes, which have no batch statistics and so show the budget's share. The small-batch cells
  dominate the cost (one step at bs 2 costs about as much as one at bs 32 on a CPU).
* Metric: final validation error (%) in eval mode (BN with its running statistics), not the best
  epoch (which would select on the validation set).
* Why the model matters: BN pools its statistics over every value of a channel in the batch,
  ``N`` values after a linear layer but ``N·H·W`` after a convolution: two 8×8 images give 128
  values per statistic, two vectors give 2 (and with 2 values every normalized feature is ±1).
  The runner records the smallest such count in the network, plotted against the error.
* ``data="mnist1d"`` (MNIST-1D, generated procedurally by the ``mnist1d`` package, no download)
  is a harder task on which the methods separate more (1-D CNN with 32 channels, base lr 0.05,
  weight decay 1e-4 as in the pilots). It is expensive at batch size 2 (4 000 training samples
  → 2 000 steps per epoch): use ``limit`` for a cheaper run.
* A GroupNorm groups sweep (``G`` = powers of two dividing every conv width: 1 = LN … C = IN) at
  ``groups_batch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import plotting
from normlab.lab.analysis import n_val, select
from normlab.lab.data import load_dataset
from normlab.lab.hooks import ShapeProbe, stat_values
from normlab.lab.norms import get_norm
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import diff_ci, format_interval, mean_ci, paired_diff_ci, rate_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure, Ranking
from normlab.lab.train import train

NAME = "batch-size"
TITLE = "Batch size: BatchNorm vs batch-independent normalizations"
SUMMARY = (
    "Validation error vs batch size (2 … 64) for BN, GN, LN, IN, WN+mean-only BN and no norm, "
    "CNN and MLP (Group Norm paper, Fig. 1), plus a GroupNorm groups sweep."
)
ORDER = 20

NORMS = ("bn", "gn", "ln", "in", "wn+mobn", "none")
MODELS = ("cnn", "mlp")
#: Norms whose statistics are pooled over the batch (their noise depends on the batch size).
BATCH_NORMS = ("bn", "wn+mobn", "mobn", "wn+bn")

#: Per-data settings of the two models (from the pilots in /work/shared/LAB-PILOTS.md).
#: ``min_epochs``: the epoch floor of the budget (an MLP step is cheap, so it gets more).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {
        "cnn": {"lr": 0.1, "weight_decay": 0.0, "min_epochs": 4, "model_options": {"channels": [16, 32, 32]}},
        "mlp": {"lr": 0.05, "weight_decay": 0.0, "min_epochs": 8, "model_options": {"hidden": [128, 128]}},
    },
    "mnist1d": {
        "cnn": {"lr": 0.05, "weight_decay": 1e-4, "min_epochs": 3, "model_options": {"channels": [32, 32, 32]}},
        "mlp": {"lr": 0.05, "weight_decay": 1e-4, "min_epochs": 3, "model_options": {"hidden": [128, 128]}},
    },
}
DEFAULT_PRESET = {
    "cnn": {"lr": 0.1, "weight_decay": 0.0, "min_epochs": 4, "model_options": {}},
    "mlp": {"lr": 0.05, "weight_decay": 0.0, "min_epochs": 8, "model_options": {}},
}
#: Normalizations whose statistics are computed per sample: the control for budget effects.
PER_SAMPLE_NORMS = ("gn", "ln", "in")

Q_BATCH = "What happens when the batch size changes?"
Q_CNN = "Which normalization should a CNN use?"
Q_GROUPS = "How many groups should GroupNorm use?"
CLAIM_BN = "BatchNorm degrades at small batch sizes (its batch statistics become noisy)."
CLAIM_GN = "GroupNorm can replace BatchNorm: its error does not depend on the batch size."


@dataclass
class Config:
    """Full grid (``quick()`` is the small profile used by ``normlab demo``).

    Attributes:
        norms: normalizations compared (``in`` is skipped for the MLP).
        batch_sizes: training batch sizes.
        seeds: training seeds (init and batch order; the data split is fixed).
        data: ``digits`` (default) or ``mnist1d`` (or any data spec the lab loads; the models
            then use the default settings: CNN lr 0.1, MLP lr 0.05).
        model: ``"cnn,mlp"`` (both arms), ``"cnn"`` or ``"mlp"``.
        epochs: minimum epochs per run (None: per-model preset, CNN 4 and MLP 8 on digits);
            min_steps: minimum optimizer steps per run.
        lr: base learning rate at ``base_batch`` for both models (None: per-model preset).
        base_batch: batch size at which the base rate applies (linear scaling rule).
        normal_batch: the "normal" batch size the smallest one is compared with.
        limit: at most this many training samples (None: all).
        groups: GroupNorm groups for the sweep (None: powers of two dividing every conv width).
        groups_batch: batch size of the groups sweep.
        tolerance: smallest change of the error (percentage points) that counts as a
            degradation.
    """

    norms: tuple[str, ...] = NORMS
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    data: str = "digits"
    model: str = "cnn,mlp"
    epochs: int | None = None
    min_steps: int = 800
    lr: float | None = None
    base_batch: int = 32
    normal_batch: int = 32
    limit: int | None = None
    groups: tuple[int, ...] | None = None
    groups_batch: int = 32
    tolerance: float = 1.0

    @classmethod
    def quick(cls) -> Config:
        # The MLP only, where the full grid finds the effect (BN 2.6% → 27.9% error from batch 32
        # to 2): its statistics pool N values, so BN's degradation shows even on a small budget.
        # The CNN's full-grid verdict is inconclusive (≥ 32 values per statistic at batch 2), and
        # on a demo budget its batch-2 runs were the least trained of all (2 epochs at lr 0.006):
        # GN lost 21 points there to under-training, which made BN look *better* at small batch
        # (−15.7, the opposite of what the budget-free comparison shows). Three seeds so that an
        # interval can decide; LN beside GN so that BN's change is measured against two
        # per-sample norms — with GN as the only control and two batch sizes, BN's excess change
        # over GN *is* BN's spread minus GN's, and the two claims showed the same number.
        # 500 training images: 500 steps at batch 2 (2 epochs), 300 at batch 16 (~10 epochs).
        return cls(
            norms=("bn", "gn", "ln"),
            batch_sizes=(2, 16),
            seeds=(0, 1, 2),
            model="mlp",
            epochs=2,
            min_steps=300,
            limit=500,
        )


def _models(cfg: Config) -> list[str]:
    return [m.strip() for m in str(cfg.model).split(",") if m.strip()]


def validate(cfg: Config) -> None:
    """Reject settings the study cannot run."""
    models = _models(cfg)
    bad = [m for m in models if m not in MODELS]
    if not models or bad:
        raise ValueError(f"model must be 'cnn', 'mlp' or 'cnn,mlp', got {cfg.model!r}")
    for n in cfg.norms:
        get_norm(n)  # raises ValueError with the valid names
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 2:
        raise ValueError(f"batch_sizes must be >= 2 (BN needs two samples), got {cfg.batch_sizes}")
    if not cfg.seeds:
        raise ValueError("seeds: at least one seed is needed")
    if (cfg.epochs is not None and cfg.epochs < 1) or cfg.min_steps < 1:
        raise ValueError(f"epochs and min_steps must be >= 1, got {cfg.epochs}, {cfg.min_steps}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {cfg.tolerance}")


def _preset(cfg: Config, model: str) -> dict[str, Any]:
    base = PRESETS.get(cfg.data, DEFAULT_PRESET)[model]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    if cfg.lr is not None:
        out["lr"] = float(cfg.lr)
    if cfg.epochs is not None:
        out["min_epochs"] = int(cfg.epochs)
    return out


def conv_widths(cfg: Config) -> list[int]:
    """Channel counts of the CNN's conv layers for this data."""
    opts = _preset(cfg, "cnn")["model_options"]
    return [int(c) for c in opts.get("channels", [16, 32, 32])]


def group_choices(cfg: Config) -> list[int]:
    """``G`` values of the groups sweep (powers of two dividing every conv width, by default)."""
    if cfg.groups is not None:
        return [int(g) for g in cfg.groups]
    g = math.gcd(*conv_widths(cfg))
    return [2**k for k in range(0, int(math.log2(g)) + 1) if g % 2**k == 0]


def _run(cfg: Config, *, part: str, model: str, norm: str, bs: int, seed: int) -> dict[str, Any]:
    p = _preset(cfg, model)
    data_options: dict[str, Any] = {}
    if cfg.limit is not None:
        data_options["limit"] = int(cfg.limit)
    return {
        "runner": "batch-size-train",
        "part": part,
        "data": cfg.data,
        "model": model,
        "norm": norm,
        "batch_size": int(bs),
        "seed": int(seed),
        "lr": float(p["lr"]),
        "lr_scaling": "linear",
        "base_batch": int(cfg.base_batch),
        "weight_decay": float(p["weight_decay"]),
        "model_options": p["model_options"],
        "data_options": data_options,
        "min_epochs": int(p["min_epochs"]),
        "min_steps": int(cfg.min_steps),
    }


def runs(cfg: Config) -> list[dict[str, Any]]:
    """The full grid (model × norm × batch size × seed), then the CNN groups sweep.

    Small batch sizes first within each model, so that the long runs start early.
    """
    out: list[dict[str, Any]] = []
    for model in _models(cfg):
        norms = [n for n in cfg.norms if not (model == "mlp" and n.split("+")[-1] == "in")]
        for bs in sorted(cfg.batch_sizes):
            for norm in norms:
                for seed in cfg.seeds:
                    out.append(_run(cfg, part="grid", model=model, norm=norm, bs=bs, seed=seed))
    if "cnn" in _models(cfg):
        for g in group_choices(cfg):
            for seed in cfg.seeds:
                out.append(_run(cfg, part="groups", model="cnn", norm=f"gn:{g}", bs=cfg.groups_batch, seed=seed))
    return out


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------
_TRAIN_KEYS = (
    "data", "model", "norm", "batch_size", "seed", "lr", "lr_scaling", "base_batch", "weight_decay",
    "model_options", "data_options",
)


@register_runner("batch-size-train")
def batch_size_runner(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train one cell of the grid for ``max(min_epochs epochs, min_steps steps)``."""
    tcfg = {k: config[k] for k in _TRAIN_KEYS}
    n_train = load_dataset(config["data"], seed=0, **config["data_options"]).n_train
    bs = int(config["batch_size"])
    per_epoch = n_train // bs
    if per_epoch < 1:
        raise ValueError(f"batch_size {bs} is larger than the {n_train} training samples")
    total = max(int(config["min_epochs"]) * per_epoch, int(config["min_steps"]))
    tcfg["epochs"] = math.ceil(total / per_epoch)
    tcfg["max_steps"] = total
    # Evaluate about 20 times per run at most (the last epoch is always evaluated).
    tcfg["eval_every"] = max(1, tcfg["epochs"] // 20)
    probe = ShapeProbe()
    result = train(tcfg, log, hooks=[probe])
    probe.close()
    counts = [stat_values(s) for s in probe.shapes]
    acc = result.get("final_val_acc")
    result.update(
        val_err=100.0 * (1.0 - acc) if acc is not None else None,
        best_val_err=100.0 * (1.0 - result["best_val_acc"]) if result.get("best_val_acc") is not None else None,
        layer_shapes=[list(s) for s in probe.shapes],
        batch_stat_values_first=counts[0] if counts else None,
        batch_stat_values_min=min(counts) if counts else None,
        steps_per_epoch=per_epoch,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Analysis helpers
# ---------------------------------------------------------------------------------------------
def _err(r: RunResult) -> float | None:
    v = r.metric("val_err")
    if v is None:
        return None
    return float(v) if math.isfinite(float(v)) else 100.0


def errors(results: list[RunResult], **where: Any) -> dict[int, float]:
    """``{seed: final validation error %}`` of the finished runs matching ``where``.

    A run that diverged has its last (evaluated) error, or 100% if none is finite.
    """
    out: dict[int, float] = {}
    for r in select(results, **where):
        e = _err(r)
        if e is None and r.metric("diverged"):
            e = 100.0
        if e is not None:
            out[int(r.config["seed"])] = e
    return out


def _reference_batches(cfg: Config, results: list[RunResult], model: str) -> tuple[int | None, int | None]:
    """(smallest batch size, normal batch size) present among this model's finished grid runs."""
    have = sorted({int(r.config["batch_size"]) for r in select(results, part="grid", model=model)})
    if not have:
        return None, None
    small = have[0]
    normal = cfg.normal_batch if cfg.normal_batch in have else max((b for b in have if b <= cfg.normal_batch), default=have[-1])
    return small, normal


def _err_text(vals: dict[int, float], trials: int | None = None) -> str:
    """Mean error with its logit-scale 95% interval (stays inside [0, 100] %)."""
    if not vals:
        return "n/a"
    return format_interval(rate_ci(list(vals.values()), trials), digits=3) + "%"


def _change(results: list[RunResult], model: str, norm: str, small: int, normal: int) -> dict[int, float]:
    """Per seed: error at ``small`` minus error at ``normal`` (seeds that have both)."""
    es = errors(results, part="grid", model=model, norm=norm, batch_size=small)
    en = errors(results, part="grid", model=model, norm=norm, batch_size=normal)
    return {k: es[k] - en[k] for k in sorted(set(es) & set(en))}


def _card_degradation(results: list[RunResult], cfg: Config, model: str) -> Card:
    """BN's change of error from the normal to the smallest batch, beyond the per-sample norms'.

    Every network is further from convergence at the smallest batch size (a linearly scaled,
    smaller learning rate over the epoch floor of the budget), so part of any change is the
    budget's. The per-sample norms (GN, LN, IN), which have no batch statistics, measure that
    part on the same runs; the verdict is on BN's *excess* change, paired by seed (the seed
    fixes the initialization and batch order in every arm). Without such a control in the grid
    it falls back to BN's raw change (Welch).
    """
    small, normal = _reference_batches(cfg, results, model)
    label = f"{model.upper()} on {cfg.data}"
    claim = f"{CLAIM_BN} [{label}]"
    if small is None or small == normal:
        return Card(study=NAME, claim=claim, verdict="inconclusive",
                    measurement=f"needs BN runs at two batch sizes for the {label}")
    es = errors(results, part="grid", model=model, norm="bn", batch_size=small)
    en = errors(results, part="grid", model=model, norm="bn", batch_size=normal)
    if not es or not en:
        return Card(study=NAME, claim=claim, verdict="inconclusive",
                    measurement=f"needs finished BN runs at batch sizes {small} and {normal} ({label})")
    raw = diff_ci(list(es.values()), list(en.values()))
    nv = n_val(results, part="grid", model=model)
    bn_change = _change(results, model, "bn", small, normal)
    controls = [n for n in cfg.norms if n.split(":")[0] in PER_SAMPLE_NORMS and n != "bn"]
    per_ctrl = {n: _change(results, model, n, small, normal) for n in controls}
    per_ctrl = {n: d for n, d in per_ctrl.items() if d}
    seeds = sorted(set(bn_change).intersection(*(set(d) for d in per_ctrl.values()))) if per_ctrl else []
    text = (
        f"BN validation error at batch size {small}: {_err_text(es, nv)}; at {normal}: {_err_text(en, nv)}; "
        f"change {format_interval(raw)} points (Welch)."
    )
    if seeds:
        ctrl = [float(np.mean([per_ctrl[n][k] for n in per_ctrl])) for k in seeds]
        effect = paired_diff_ci([bn_change[k] for k in seeds], ctrl)
        text += (
            f" Change of the per-sample norms ({', '.join(per_ctrl)}) over the same batch sizes, the "
            f"part due to the budget: {format_interval(mean_ci(ctrl))} points. BN's excess change: "
            f"{format_interval(effect)} points (paired by seed, {len(seeds)} seeds)."
        )
        method = (
            "Effect = BN's change minus the mean change of the per-sample norms, per seed: what BN "
            "loses because of its batch statistics, with the budget's share removed. "
        )
        effect_label = (
            f"(error at bs {small} − error at bs {normal}), BN minus the mean of "
            f"{', '.join(n.upper() for n in per_ctrl)} (points)"
        )
    else:
        effect = raw
        method = "No per-sample norm in the grid to control for the budget: effect = BN's raw change. "
        effect_label = f"BN error at bs {small} − error at bs {normal} (points)"
    v = verdict(effect, "greater", tolerance=cfg.tolerance)
    counts = [r.metric("batch_stat_values_min") for r in select(results, part="grid", model=model, norm="bn", batch_size=small)]
    count = counts[0] if counts else None
    p = _preset(cfg, model)
    return Card(
        study=NAME,
        claim=claim,
        measurement=text,
        verdict=v,
        effect=effect,
        effect_label=effect_label,
        details=(
            method
            + f"Verdict: supported if the whole 95% interval is above +{cfg.tolerance:g} point(s), not "
            f"supported if it is entirely below. At batch size {small} each BN statistic of this network "
            f"pools as few as {count} values"
            + (" (N·H·W: the positions of an image count too, which is why a CNN's BN survives tiny "
               "batches)." if model == "cnn" else " (N: one value per sample, so the statistics are "
               "as noisy as the batch is small).")
            + f" Linear learning-rate scaling from {p['lr']:g} at batch {cfg.base_batch}; each run "
            f"trained for at least {p['min_epochs']} epoch(s) and {cfg.min_steps} steps."
        ),
    )


def _spread(results: list[RunResult], model: str, norm: str, sizes: list[int]) -> dict[int, float]:
    """Per seed: max − min of the error over ``sizes`` (seeds that have every size)."""
    per_bs = {bs: errors(results, part="grid", model=model, norm=norm, batch_size=bs) for bs in sizes}
    seeds = set.intersection(*(set(v) for v in per_bs.values())) if per_bs else set()
    return {s: max(per_bs[bs][s] for bs in sizes) - min(per_bs[bs][s] for bs in sizes) for s in sorted(seeds)}


def _card_gn(results: list[RunResult], cfg: Config, model: str) -> Card:
    label = f"{model.upper()} on {cfg.data}"
    sizes = sorted({int(r.config["batch_size"]) for r in select(results, part="grid", model=model)})
    claim = f"{CLAIM_GN} [{label}]"
    if len(sizes) < 2:
        return Card(study=NAME, claim=claim, verdict="inconclusive", measurement="needs at least two batch sizes")
    sb = _spread(results, model, "bn", sizes)
    sg = _spread(results, model, "gn", sizes)
    seeds = sorted(set(sb) & set(sg))
    if not seeds:
        return Card(study=NAME, claim=claim, verdict="inconclusive",
                    measurement=f"needs finished 'bn' and 'gn' runs at every batch size ({label})")
    a = [sb[s] for s in seeds]
    b = [sg[s] for s in seeds]
    effect = paired_diff_ci(a, b)
    v = verdict(effect, "greater")
    small, normal = _reference_batches(cfg, results, model)
    nv = n_val(results, part="grid", model=model)
    gs = errors(results, part="grid", model=model, norm="gn", batch_size=small)
    gn_ = errors(results, part="grid", model=model, norm="gn", batch_size=normal)
    bn_ = errors(results, part="grid", model=model, norm="bn", batch_size=normal)
    extra = ""
    if gn_ and bn_:
        extra = (
            f" At batch size {normal}: GN {_err_text(gn_, nv)} vs BN {_err_text(bn_, nv)} "
            f"(GN − BN {format_interval(diff_ci(list(gn_.values()), list(bn_.values())))} points);"
            f" GN at {small}: {_err_text(gs, nv)}."
        )
    return Card(
        study=NAME,
        claim=claim,
        measurement=(
            f"spread of the error across batch sizes {', '.join(map(str, sizes))} (max − min per seed): "
            f"BN {format_interval(mean_ci(a))} points, GN {format_interval(mean_ci(b))} points; "
            f"BN − GN {format_interval(effect)} (paired by seed, {len(seeds)} seeds)." + extra
        ),
        verdict=v,
        effect=effect,
        effect_label=f"max − min error over bs {', '.join(map(str, sizes))}: BN − GN (points)",
        details=(
            "Supported when BN's spread is larger than GN's with a 95% interval above 0 (GN's error "
            "depends less on the batch size). Whether GN can *replace* BN also needs GN close to BN at "
            "the normal batch size: see the GN − BN difference in the measurement. The per-seed range "
            "is inflated by noise alike for both norms; the pairing by seed removes that common part."
        ),
    )


def _card_question(results: list[RunResult], cfg: Config) -> Card:
    parts: list[str] = []
    for model in _models(cfg):
        small, normal = _reference_batches(cfg, results, model)
        if small is None:
            continue
        items = []
        nv = n_val(results, part="grid", model=model)
        for norm in cfg.norms:
            es = errors(results, part="grid", model=model, norm=norm, batch_size=small)
            en = errors(results, part="grid", model=model, norm=norm, batch_size=normal)
            if not es and not en:
                continue
            items.append(f"{norm} {_err_text(es, nv)} at bs {small} vs {_err_text(en, nv)} at bs {normal}")
        if items:
            parts.append(f"{model.upper()}: " + "; ".join(items))
    bn_cnn = [r.metric("batch_stat_values_min") for r in select(results, part="grid", model="cnn", norm="bn")]
    return Card(
        study=NAME,
        claim=Q_BATCH,
        question=Q_BATCH,
        measurement=(" | ".join(parts) or "no finished runs") + f" (validation error on {cfg.data}, mean [95% CI] over seeds).",
        verdict="answer",
        details=(
            "Batch-pooled norms (BN, mean-only BN) depend on the batch size through the number of "
            "values each statistic is computed from: N after a linear layer, N·H·W after a "
            "convolution. GN, LN and IN compute their statistics per sample and do not depend on it. "
            "At the other end, runs near chance error (≈90%) at large batch sizes did not train at "
            "the linearly scaled, large learning rate (seen without normalization and with weight "
            "norm + mean-only BN): an optimization failure, not an effect of batch statistics."
            + (f" Smallest BN statistic in the CNN: {min(v for v in bn_cnn if v)} values." if any(bn_cnn) else "")
        ),
    )


def _card_ranking(results: list[RunResult], cfg: Config) -> Card:
    sizes = sorted({int(r.config["batch_size"]) for r in select(results, part="grid", model="cnn")})
    normal_sizes = [b for b in sizes if b >= min(16, cfg.normal_batch)] or sizes[-1:]
    per_norm: dict[str, list[float]] = {}
    for norm in cfg.norms:
        by_bs = [errors(results, part="grid", model="cnn", norm=norm, batch_size=b) for b in normal_sizes]
        seeds = set.intersection(*(set(d) for d in by_bs)) if by_bs else set()
        if seeds:
            per_norm[norm] = [float(np.mean([d[s] for d in by_bs])) for s in sorted(seeds)]
    if not per_norm:
        return Card(study=NAME, claim=Q_CNN, question=Q_CNN, verdict="answer",
                    measurement="no finished CNN runs")
    order = sorted(per_norm, key=lambda n: float(np.mean(per_norm[n])))
    best = order[0]
    nv = n_val(results, part="grid", model="cnn")
    items = []
    for i, n in enumerate(order):
        text = f"{i + 1}. {n} {format_interval(rate_ci(per_norm[n], nv))}%"
        if n != best:
            d = diff_ci(per_norm[n], per_norm[best])
            tie = "tied with" if d.lo <= 0 else "worse than"
            text += f" ({tie} {best}: difference {format_interval(d)} points)"
        items.append(text)
    return Card(
        study=NAME,
        claim=Q_CNN,
        question=Q_CNN,
        measurement=(
            f"CNN on {cfg.data}, validation error averaged over batch sizes "
            f"{', '.join(map(str, normal_sizes))} (per seed), best first: " + "; ".join(items)
        ),
        verdict="answer",
        details=(
            "'tied with' = the 95% Welch interval of the difference to the best includes 0. "
            "At small batch sizes the ranking can change: see the batch-size card and figure."
        ),
    )


def _group_errors(results: list[RunResult]) -> dict[int, list[float]]:
    """``{G: [error % of each finished run]}`` of the GroupNorm groups sweep."""
    per_g: dict[int, list[float]] = {}
    for r in select(results, part="groups"):
        e = _err(r)
        if e is not None:
            per_g.setdefault(int(str(r.config["norm"]).split(":")[1]), []).append(e)
    return per_g


def _card_groups(results: list[RunResult], cfg: Config) -> Card | None:
    per_g = _group_errors(results)
    if not per_g:
        return None
    gs = sorted(per_g)
    best = min(gs, key=lambda g: float(np.mean(per_g[g])))
    nv = n_val(results, part="groups")
    items = [f"G={g}: {format_interval(rate_ci(per_g[g], nv))}%" for g in gs]
    widths = conv_widths(cfg)
    return Card(
        study=NAME,
        claim=Q_GROUPS,
        question=Q_GROUPS,
        measurement=(
            f"CNN (conv widths {widths}) at batch size {cfg.groups_batch}: " + "; ".join(items)
            + f". Lowest mean error: G={best}."
        ),
        verdict="answer",
        details=(
            "G=1 is LayerNorm over (C, H, W); G equal to the width is InstanceNorm (for the layers "
            "that wide). The Group Norm paper found G=32 best on ImageNet with a shallow optimum."
        ),
    )


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """Question card, BN-degrades and GN-independent claims per model, CNN ranking, groups."""
    cards = [_card_question(results, cfg)]
    for model in _models(cfg):
        cards.append(_card_degradation(results, cfg, model))
    for model in _models(cfg):
        cards.append(_card_gn(results, cfg, model))
    if "cnn" in _models(cfg):
        cards.append(_card_ranking(results, cfg))
        g = _card_groups(results, cfg)
        if g is not None:
            cards.append(g)
    for c in cards:  # the report quotes these in its answer to "What happens when the batch size changes?"
        if c.claim.startswith((Q_BATCH, CLAIM_BN, CLAIM_GN)):
            c.answers, c.figure = "batch-size", "batch_size_error.png"
    return cards


def ranking(results: list[RunResult], cfg: Config) -> list[Ranking]:
    """Validation error (%) of every norm per model at the normal batch size (the report's answer
    to "which norm for CNNs…") and at the smallest one (its answer on batch sizes)."""
    out = []
    for model in _models(cfg):
        small, normal = _reference_batches(cfg, results, model)
        for bs, question in ((normal, "architecture"), (small, "batch-size")):
            if bs is None or (question == "batch-size" and bs == normal):
                continue
            values = {n: list(errors(results, part="grid", model=model, norm=n, batch_size=bs).values())
                      for n in cfg.norms}
            out.append(Ranking(
                study=NAME, task=f"{model.upper()} on {cfg.data}, batch {bs}", metric="validation error",
                values=values, unit="%", bounds=(0.0, 100.0), question=question,
                evidence=Q_BATCH,  # the card that gives these very numbers (bs small vs normal)
                figure="batch_size_error.png",
            ))
    return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _ci_points(vals: list[float]) -> tuple[float, float, float]:
    """(mean, lower bar, upper bar) for a log-scale plot: the interval is cut at mean/5 and 100%."""
    iv = mean_ci(vals)
    lo = iv.lo if math.isfinite(iv.lo) else iv.mean
    hi = iv.hi if math.isfinite(iv.hi) else iv.mean
    lo = max(lo, iv.mean / 5.0)
    hi = min(hi, 100.0)
    return iv.mean, max(iv.mean - lo, 0.0), max(hi - iv.mean, 0.0)


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """Error vs batch size (per model), error vs values per BN statistic, groups sweep."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    figs: list[Figure] = []
    models = [m for m in _models(cfg) if select(results, part="grid", model=m)]
    if models:
        figs += [_fig_error(results, cfg, models, outdir), _fig_stat_values(results, cfg, outdir)]
    if select(results, part="groups"):
        figs.append(_fig_groups(results, cfg, outdir))
    return figs


def _error_points(results: list[RunResult], cfg: Config, model: str, norm: str,
                  x_of: Any) -> tuple[list[Any], list[float], list[float], list[float]]:
    """(x, mean error, lower bar, upper bar) over the batch sizes; ``x_of(bs, runs)`` places a
    batch size on the x axis (``None``: leave it out)."""
    xs, ys, lo, hi = [], [], [], []
    for bs in sorted(cfg.batch_sizes):
        e = errors(results, part="grid", model=model, norm=norm, batch_size=bs)
        x = x_of(bs, select(results, part="grid", model=model, norm=norm, batch_size=bs)) if e else None
        if x is not None:
            m, a, b = _ci_points(list(e.values()))
            xs.append(x), ys.append(m), lo.append(a), hi.append(b)
    return xs, ys, lo, hi


def _fig_error(results: list[RunResult], cfg: Config, models: list[str], outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, len(models), (5.2, 3.9))
    for ax, model in zip(axes[0], models):
        for norm in cfg.norms:
            xs, ys, lo, hi = _error_points(results, cfg, model, norm, lambda bs, _runs: bs)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=plotting.marker(norm), color=plotting.color(norm),
                            capsize=3, lw=1.2, ms=4, label=norm)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(cfg.batch_sizes))
        ax.set_xticklabels([str(b) for b in sorted(cfg.batch_sizes)])
        ax.invert_xaxis()  # as in the Group Norm paper: large batches on the left
        plotting.plain_log_yaxis(ax)
        ax.set_xlabel("batch size (images per step)")
        ax.set_ylabel("validation error (%)")
        ax.set_title(f"{model.upper()} on {cfg.data}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return plotting.finish(fig, outdir / "batch_size_error.png",
        title="Validation error vs batch size",
        caption=(
            "Mean final validation error over seeds with 95% intervals (log scale; bars cut at a fifth "
            "of the mean and at 100%), batch size "
            "decreasing to the right as in the Group Norm paper's Figure 1. Linear learning-rate "
            "scaling; every run gets at least the same epochs and the same steps."
        ),
    )


def _stat_count(_bs: int, runs: list[RunResult]) -> int | None:
    counts = [r.metric("batch_stat_values_min") for r in runs if r.metric("batch_stat_values_min")]
    return counts[0] if counts else None


def _fig_stat_values(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, ax = plotting.plt().subplots(figsize=(5.6, 3.9), dpi=100)
    for model, face in (("cnn", "full"), ("mlp", "none")):
        for norm in [n for n in cfg.norms if n in BATCH_NORMS]:
            xs, ys, lo, hi = _error_points(results, cfg, model, norm, _stat_count)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=plotting.marker(norm), color=plotting.color(norm),
                            fillstyle=face, capsize=3, lw=1.0, ls="-" if model == "cnn" else "--", ms=5,
                            label=f"{norm}, {model.upper()}")
    ax.set_xscale("log", base=2)
    plotting.plain_log_yaxis(ax)
    ax.set_xlabel("values per batch statistic (smallest layer): N (MLP), N·H·W (CNN)")
    ax.set_ylabel("validation error (%)")
    ax.set_title("batch-pooled norms: error vs sample size of their statistics", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return plotting.finish(fig, outdir / "batch_size_stat_values.png",
        title="Error vs number of values per BN statistic",
        caption=(
            "The same runs as the batch-size figure for the batch-pooled norms, placed by the number "
            "of values their smallest statistic is computed from. An MLP's BN at batch 2 averages "
            "2 values; a CNN's averages 2·H·W, so it degrades much later."
        ),
    )


def _fig_groups(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    per_g = _group_errors(results)
    fig, ax = plotting.plt().subplots(figsize=(5, 3.5), dpi=100)
    gs = sorted(per_g)
    pts = [_ci_points(per_g[g]) for g in gs]
    ax.errorbar(gs, [p[0] for p in pts], yerr=[[p[1] for p in pts], [p[2] for p in pts]],
                marker=plotting.marker("gn"), color=plotting.color("gn"), capsize=3, label="GroupNorm")
    bn = errors(results, part="grid", model="cnn", norm="bn", batch_size=cfg.groups_batch)
    if bn:
        ax.axhline(float(np.mean(list(bn.values()))), color=plotting.color("bn"), ls="--", lw=1,
                   label="BN (same batch)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(gs)
    ax.set_xticklabels([str(g) for g in gs])
    ax.set_xlabel("groups G (1 = LayerNorm, C = InstanceNorm)")
    ax.set_ylabel("validation error (%)")
    ax.set_title(f"GroupNorm groups, CNN, batch {cfg.groups_batch}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return plotting.finish(fig, outdir / "batch_size_groups.png",
        title="GroupNorm: number of groups",
        caption="Mean validation error over seeds with 95% intervals for each number of groups.",
    )
