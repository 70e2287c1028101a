"""BatchNorm across machines: is it the batch size that matters, or the batch each replica sees?

The article warns that BatchNorm over several machines needs the same batch size on each. What
data-parallel training actually changes is the batch BN's statistics are computed from: without
synchronization each of ``k`` replicas normalizes its own ``B/k`` samples; SyncBatchNorm pools the
statistics of all replicas, so the layer sees the global batch ``B`` whatever ``k`` is.

The study simulates the replicas in one process at a fixed global batch (``global_batch``, 32):
the lab's MLP on digits (where 2 samples per statistic collapse BN, ``LAB-PILOTS.md`` §2) with

* ``unsynced``: every BatchNorm layer splits its training batch into the replicas' chunks and
  normalizes each with its own statistics (:class:`ReplicaBatchNorm`); the running statistics are
  replica 0's, as DDP broadcasts rank 0's buffers; the loss is the mean over all ``B`` samples (for
  equal chunks this is DDP's averaged gradient);
* ``synced``: BatchNorm over the global batch — exactly what ``normlab.nn.SyncBatchNorm`` computes
  over ``k`` processes (``tests/test_distributed.py`` checks outputs, gradients and running
  statistics against BN on the concatenated batch), so one run stands for every ``k``;
* ``gn``: GroupNorm, which has no batch statistics (the control).

Unequal replicas (``uneven``, e.g. 30 + 2 samples) test the article's sentence itself.
Cards: unsynced BN degrades as the per-replica batch shrinks; syncing removes the effect;
unequal per-replica batches hurt unsynced BN; GroupNorm does not care.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab import functional as NF
from normlab.lab import plotting
from normlab.lab.analysis import by_seed
from normlab.lab.models import build_model
from normlab.lab.stats import Interval, diff_ci, format_interval, mean_ci, paired_diff_ci, rate_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure

NAME = "sync-bn"
TITLE = "BatchNorm across replicas: synced vs unsynced statistics"
SUMMARY = "Fixed global batch split over k simulated replicas: unsynced BN vs SyncBN vs GroupNorm."
ORDER = 35

MODEL = f"{__name__}:replica_model"
QUESTION = "BatchNorm across machines: does each machine need the same batch size?"
ARMS = ("unsynced", "synced", "gn")
#: the smallest effect (points of error) that counts as "degrades"/"hurts"
TOLERANCE = 1.0


class ReplicaBatchNorm(nn.Module):
    r"""A BatchNorm layer as ``len(splits)`` unsynchronized data-parallel replicas compute it.

    Training: the batch is cut into chunks of ``splits`` samples; chunk ``r`` is normalized with its
    own statistics, :math:`y = γ (x − μ_r)/\sqrt{σ_r^2 + ε} + β`, with the shared γ, β. Only
    replica 0 updates the running statistics (DDP broadcasts rank 0's buffers before each step).
    Eval: the wrapped layer with its running statistics.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, splits: list[int]) -> None:
        super().__init__()
        self.bn, self.splits = bn, [int(s) for s in splits]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn(x)
        if x.shape[0] != sum(self.splits):
            raise ValueError(f"input: expected a batch of {sum(self.splits)} (splits {self.splits}), "
                             f"got {x.shape[0]}")
        first, *rest = x.split(self.splits)
        if len(set(self.splits)) == 1:
            # equal replicas: one ghost-BN pass normalizes every chunk on its own (cheaper than
            # k calls); replica 0's statistics then update the running buffers, BN's rule
            with torch.no_grad():
                self.bn(first)
            return NF.ghost_batch_norm(x, self.splits[0], None, None, self.bn.weight, self.bn.bias,
                                       training=True, eps=self.bn.eps)
        out = [self.bn(first)]
        out += [NF.batch_norm(c, None, None, self.bn.weight, self.bn.bias, training=True, eps=self.bn.eps)
                for c in rest]
        return torch.cat(out)


