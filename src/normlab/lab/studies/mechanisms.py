"""How normalization helps: the article's claims about its mechanisms, each measured.

Four claims, each a card (two cards for the claims with two measurable parts):

1. **Weights held in range, faster optimization** — "normalization keeps weights from exploding
   and holds them in a range, so optimization is faster". The lab's MLP (and CNN) on digits with
   ``none``, ``bn`` and ``ln``, SGD (momentum 0.9) at a normal and a high learning rate. Recorded
   per epoch by the shared hooks (:mod:`normlab.lab.hooks`): ``‖W‖`` of all conv/linear weights,
   the RMS of every hidden layer's input on a fixed probe batch, the mean gradient norm. Cards:
   the growth ``‖W‖_final / ‖W‖_init``, none / norm, at the high rate (Welch on log10, a ratio
   interval); the steps until the training loss (mean over windows of ``loss_every`` steps) first
   falls to ``loss_target``, none / norm, at the normal rate (a run that never gets there counts
   as ``steps + 1``: censored, so the ratio is conservative).
2. **Less dependence on the scale of the parameters** — "BN reduces the dependence of gradients
   on the scale of the parameters and their initial values". The same MLP with every conv/linear
   weight multiplied at init by ``init_scales`` (×0.1, ×1, ×10), with and without BN. Cards: the
   spread of the final error over the scales (max − min, points), none − BN, paired by seed; the
   gradient norm at the first step, ``|log10 ‖∇W‖(largest scale) / ‖∇W‖(smallest)|``, none − BN
   (decades), paired by seed.
3. **LN stabilizes recurrent hidden states** — the coefficient of variation over time steps of
   ``‖h_t‖`` (mean over a probe batch of validation sequences, eval mode, after training), plain
   LSTM / LN-LSTM (Welch on log10, a ratio interval), on the permuted pixel-by-pixel digits (64
   steps). ``‖c_t‖`` is recorded too: an LSTM's ``h_t`` is bounded by its tanh, its cell state is not.
4. **InstanceNorm works at test time** — the CNN trained with IN, BN (running statistics) and BN
   without running statistics (``track_running_stats=False``: eval normalizes with the statistics
   of the evaluation batch), then evaluated on the validation set in batches of ``eval_batch`` and
   one sample at a time. Cards: accuracy(batch 1) − accuracy(batched) (points) is 0 within
   ``EQUAL_TOL`` for IN and for BN with running statistics; it is not for BN without them.

Intervals: 95%, over ``seeds``; ratios on the log scale (:func:`normlab.lab.analysis.log10_diff_ci`);
differences of errors/accuracies (bounded by ±100 points) clipped to that range, which keeps the
coverage of the t-interval (the quantity cannot lie outside it). Every verdict comes from
:func:`normlab.lab.stats.verdict`; a claim made for "normalization" (cards 1) must hold for each
of BN and LN (:func:`~normlab.lab.stats.combine_verdicts`), on the first model of ``models``
(the others are shown beside it).

Cost (CPU time the runs recorded, one torch thread per run, on the shared 2-core machine while it
ran at a load average of 12-14, so wall times there were ~7× the idle ones): the full grid is 125
runs and 854 CPU-s — the 64-step LSTMs dominate (≈ 26 CPU-s per plain run, ≈ 74 per LN run),
the feed-forward runs take 1-6 CPU-s — i.e. ≈ 7-8 min with ``--workers 2`` on an idle 2-core
machine (estimated from the CPU time: the measured wall time under that load was 57 min). The
quick profile is 75 runs and ≈ 50 CPU-s (JIT compilation included), ≈ 30-35 s with 2 workers
idle (measured under the same load: 536 s). The quick profile's first three epochs are the full
grid's (same seeds, deterministic training), so the steps-to-target and first-step-gradient
effects of the MLP are the same numbers in both profiles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.lab import plotting
from normlab.lab.analysis import by_seed, log10_diff_ci, select
from normlab.lab.hooks import (
    ActivationNorms,
    GradNorms,
    HiddenStateNorms,
    LossTarget,
    WeightNorms,
    coefficient_of_variation,
    weight_tensors,
)
from normlab.lab.models import build_model
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import (
    Interval,
    combine_verdicts,
    format_interval,
    mean_ci,
    paired_diff_ci,
    verdict,
)
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure
from normlab.lab.train import TrainConfig, train

NAME = "mechanisms"
TITLE = "How normalization helps: weights, scale, recurrent states, test time"
SUMMARY = ("Weight/activation norms over training, init-scale dependence, LSTM hidden-state "
           "spread and batch-1 evaluation, with vs without normalization.")
ORDER = 65

RUNNER = "mechanisms-train"
MODEL = f"{__name__}:mechanism_model"
#: BN evaluated with the statistics of the evaluation batch (``track_running_stats=False``)
BN_NO_STATS = "bn-nostats"

CLAIM_WEIGHTS = "Normalization keeps weights from exploding and holds them in a range"
CLAIM_FASTER = "… so optimization is faster (fewer steps to the same training loss)"
CLAIM_SCALE_ERR = ("BN reduces the dependence on the scale of the parameters and their initial values: "
                   "the final error")
CLAIM_SCALE_GRAD = ("BN reduces the dependence of gradients on the scale of the parameters and their "
                    "initial values")
CLAIM_HIDDEN = "LN stabilizes the hidden states of recurrent networks"
CLAIM_TEST_TIME = ("InstanceNorm works at test time: a sample's prediction does not depend on the batch "
                   "it is evaluated in (as for BN with running statistics)")
CLAIM_NO_STATS = ("BatchNorm without running statistics does not: evaluated one sample at a time, its "
                  "accuracy changes")

#: smallest ratio (×) that counts as an effect of normalization on growth, steps or spread
RATIO_TOL = 1.25
#: smallest difference of error spreads (points) that counts
SPREAD_TOL = 1.0
#: smallest difference of gradient-scale dependence (decades) that counts
DECADES_TOL = 0.3
#: accuracy change (points) within which batch-1 and batched evaluation count as equal
EQUAL_TOL = 0.5


# --------------------------------------------------------------------------------------------
# the model: a lab model with its initial weights scaled, or BN without running statistics
# --------------------------------------------------------------------------------------------
def mechanism_model(*, norm: str, input_shape: Any, num_classes: int, base: str = "mlp",
                    init_scale: float = 1.0, running_stats: bool = True, **options: Any) -> nn.Module:
    """The lab's ``base`` model with ``norm``; every conv/linear weight multiplied by
    ``init_scale`` after its default init (biases and norm layers as built); with
    ``running_stats=False`` every BatchNorm is made as ``track_running_stats=False`` (no running
    buffers: eval normalizes with the statistics of the evaluation batch)."""
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale: expected a finite number > 0, got {init_scale!r}")
    model = build_model(base, norm=norm, input_shape=input_shape, num_classes=num_classes, **options)
    if init_scale != 1.0:
        with torch.no_grad():
            for w in weight_tensors(model):
                w.mul_(float(init_scale))
    if not running_stats:
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            raise ValueError(f"running_stats=False: norm {norm!r} has no BatchNorm layer")
        for m in bns:
            # what the constructor does with track_running_stats=False: no buffers at all
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


@torch.no_grad()
def batch_one_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
    """Accuracy of ``model`` (eval mode) on ``(x, y)`` in batches of ``batch`` and one sample at a
    time: ``acc_batched``, ``acc_batch1`` (fractions), ``batch1_diff_pts`` = 100·(acc_batch1 −
    acc_batched), ``batch1_max_abs_diff`` (largest |logit difference|) and ``batch1_agreement``
    (fraction of equal predictions)."""
    was_training = model.training
    model.eval()
    try:
        out_b = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
        out_1 = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    finally:
        model.train(was_training)
    pb, p1 = out_b.argmax(1), out_1.argmax(1)
    acc_b, acc_1 = float((pb == y).double().mean()), float((p1 == y).double().mean())
    return {"acc_batched": acc_b, "acc_batch1": acc_1, "batch1_diff_pts": 100.0 * (acc_1 - acc_b),
            "batch1_max_abs_diff": float((out_b - out_1).abs().max()),
            "batch1_agreement": float((pb == p1).double().mean())}


# --------------------------------------------------------------------------------------------
# config and runs
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    """Full grid (``quick()``: the MLP only, 3 epochs, short budgets, the 8-step LSTM task)."""

    models: tuple[str, ...] = ("mlp", "cnn")
    norms: tuple[str, ...] = ("none", "bn", "ln")
    lrs: tuple[float, ...] = (0.05, 0.5)  # normal, high (SGD, momentum 0.9, batch 32)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 8
    limit: int | None = None  # training samples of digits (None: all 1437)
    loss_target: float = 0.2
    loss_every: int = 10
    init_scales: tuple[float, ...] = (0.1, 1.0, 10.0)
    scale_models: tuple[str, ...] = ("mlp", "cnn")
    rnn_data: str = "digits-pixels-permuted"
    rnn_epochs: int = 8
    rnn_hidden: int = 64
    rnn_lr: float = 3e-3
    rnn_limit: int | None = None
    test_model: str = "cnn"
    test_epochs: int = 6
    test_limit: int | None = None
    eval_batch: int = 64
    probe: int = 256

    @classmethod
    def quick(cls) -> Config:
        # all of digits for fewer epochs rather than a subset: the weights of the unnormalized MLP
        # explode within the first ~100 steps at the high rate, and 5 seeds, as the full grid,
        # because that explosion varies a lot from seed to seed
        return cls(models=("mlp",), epochs=3, scale_models=("mlp",),
                   rnn_data="digits-rows", rnn_epochs=4, rnn_hidden=32, rnn_limit=600,
                   test_epochs=2, test_limit=300, probe=128)


def validate(cfg: Config) -> None:
    if len(cfg.lrs) != 2 or not all(v > 0 for v in cfg.lrs) or cfg.lrs[0] >= cfg.lrs[1]:
        raise ValueError(f"lrs: expected (normal, high) with 0 < normal < high, got {cfg.lrs!r}")
    if "none" not in cfg.norms or len(cfg.norms) < 2:
        raise ValueError(f"norms: expected 'none' and at least one norm, got {cfg.norms!r}")
    if not cfg.models:
        raise ValueError("models: expected at least one model")
    if len(cfg.init_scales) < 2 or min(cfg.init_scales) <= 0:
        raise ValueError(f"init_scales: expected at least two scales > 0, got {cfg.init_scales!r}")
    if len(cfg.seeds) < 2:
        raise ValueError(f"seeds: expected at least 2 seeds for an interval, got {len(cfg.seeds)}")
    for name in ("epochs", "loss_every", "rnn_epochs", "rnn_hidden", "test_epochs", "eval_batch", "probe"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _opts(limit: int | None) -> dict[str, Any]:
    return {} if limit is None else {"limit": int(limit)}


def _run(*, data: str, base: str, norm: str, seed: int, epochs: int, lr: float, optimizer: str = "sgd",
         limit: int | None = None, init_scale: float = 1.0, running_stats: bool = True,
         measure: dict[str, Any], model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    mo: dict[str, Any] = {"base": base, "init_scale": float(init_scale), **(model_options or {})}
    if not running_stats:
        mo["running_stats"] = False
    return {"runner": RUNNER, "data": data, "data_options": _opts(limit), "model": MODEL,
            "model_options": mo, "norm": norm, "seed": int(seed), "epochs": int(epochs),
            "batch_size": 32, "optimizer": optimizer, "lr": float(lr), "lr_scaling": "none",
            "measure": measure}


def _ff_measure(cfg: Config) -> dict[str, Any]:
    return {"probe": cfg.probe, "loss_target": cfg.loss_target, "loss_every": cfg.loss_every}


def _train_run(cfg: Config, base: str, norm: str, lr: float, seed: int, scale: float = 1.0) -> dict[str, Any]:
    return _run(data="digits", base=base, norm=norm, seed=seed, epochs=cfg.epochs, lr=lr, limit=cfg.limit,
                init_scale=scale, measure=_ff_measure(cfg))


def _test_arms(cfg: Config) -> list[tuple[str, str, bool]]:
    """``(arm, norm, running_stats)`` of the test-time comparison."""
    return [("in", "in", True), ("bn", "bn", True), (BN_NO_STATS, "bn", False)]


def _test_run(cfg: Config, norm: str, running: bool, seed: int) -> dict[str, Any]:
    return _run(data="digits", base=cfg.test_model, norm=norm, seed=seed, epochs=cfg.test_epochs,
                lr=cfg.lrs[0], limit=cfg.test_limit, running_stats=running,
                measure={**_ff_measure(cfg), "batch1": cfg.eval_batch})


def _rnn_run(cfg: Config, norm: str, seed: int) -> dict[str, Any]:
    return _run(data=cfg.rnn_data, base="lstm", norm=norm, seed=seed, epochs=cfg.rnn_epochs, lr=cfg.rnn_lr,
                optimizer="adam", limit=cfg.rnn_limit, model_options={"hidden": cfg.rnn_hidden},
                measure={"probe": cfg.probe, "loss_target": cfg.loss_target, "loss_every": cfg.loss_every,
                         "hidden": True})


def runs(cfg: Config) -> list[dict[str, Any]]:
    out = [_train_run(cfg, m, n, lr, s) for m in cfg.models for lr in cfg.lrs for n in cfg.norms
           for s in cfg.seeds]
    # the scale 1 runs of card 2 are card 1's at the normal rate (same config: computed once)
    out += [_train_run(cfg, m, n, cfg.lrs[0], s, scale) for m in cfg.scale_models for n in ("none", "bn")
            for scale in cfg.init_scales for s in cfg.seeds]
    out += [_rnn_run(cfg, n, s) for n in ("none", "ln") for s in cfg.seeds]
    out += [_test_run(cfg, n, running, s) for _arm, n, running in _test_arms(cfg) for s in cfg.seeds]
    unique: dict[str, dict[str, Any]] = {}
    for c in out:
        unique.setdefault(repr(sorted(c.items())), c)
    return list(unique.values())


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
class _Keep:
    """Keeps the model and data of a train() call for the measurements after it."""

    model: Any = None
    data: Any = None

    def on_train_start(self, model: Any, config: Any, data: Any) -> None:
        self.model, self.data = model, data


@register_runner(RUNNER)
def mechanisms_train(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """:func:`normlab.lab.train.train` with the norm-recording hooks, then the measurements after it.

    ``config``: TrainConfig fields plus ``measure`` = ``{"probe", "loss_target", "loss_every"}`` and
    optionally ``"batch1": B`` (:func:`batch_one_eval` with batches of B) or ``"hidden": True``
    (LSTM hidden-state norms instead of the activation norms). Adds to train()'s result:
    ``weight_norm_init``/``_final``, ``weight_growth`` (final / init), ``act_rms_init``/``_final``
    (largest hidden-layer RMS), ``grad_norm_first`` (the first step's gradient norm),
    ``loss_target_step`` (``None``: never reached), ``loss_target_steps_censored`` (``steps + 1``
    when never reached), the batch-1 metrics, ``h_norms``/``c_norms`` (profiles over t) and their
    ``h_norm_cv``/``c_norm_cv``, ``cpu_time_s``.
    """
    t0 = time.process_time()
    measure = dict(config.get("measure", {}))
    unknown = sorted(set(measure) - {"probe", "loss_target", "loss_every", "batch1", "hidden"})
    if unknown:
        raise ValueError(f"measure: unknown keys {unknown}")
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("runner", "measure")})
    probe = int(measure.get("probe", 256))
    keep, weights, grads = _Keep(), WeightNorms(), GradNorms()
    loss = LossTarget(int(measure.get("loss_every", 10)), float(measure.get("loss_target", 0.2)))
    states = HiddenStateNorms(probe) if measure.get("hidden") else None
    acts = None if states else ActivationNorms(probe)
    hooks = [keep, weights, grads, loss] + [h for h in (states, acts) if h is not None]
    result = dict(train(cfg, log, hooks=hooks))
    model, data = keep.model, keep.data
    w_final = weights.final
    result.update(
        weight_norm_init=weights.init, weight_norm_final=w_final,
        weight_growth=(w_final / weights.init) if weights.init else None,
        grad_norm_first=grads.first, loss_target_step=loss.hit,
        loss_target_steps_censored=loss.hit if loss.hit is not None else result["steps"] + 1,
    )
    if acts is not None:
        hidden_init = acts.init[:-1]
        hidden_final = acts.measure(model)[:-1]
        result.update(act_rms_init=max(hidden_init) if hidden_init else None,
                      act_rms_final=max(hidden_final) if hidden_final else None)
    if states is not None:
        h, c = states.last
        result.update(h_norms=h, c_norms=c, h_norms_init=states.init[0],
                      h_norm_cv=coefficient_of_variation(h), c_norm_cv=coefficient_of_variation(c))
    if measure.get("batch1"):
        x, y = data.val.tensors
        result.update(batch_one_eval(model, x, y, int(measure["batch1"])))
    result["cpu_time_s"] = time.process_time() - t0
    return result


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------
def _clip(iv: Interval, lo: float, hi: float) -> Interval:
    """``iv`` intersected with the range ``[lo, hi]`` the quantity cannot leave (coverage kept)."""
    return Interval(min(max(iv.mean, lo), hi), max(iv.lo, lo), min(iv.hi, hi), iv.n, iv.level)


def _where_train(cfg: Config, base: str, norm: str, lr: float, scale: float = 1.0) -> dict[str, Any]:
    c = _train_run(cfg, base, norm, lr, 0, scale)
    return {"runner": RUNNER, "norm": norm, "model_options": c["model_options"], "lr": float(lr),
            "epochs": cfg.epochs, "data_options": c["data_options"], "measure": c["measure"]}


def _err(r: RunResult) -> float | None:
    acc = r.metric("final_val_acc")
    return None if acc is None else 100.0 * (1.0 - float(acc))


def _details(cfg: Config) -> str:
    return (f"digits, batch 32, SGD (momentum 0.9), {cfg.epochs} epochs"
            f"{'' if cfg.limit is None else f' on {cfg.limit} training samples'}, {len(cfg.seeds)} seeds; "
            "‖W‖: all conv/linear weights together; 95% intervals over seeds, ratios on the log scale "
            f"(Welch on log10); a ratio counts from {RATIO_TOL}×.")


def _ratio_evidence(results: list[RunResult], cfg: Config, metric: str, lr: float, base: str,
                    norm: str) -> tuple[Interval, Interval, int, int] | None:
    none = [v for v in by_seed(results, metric, drop_missing=True, **_where_train(cfg, base, "none", lr)).values()
            if v > 0]
    other = [v for v in by_seed(results, metric, drop_missing=True, **_where_train(cfg, base, norm, lr)).values()
             if v > 0]
    if len(none) < 2 or len(other) < 2:
        return None
    log_iv, ratio = log10_diff_ci(none, other)
    return log_iv, ratio, len(none), len(other)


def _ratio_card(results: list[RunResult], cfg: Config, *, claim: str, metric: str, lr: float,
                what: str, unit_label: str, details: str) -> Card:
    norms = [n for n in cfg.norms if n != "none"]
    base = cfg.models[0]
    parts, texts = [], []
    tol = math.log10(RATIO_TOL)
    per_norm: dict[str, tuple[Interval, str]] = {}
    for norm in norms:
        ev = _ratio_evidence(results, cfg, metric, lr, base, norm)
        if ev is None:
            parts.append("inconclusive")
            texts.append(f"none / {norm}: needs finished runs")
            continue
        log_iv, ratio, _, _ = ev
        v = verdict(log_iv, "greater", tol)
        parts.append(v)
        per_norm[norm] = (ratio, v)
        texts.append(f"none / {norm} = {format_interval(ratio)}× ({v})")
    combined = combine_verdicts(parts)
    # the interval shown is one the verdict came from: the first norm whose verdict is the combined one
    order = sorted(per_norm, key=lambda n: per_norm[n][1] != combined)
    deciding_norm = order[0] if order else None
    others = []
    for m in cfg.models[1:]:
        row = []
        for norm in norms:
            ev = _ratio_evidence(results, cfg, metric, lr, m, norm)
            if ev is not None:
                row.append(f"none / {norm} {format_interval(ev[1])}×")
        if row:
            others.append(f"{m}: " + ", ".join(row))
    text = (f"{what} at lr {lr:g}, {base}: " + "; ".join(texts)
            + (". Other models (context, not in the verdict): " + "; ".join(others) if others else ""))
    if deciding_norm is None:
        return Card(NAME, claim, text + ".", "inconclusive", details=details,
                    effect_label=unit_label.format(norm="norm"))
    return Card(NAME, claim, text + ".", combined, effect=per_norm[deciding_norm][0], details=details,
                effect_label=unit_label.format(norm=deciding_norm))


def _card_weights(results: list[RunResult], cfg: Config) -> Card:
    lr_hi = cfg.lrs[1]
    ctx = []
    for lr in cfg.lrs:
        row = []
        for norm in cfg.norms:
            g = by_seed(results, "weight_growth", drop_missing=True, **_where_train(cfg, cfg.models[0], norm, lr))
            a = by_seed(results, "act_rms_final", drop_missing=True, **_where_train(cfg, cfg.models[0], norm, lr))
            if len(g) >= 2:
                row.append(f"{norm} ‖W‖ ×{format_interval(mean_ci(list(g.values())))}"
                           + (f", hidden RMS {format_interval(mean_ci(list(a.values())))}" if len(a) >= 2 else ""))
        if row:
            ctx.append(f"lr {lr:g}: " + "; ".join(row))
    details = (_details(cfg) + f" Verdict at the high rate ({lr_hi:g}) on {cfg.models[0]}: the growth "
               "‖W‖_final/‖W‖_init without normalization divided by that with it; supported when the "
               f"interval lies above {RATIO_TOL}× for every norm. Growth and the largest hidden-layer "
               "RMS (probe batch, eval mode) after training, mean [95% CI]: " + " | ".join(ctx) + ".")
    return _ratio_card(results, cfg, claim=CLAIM_WEIGHTS, metric="weight_growth", lr=lr_hi,
                       what="Growth of ‖W‖ over training (final / init)",
                       unit_label=f"‖W‖ growth (final/init), none / {{norm}}, at lr {lr_hi:g} (×)",
                       details=details)


def _card_faster(results: list[RunResult], cfg: Config) -> Card:
    lr = cfg.lrs[0]
    reached = []
    for norm in cfg.norms:
        rs = select(results, **_where_train(cfg, cfg.models[0], norm, lr))
        if rs:
            hit = sum(1 for r in rs if r.metric("loss_target_step") is not None)
            reached.append(f"{norm} {hit}/{len(rs)}")
    details = (_details(cfg) + f" Steps until the training loss, averaged over windows of {cfg.loss_every} "
               f"steps, first reaches {cfg.loss_target:g}, at the normal rate ({lr:g}); a run that never "
               "does counts as steps + 1 (a lower bound: the ratio is then conservative). Runs reaching "
               "the target: " + ", ".join(reached) + ".")
    return _ratio_card(results, cfg, claim=CLAIM_FASTER, metric="loss_target_steps_censored", lr=lr,
                       what=f"Steps to a training loss of {cfg.loss_target:g}",
                       unit_label=f"steps to a training loss of {cfg.loss_target:g}, none / {{norm}}, at lr {lr:g} (×)",
                       details=details)


def _scale_where(cfg: Config, base: str, norm: str, scale: float) -> dict[str, Any]:
    return _where_train(cfg, base, norm, cfg.lrs[0], scale)


def _per_seed_over_scales(results: list[RunResult], cfg: Config, base: str, norm: str,
                          metric: Any) -> dict[int, list[float]]:
    """``{seed: [metric at each init scale]}`` for the seeds that finished every scale."""
    by_scale = [by_seed(results, metric, drop_missing=True, **_scale_where(cfg, base, norm, s))
                for s in cfg.init_scales]
    seeds = set.intersection(*(set(d) for d in by_scale)) if by_scale else set()
    return {s: [d[s] for d in by_scale] for s in sorted(seeds)}


def _scale_details(cfg: Config) -> str:
    scales = ", ".join(f"×{s:g}" for s in cfg.init_scales)
    return (f"{cfg.scale_models[0]} on digits, every conv/linear weight scaled by {scales} after its default "
            f"init; SGD lr {cfg.lrs[0]:g} (momentum 0.9), batch 32, {cfg.epochs} epochs, {len(cfg.seeds)} "
            "seeds; paired by seed; 95% intervals.")


def _err_table(results: list[RunResult], cfg: Config, base: str) -> str:
    rows = []
    for norm in ("none", "bn"):
        cells = []
        for s in cfg.init_scales:
            e = [v for v in (_err(r) for r in select(results, **_scale_where(cfg, base, norm, s))) if v is not None]
            if e:
                cells.append(f"×{s:g} {format_interval(_clip(mean_ci(e), 0, 100), 3, ' %')}")
        if cells:
            rows.append(f"{norm}: " + ", ".join(cells))
    return "; ".join(rows)


def _card_scale_error(results: list[RunResult], cfg: Config) -> Card:
    base = cfg.scale_models[0] if cfg.scale_models else cfg.models[0]
    none = _per_seed_over_scales(results, cfg, base, "none", _err)
    bn = _per_seed_over_scales(results, cfg, base, "bn", _err)
    seeds = sorted(set(none) & set(bn))
    label = "error spread over init scales (max − min), none − BN (points)"
    if len(seeds) < 2:
        return Card(NAME, CLAIM_SCALE_ERR, "needs every init scale with and without BN", "inconclusive",
                    details=_scale_details(cfg), effect_label=label)
    sp_none = [max(none[s]) - min(none[s]) for s in seeds]
    sp_bn = [max(bn[s]) - min(bn[s]) for s in seeds]
    d = _clip(paired_diff_ci(sp_none, sp_bn), -100.0, 100.0)
    v = verdict(d, "greater", SPREAD_TOL)
    text = (f"Final validation error: {_err_table(results, cfg, base)}. Spread max − min over the scales: "
            f"none {format_interval(_clip(mean_ci(sp_none), 0, 100), 3, ' points')}, BN "
            f"{format_interval(_clip(mean_ci(sp_bn), 0, 100), 3, ' points')}; none − BN "
            f"{format_interval(d, 3, ' points')}")
    return Card(NAME, CLAIM_SCALE_ERR, text + ".", v, effect=d, effect_label=label,
                details=_scale_details(cfg) + f" Supported when none − BN lies above {SPREAD_TOL:g} point.")


def _card_scale_grad(results: list[RunResult], cfg: Config) -> Card:
    base = cfg.scale_models[0] if cfg.scale_models else cfg.models[0]
    lo, hi = min(cfg.init_scales), max(cfg.init_scales)
    label = f"|log10 ‖∇W‖(×{hi:g}) / ‖∇W‖(×{lo:g})| at the first step, none − BN (decades)"
    dep: dict[str, dict[int, float]] = {}
    ratios: dict[str, list[float]] = {}
    for norm in ("none", "bn"):
        g = _per_seed_over_scales(results, cfg, base, norm, "grad_norm_first")
        i_lo, i_hi = cfg.init_scales.index(lo), cfg.init_scales.index(hi)
        ok = {s: v for s, v in g.items() if v[i_lo] > 0 and v[i_hi] > 0 and all(map(math.isfinite, v))}
        dep[norm] = {s: abs(math.log10(v[i_hi] / v[i_lo])) for s, v in ok.items()}
        ratios[norm] = [math.log10(v[i_hi] / v[i_lo]) for v in ok.values()]
    seeds = sorted(set(dep["none"]) & set(dep["bn"]))
    if len(seeds) < 2:
        return Card(NAME, CLAIM_SCALE_GRAD, "needs every init scale with and without BN", "inconclusive",
                    details=_scale_details(cfg), effect_label=label)
    d = paired_diff_ci([dep["none"][s] for s in seeds], [dep["bn"][s] for s in seeds])
    v = verdict(d, "greater", DECADES_TOL)
    text = (f"Gradient norm of all conv/linear weights at the first step, log10 ‖∇W‖(×{hi:g}) / ‖∇W‖(×{lo:g}): "
            f"none {format_interval(mean_ci(ratios['none']))}, BN {format_interval(mean_ci(ratios['bn']))} "
            f"decades; |·| none − BN {format_interval(d, 3, ' decades')}")
    return Card(NAME, CLAIM_SCALE_GRAD, text + ".", v, effect=d, effect_label=label,
                details=_scale_details(cfg) + (
                    " Dependence = |log10| of the ratio of first-step gradient norms between the largest "
                    "and smallest scale (0: none). With BN the layers before a BN are scale-invariant, so "
                    "their gradient scales as 1/scale (the BN paper's ∂/∂(aW) = (1/a)∂/∂W): a dependence "
                    f"remains, but smaller. Supported when none − BN lies above {DECADES_TOL:g} decade."))


def _rnn_where(cfg: Config, norm: str) -> dict[str, Any]:
    c = _rnn_run(cfg, norm, 0)
    return {"runner": RUNNER, "data": cfg.rnn_data, "norm": norm, "model_options": c["model_options"],
            "epochs": cfg.rnn_epochs, "measure": c["measure"]}


def _card_hidden(results: list[RunResult], cfg: Config) -> Card:
    label = "CV of ‖h_t‖ over time steps, plain / LN (×)"
    cv = {n: list(by_seed(results, "h_norm_cv", drop_missing=True, **_rnn_where(cfg, n)).values())
          for n in ("none", "ln")}
    ccv = {n: list(by_seed(results, "c_norm_cv", drop_missing=True, **_rnn_where(cfg, n)).values())
           for n in ("none", "ln")}
    details = (f"One-layer LSTM ({cfg.rnn_hidden} units) on {cfg.rnn_data}, Adam lr {cfg.rnn_lr:g}, "
               f"{cfg.rnn_epochs} epochs, {len(cfg.seeds)} seeds. After training: mean over "
               f"{cfg.probe} validation sequences of ‖h_t‖ per step t (eval mode, from the zero state); "
               "CV = std_t / mean_t of that profile (it includes the rise from the zero initial state, "
               "which LN shortens). Welch on log10 of the CVs; supported when plain / "
               f"LN lies above {RATIO_TOL}×. h_t = o⊙tanh(c_t) is bounded for both cells; the cell "
               "state c_t is not (shown for context).")
    if min(len(v) for v in cv.values()) < 2 or min(min(v) for v in cv.values()) <= 0:
        return Card(NAME, CLAIM_HIDDEN, "needs finished plain and LN LSTM runs", "inconclusive",
                    details=details, effect_label=label)
    log_iv, ratio = log10_diff_ci(cv["none"], cv["ln"])
    v = verdict(log_iv, "greater", math.log10(RATIO_TOL))
    text = (f"CV of ‖h_t‖ over the {cfg.rnn_data} steps: plain {format_interval(mean_ci(cv['none']))}, "
            f"LN {format_interval(mean_ci(cv['ln']))}; plain / LN {format_interval(ratio)}×")
    if min(len(v) for v in ccv.values()) >= 2 and min(min(v) for v in ccv.values()) > 0:
        text += f". Cell state ‖c_t‖: plain / LN {format_interval(log10_diff_ci(ccv['none'], ccv['ln'])[1])}×"
    return Card(NAME, CLAIM_HIDDEN, text + ".", v, effect=ratio, effect_label=label, details=details)


def _test_where(cfg: Config, norm: str, running: bool) -> dict[str, Any]:
    c = _test_run(cfg, norm, running, 0)
    return {"runner": RUNNER, "norm": norm, "model_options": c["model_options"], "epochs": cfg.test_epochs,
            "data_options": c["data_options"], "measure": c["measure"]}


def _batch1(results: list[RunResult], cfg: Config, norm: str, running: bool, metric: str) -> list[float]:
    return list(by_seed(results, metric, drop_missing=True, **_test_where(cfg, norm, running)).values())


def _differs(iv: Interval, tol: float) -> str:
    """Verdict on "the effect is not 0": the mirror of ``verdict(iv, "equal", tol)``."""
    v = verdict(iv, "equal", tol)
    return {"supported": "not supported", "not supported": "supported"}.get(v, "inconclusive")


def _test_details(cfg: Config) -> str:
    return (f"{cfg.test_model} on digits, SGD lr {cfg.lrs[0]:g}, {cfg.test_epochs} epochs, {len(cfg.seeds)} "
            f"seeds; the whole validation set evaluated in eval mode in batches of {cfg.eval_batch} and "
            "one sample at a time; accuracy difference batch 1 − batched in points (95% interval, "
            "clipped to ±100).")


def _arm_text(results: list[RunResult], cfg: Config, arm: str, norm: str, running: bool) -> tuple[str, Interval | None]:
    d = _batch1(results, cfg, norm, running, "batch1_diff_pts")
    m = _batch1(results, cfg, norm, running, "batch1_max_abs_diff")
    if len(d) < 2:
        return f"{arm}: needs finished runs", None
    iv = _clip(mean_ci(d), -100.0, 100.0)
    return (f"{arm}: {format_interval(iv, 3, ' points')} (largest |logit difference| {max(m):.2g})", iv)


def _card_test_time(results: list[RunResult], cfg: Config) -> Card:
    label = "IN: accuracy at batch 1 − batched (points)"
    t_in, iv_in = _arm_text(results, cfg, "in", "in", True)
    t_bn, iv_bn = _arm_text(results, cfg, "bn (running statistics)", "bn", True)
    parts = [verdict(iv, "equal", EQUAL_TOL) if iv is not None else "inconclusive" for iv in (iv_in, iv_bn)]
    text = "Accuracy at batch 1 − batched: " + "; ".join([t_in, t_bn])
    return Card(NAME, CLAIM_TEST_TIME, text + ".", combine_verdicts(parts), effect=iv_in, effect_label=label,
                details=_test_details(cfg) + f" Supported when the interval lies within ±{EQUAL_TOL:g} point "
                "for IN and for BN with running statistics.")


def _card_no_stats(results: list[RunResult], cfg: Config) -> Card:
    label = "BN without running statistics: accuracy at batch 1 − batched (points)"
    t, iv = _arm_text(results, cfg, BN_NO_STATS, "bn", False)
    v = _differs(iv, EQUAL_TOL) if iv is not None else "inconclusive"
    return Card(NAME, CLAIM_NO_STATS, f"Accuracy at batch 1 − batched: {t}.", v, effect=iv, effect_label=label,
                details=_test_details(cfg) + " Without running statistics BN normalizes with the statistics "
                "of the evaluation batch; at batch 1 a conv layer's BN then pools one image's positions, "
                f"as InstanceNorm does. Supported when the interval lies outside ±{EQUAL_TOL:g} point.")


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    return [_card_weights(results, cfg), _card_faster(results, cfg), _card_scale_error(results, cfg),
            _card_scale_grad(results, cfg), _card_hidden(results, cfg), _card_test_time(results, cfg),
            _card_no_stats(results, cfg)]


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    outdir.mkdir(parents=True, exist_ok=True)
    return [_fig_norm_curves(results, cfg, outdir), _fig_init_scale(results, cfg, outdir),
            _fig_hidden(results, cfg, outdir), _fig_batch1(results, cfg, outdir)]


def _with_init(r: RunResult, metric: str, init_metric: str) -> list[float]:
    init = r.metric(init_metric)
    curve = [v for v in r.curve(metric) if v is not None]
    return ([float(init)] if init is not None else []) + [float(v) for v in curve]


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _fig_norm_curves(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    rows = [(m, q) for m in cfg.models for q in ("weight", "act")]
    fig, axes = plotting.panels(len(rows), len(cfg.lrs), (4.2, 3.0))
    for (model, q), ax_row in zip(rows, axes):
        for lr, ax in zip(cfg.lrs, ax_row):
            for norm in cfg.norms:
                rs = select(results, **_where_train(cfg, model, norm, lr))
                key, init = ("weight_norm", "weight_norm_init") if q == "weight" else ("act_rms", "act_rms_init")
                # norms are positive and spread over decades: geometric mean and band (log10 scale)
                band = plotting.t_band([[math.log10(max(v, 1e-30)) for v in _with_init(r, key, init)]
                                        for r in rs])
                if band is None:
                    continue
                mean, lo, hi = (10.0**a for a in band)
                x = np.arange(len(mean))
                ax.plot(x, mean, color=plotting.color(norm), marker=plotting.marker(norm), ms=3, label=norm)
                plotting.band(ax, x, lo, hi, plotting.color(norm))
            ax.set_yscale("log")
            ax.set_title(f"{model}, lr {lr:g}", fontsize=9)
            ax.set_xlabel("epoch (0 = init)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel("‖W‖ (all conv/linear weights)" if q == "weight" else "largest hidden RMS")
            _legend(ax)
    return plotting.finish(fig, outdir / "mechanisms_norm_curves.png", "Weight and activation norms over training",
                           f"Geometric mean with 95% t-band over {len(cfg.seeds)} seeds; digits, SGD, batch 32. "
                           "Hidden RMS: "
                           "the largest RMS of a hidden layer's input on a fixed probe batch, eval mode.")


def _fig_init_scale(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    models = list(cfg.scale_models) or [cfg.models[0]]
    fig, axes = plotting.panels(len(models), 2, (4.2, 3.2))
    for model, (ax_e, ax_g) in zip(models, axes):
        for norm in ("none", "bn"):
            pts_e, pts_g = [], []
            for s in cfg.init_scales:
                rs = select(results, **_scale_where(cfg, model, norm, s))
                e = [v for v in (_err(r) for r in rs) if v is not None]
                g = [v for v in (r.metric("grad_norm_first") for r in rs) if v is not None and v > 0]
                if e:
                    pts_e.append((s, _clip(mean_ci(e), 0, 100)))
                if g:
                    pts_g.append((s, mean_ci([math.log10(v) for v in g])))
            for ax, pts, log in ((ax_e, pts_e, False), (ax_g, pts_g, True)):
                if not pts:
                    continue
                xs = [s for s, _ in pts]
                ys = [10**iv.mean if log else iv.mean for _, iv in pts]
                ax.plot(xs, ys, color=plotting.color(norm), marker=plotting.marker(norm), label=norm)
                ok = [(s, iv) for s, iv in pts if not iv.degenerate]
                if ok:
                    lo = [10**iv.lo if log else iv.lo for _, iv in ok]
                    hi = [10**iv.hi if log else iv.hi for _, iv in ok]
                    plotting.band(ax, [s for s, _ in ok], lo, hi, plotting.color(norm))
        for ax in (ax_e, ax_g):
            ax.set_xscale("log")
            ax.set_xlabel("init scale of the weights")
            _legend(ax)
        ax_g.set_yscale("log")
        ax_e.set_ylabel("final validation error (%)")
        ax_g.set_ylabel("‖∇W‖ at the first step")
        ax_e.set_title(f"{model}: error", fontsize=9)
        ax_g.set_title(f"{model}: gradient norm", fontsize=9)
    return plotting.finish(fig, outdir / "mechanisms_init_scale.png", "Error and gradient norm vs init scale",
                           f"Every conv/linear weight multiplied by the scale at init; SGD lr {cfg.lrs[0]:g}. "
                           "Mean with 95% band over seeds (the gradient norm: geometric mean).")


def _fig_hidden(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, 2, (4.4, 3.2))
    for norm in ("none", "ln"):
        rs = select(results, **_rnn_where(cfg, norm))
        for ax, key in zip(axes[0], ("h_norms", "c_norms")):
            band = plotting.t_band([r.metric(key) or [] for r in rs])
            if band is None:
                continue
            mean, lo, hi = band
            x = np.arange(1, len(mean) + 1)
            ax.plot(x, mean, color=plotting.color(norm), label="LN-LSTM" if norm == "ln" else "LSTM")
            plotting.band(ax, x, lo, hi, plotting.color(norm))
    for ax, name in zip(axes[0], ("‖h_t‖", "‖c_t‖")):
        ax.set_xlabel("time step t")
        ax.set_ylabel(f"{name} (mean over sequences)")
        _legend(ax)
    return plotting.finish(fig, outdir / "mechanisms_hidden_states.png", "LSTM state norms over time",
                           f"{cfg.rnn_data}, after training; mean over {cfg.probe} validation sequences, "
                           f"95% t-band over {len(cfg.seeds)} seeds.")


def _fig_batch1(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, ax = plotting.plt().subplots(figsize=(4.8, 3.2), dpi=100)
    for i, (arm, norm, running) in enumerate(_test_arms(cfg)):
        d = _batch1(results, cfg, norm, running, "batch1_diff_pts")
        if not d:
            continue
        iv = _clip(mean_ci(d), -100.0, 100.0)
        ax.bar(i, iv.mean, color=plotting.color(arm) or "tab:cyan", yerr=plotting.ci_yerr(iv), capsize=4)
        # the value above the zero line: a bar of height 0 is otherwise invisible
        ax.annotate(f"{iv.mean:.2g}", (i, max(iv.mean, 0.0)), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(_test_arms(cfg))), [a for a, _, _ in _test_arms(cfg)])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("accuracy at batch 1 − batched (points)")
    return plotting.finish(fig, outdir / "mechanisms_batch1.png", "Evaluation one sample at a time",
                           f"{cfg.test_model} on digits; mean with 95% CI over seeds; batched = "
                           f"{cfg.eval_batch} per batch. IN and BN with running statistics give the same "
                           "predictions; BN without them does not.")