def replica_model(*, norm: str, input_shape: Any, num_classes: int, base: str = "mlp",
                  splits: list[int] | None = None, **options: Any) -> nn.Module:
    """The lab's ``base`` model with ``norm``; with ``splits``, every BatchNorm is a
    :class:`ReplicaBatchNorm` over those replica batch sizes."""
    model = build_model(base, norm=norm, input_shape=input_shape, num_classes=num_classes, **options)
    if splits:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, ReplicaBatchNorm(child, splits))
    return model


@dataclass
class Config:
    """Full grid of the sync-bn study (``quick()`` is the small profile)."""

    replicas: tuple[int, ...] = (1, 2, 4, 8, 16)
    uneven: tuple[tuple[int, ...], ...] = ((30, 2), (28, 4))
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    global_batch: int = 32
    epochs: int = 20
    lr: float = 0.05
    data: str = "digits"
    base: str = "mlp"

    @classmethod
    def quick(cls) -> Config:
        return cls(replicas=(1, 4, 16), uneven=((30, 2),), seeds=(0, 1, 2), epochs=8)


def validate(cfg: Config) -> None:
    if cfg.global_batch < 2:
        raise ValueError(f"global_batch: expected >= 2, got {cfg.global_batch}")
    for k in cfg.replicas:
        if k < 1 or cfg.global_batch % k or cfg.global_batch // k < 2:
            raise ValueError(f"replicas: {k} must divide global_batch {cfg.global_batch} into "
                             "chunks of at least 2 samples")
    for split in cfg.uneven:
        if sum(split) != cfg.global_batch or min(split) < 2:
            raise ValueError(f"uneven: {list(split)} must add up to global_batch {cfg.global_batch} "
                             "with at least 2 samples per replica")


def _splits(k: int, cfg: Config) -> list[int]:
    return [cfg.global_batch // k] * k


def _run(cfg: Config, norm: str, splits: list[int] | None, seed: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"base": cfg.base}
    if splits and len(splits) > 1:
        opts["splits"] = list(splits)
    return {"runner": "train", "model": MODEL, "model_options": opts, "data": cfg.data, "norm": norm,
            "batch_size": cfg.global_batch, "epochs": cfg.epochs, "optimizer": "sgd", "lr": cfg.lr,
            "lr_scaling": "none", "seed": seed}


def runs(cfg: Config) -> list[dict[str, Any]]:
    out = [_run(cfg, "bn", None, s) for s in cfg.seeds]  # synced = k = 1
    out += [_run(cfg, "gn", None, s) for s in cfg.seeds]
    out += [_run(cfg, "bn", _splits(k, cfg), s) for k in cfg.replicas if k > 1 for s in cfg.seeds]
    out += [_run(cfg, "bn", list(split), s) for split in cfg.uneven for s in cfg.seeds]
    # each uneven split is compared with the even split over as many replicas
    out += [_run(cfg, "bn", _splits(len(split), cfg), s) for split in cfg.uneven
            if len(split) not in cfg.replicas for s in cfg.seeds]
    return out


def _where(norm: str, splits: list[int] | None, cfg: Config) -> dict[str, Any]:
    opts: dict[str, Any] = {"base": cfg.base}
    if splits and len(splits) > 1:
        opts["splits"] = list(splits)
    return {"norm": norm, "model_options": opts, "data": cfg.data, "batch_size": cfg.global_batch}


def _err(r: RunResult) -> float | None:
    acc = r.metric("final_val_acc")
    return None if acc is None else 100.0 * (1.0 - acc)


def _errors(results: list[RunResult], cfg: Config, norm: str, splits: list[int] | None) -> dict[int, float]:
    return by_seed(results, _err, drop_missing=True, **_where(norm, splits, cfg))


def _paired(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    common = sorted(set(a) & set(b))
    return paired_diff_ci([a[s] for s in common], [b[s] for s in common]) if len(common) >= 2 else None


def _pts(iv: Interval) -> str:
    return format_interval(iv, 3, " points")


def _err_text(e: dict[int, float]) -> str:
    """Mean error with its logit-scale 95% interval (stays inside [0, 100] %)."""
    return format_interval(rate_ci(list(e.values())), 3, " %") if e else "n/a"


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    return [_card_unsynced(results, cfg), _card_synced(results, cfg), _card_uneven(results, cfg),
            _card_gn(results, cfg)]


def _smallest(cfg: Config) -> int:
    return max(cfg.replicas)


def _details(cfg: Config) -> str:
    return (f"{cfg.base} on {cfg.data}, global batch {cfg.global_batch}, SGD lr {cfg.lr} (momentum "
            f"0.9), {cfg.epochs} epochs, {len(cfg.seeds)} seeds; replicas simulated in one process "
            "(per-replica statistics; running statistics from replica 0). Error: validation, eval "
            "mode. Intervals: 95%, paired by seed.")


def _card_unsynced(results: list[RunResult], cfg: Config) -> Card:
    k = _smallest(cfg)
    claim = ("Without synchronization BatchNorm degrades as the batch per replica shrinks, even at a "
             "fixed global batch")
    one = _errors(results, cfg, "bn", None)
    many = _errors(results, cfg, "bn", _splits(k, cfg))
    d = _paired(many, one)
    if d is None or k == 1:
        return Card(NAME, claim, "needs runs at 1 and at several replicas", "inconclusive", QUESTION,
                    details=_details(cfg))
    v = verdict(d, "greater", TOLERANCE)
    text = (f"At global batch {cfg.global_batch}: 1 replica (BN over {cfg.global_batch}) "
            f"{_err_text(one)} error; {k} replicas of {cfg.global_batch // k} unsynced "
            f"{_err_text(many)}; error({k} replicas) − error(1) = {_pts(d)}")
    return Card(NAME, claim, text + ".", v, QUESTION, effect=d, details=_details(cfg),
                effect_label=f"error with {k} unsynced replicas − error with 1 (points)")


def _card_synced(results: list[RunResult], cfg: Config) -> Card:
    k = _smallest(cfg)
    claim = "SyncBatchNorm removes it: with synchronized statistics the number of replicas does not matter"
    synced = _errors(results, cfg, "bn", None)
    many = _errors(results, cfg, "bn", _splits(k, cfg))
    d = _paired(many, synced)
    if d is None or k == 1:
        return Card(NAME, claim, "needs synced and unsynced runs", "inconclusive", QUESTION,
                    details=_details(cfg))
    v = verdict(d, "greater", TOLERANCE)
    text = (f"Synced BN over {k} replicas computes the statistics of the global batch exactly (normlab's "
            f"SyncBatchNorm equals BN on the concatenated batch to rounding), so its error is that of "
            f"BN at {cfg.global_batch}, {_err_text(synced)}, for every k; unsynced at {k} replicas: "
            f"{_err_text(many)}; the gap syncing closes: {_pts(d)}")
    return Card(NAME, claim, text + ".", v, QUESTION, effect=d, details=_details(cfg),
                effect_label=(f"error with {k} unsynced replicas − error synced "
                              "(= 1 replica, the same runs) (points)"))


def _card_uneven(results: list[RunResult], cfg: Config) -> Card:
    claim = ("Unequal batch sizes across replicas hurt BatchNorm (the article: each machine needs the "
             "same batch size) — unsynced only")
    if not cfg.uneven:
        return Card(NAME, claim, "no uneven split in this profile", "inconclusive", QUESTION)
    split = list(cfg.uneven[0])
    even = [cfg.global_batch // len(split)] * len(split)
    e_uneven = _errors(results, cfg, "bn", split)
    e_even = _errors(results, cfg, "bn", even)
    d = _paired(e_uneven, e_even)
    if d is None:
        return Card(NAME, claim, "needs uneven and even runs", "inconclusive", QUESTION, details=_details(cfg))
    v = verdict(d, "greater", TOLERANCE)
    text = (f"Unsynced replicas of {' + '.join(map(str, split))} samples: {_err_text(e_uneven)} error; "
            f"equal replicas ({' + '.join(map(str, even))}): {_err_text(e_even)}; uneven − even = {_pts(d)}. "
            f"Synced, the split changes nothing (statistics over all {cfg.global_batch} samples, "
            f"weighted by count): {_err_text(_errors(results, cfg, 'bn', None))}")
    return Card(NAME, claim, text + ".", v, QUESTION, effect=d, details=_details(cfg),
                effect_label="error with uneven − even unsynced replicas (points)")


def _card_gn(results: list[RunResult], cfg: Config) -> Card:
    claim = "GroupNorm does not depend on how the batch is split (no batch statistics)"
    gn = _errors(results, cfg, "gn", None)
    bn = _errors(results, cfg, "bn", None)
    if len(gn) < 2:
        return Card(NAME, claim, "needs gn runs", "inconclusive", QUESTION, details=_details(cfg))
    text = (f"GroupNorm's forward pass on a sample does not involve the other samples, so every split "
            f"gives the same run: {_err_text(gn)} error (BN at {cfg.global_batch}: {_err_text(bn)})")
    d = diff_ci(list(gn.values()), list(bn.values())) if len(bn) >= 2 else None
    return Card(NAME, claim, text + ".", "answer", QUESTION, effect=d, details=_details(cfg),
                effect_label=f"error, GN − BN at global batch {cfg.global_batch} (points)")


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    outdir.mkdir(parents=True, exist_ok=True)
    return [_fig_replicas(results, cfg, outdir)]


def _fig_replicas(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, ax = plotting.plt().subplots(figsize=(5.6, 3.8), dpi=100)
    ks = sorted(cfg.replicas)
    series = {
        "unsynced BN": ("bn", [_errors(results, cfg, "bn", _splits(k, cfg) if k > 1 else None) for k in ks]),
        "SyncBN": ("bn-shared", [_errors(results, cfg, "bn", None) for _k in ks]),
        "GroupNorm": ("gn", [_errors(results, cfg, "gn", None) for _k in ks]),
    }
    for name, (style, errs) in series.items():
        pts = [(k, mean_ci(list(e.values()))) for k, e in zip(ks, errs) if e]
        if not pts:
            continue
        x = [k for k, _ in pts]
        ax.plot(x, [iv.mean for _, iv in pts], marker=plotting.marker(style), color=plotting.color(style),
                ls="--" if name != "unsynced BN" else "-", label=name)
        finite = [(k, iv) for k, iv in pts if not iv.degenerate]
        if finite:
            plotting.band(ax, [k for k, _ in finite], [max(iv.lo, 0) for _, iv in finite],
                          [iv.hi for _, iv in finite], plotting.color(style))
    for split in cfg.uneven:
        e = _errors(results, cfg, "bn", list(split))
        if e:
            iv = mean_ci(list(e.values()))
            ax.errorbar([len(split)], [iv.mean], yerr=plotting.ci_yerr(iv), fmt="D", color="tab:orange",
                        capsize=3, label=f"unsynced {'+'.join(map(str, split))}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [f"{k}\n({cfg.global_batch // k}/replica)" for k in ks])
    ax.set_xlabel("replicas (samples per replica)")
    ax.set_ylabel("validation error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plotting.finish(fig, outdir / "sync_bn_replicas.png", "Error vs number of replicas",
                           f"Global batch {cfg.global_batch} split over k simulated replicas (mean, 95% CI "
                           "over seeds). Unsynced BN normalizes each replica's chunk on its own; SyncBN "
                           "and GroupNorm do not depend on k. Diamonds: unequal replicas.")
