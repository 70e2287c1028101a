"""RNN study: plain LSTM vs layer-, batch- and weight-normalized LSTMs on sequential digits.

What it measures
----------------
* **Accuracy** of an LSTM classifier (:mod:`normlab.lab.models.recurrent`, one layer of ``hidden``
  units, linear head on the last hidden state) with the cells ``none`` (plain LSTM), ``ln``
  (LayerNorm-LSTM, Ba et al. 2016), ``bn`` (BatchNorm-LSTM with per-step statistics and γ = 0.1,
  Cooijmans et al. 2016) and ``wn`` (weight-normalized LSTM, Salimans & Kingma 2016) on

  - ``digits-rows``: the 8×8 digits read row by row (8 steps × 8 features), and
  - ``digits-pixels-permuted``: read pixel by pixel in a fixed random order (64 steps × 1), the
    small-scale analogue of the papers' permuted sequential MNIST;
  - optionally ``mnist1d`` (``--data mnist1d``: 40 steps × 1, generated locally by the
    ``mnist1d`` package; slower: 4000 training sequences).

  Every run trains with Adam at a constant rate, batch 32, for ``epochs`` epochs and evaluates
  the validation accuracy after each epoch (eval mode: BN uses its running statistics). Per norm
  and data set: validation-accuracy curves (mean with a 95% t-band over seeds), the final
  accuracy with its 95% CI over seeds, the mean accuracy over the epochs (an uncensored "speed"
  summary: the area under the curve), and the **epochs to reach** ``target_acc`` (90%).

  Censoring rule for epochs-to-target: a run that never reaches the target within its epochs
  (or diverges) counts as ``epochs + 1`` — a lower bound of its true value — and the cards say
  how many runs reached the target. A difference computed on censored values is biased toward
  zero (conservative), and if both arms are fully censored it carries no information.

* **Shared vs per-step BN statistics** (``shared_stats``): the BN-LSTM with one set of running
  statistics for all steps (``stats_steps=1``) against per-step statistics, on the first data
  set. Training is identical (each step is normalized by its own batch statistics in both; the
  same seed gives the same weights and batches), so the comparison isolates the statistics used
  at evaluation — which is what "separate statistics per time step" changes once trained.
  Paired by seed.

* **Gradient flow** (Cooijmans et al. 2016, Fig. 1; runner ``rnn-gradflow``): for a BN-LSTM
  with γ initialized to 0.1 and to 1.0 (and reference cells), on ``grad_data`` (64-step permuted
  pixels), the norms ``‖∂L/∂h_t‖`` of the loss of the last step's prediction with respect to
  every hidden state, in train mode (batch statistics, as during training), at initialization
  (averaged over ``grad_batches`` batches) and after every ``grad_check_every`` of
  ``grad_train_steps`` Adam steps. The summary is ``log10(‖∂L/∂h_1‖ / ‖∂L/∂h_T‖)``: negative =
  gradients vanish on their way back to the first step, positive = they grow (explode). Paired
  by seed (same seed = same weights and batches; only γ differs).

  Caveat, visible in the profile figure: the first permuted pixel is (almost) always 0, so the
  BN-LSTM's first state has (almost) no variance over the batch and the batch norm of the next
  step amplifies its gradient by ``γ/sqrt(eps)``; the h_1 value includes that spike.

Cards: the question "Which normalization for RNNs?" (ranking by final accuracy, with CIs), and
the claims "LN works better than BN in RNNs", "BN in RNNs needs separate statistics per time
step", "small γ init preserves gradient flow in BN-LSTM" (two cards: the paper's direction,
vanishing with γ = 1, and the balance |log10 ratio|). All verdicts are computed from the CIs by
:mod:`normlab.lab.stats`; see :func:`analyze` for the rules.

Cost (CPU time recorded by the runs, one torch and one numba thread per worker; the LSTMs run
a Python loop over time steps and a BN/LN step costs about 3.5× a plain one): the full grid is
39 runs and ≈ 585 CPU-s — on the 64-step task ≈ 55 s per LN/BN run and ≈ 16 s per plain/WN run
(15 epochs, 1438 sequences, ``hidden=64``: sized for this budget), 2-8 s per row-task run,
2.5-8 s per gradient check — i.e. ≈ 5 min wall with 2 workers on an idle 2-core machine. The quick
profile (``digits-rows`` only, 2 seeds, 6 epochs on 800 training samples, a 10-step gradient
check) is 18 runs and ≈ 24 CPU-s. ``--data mnist1d`` costs about 1.7× the pixel task per epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from normlab.lab import plotting
from normlab.lab.analysis import by_seed, n_val, pct, ratio_interval, select
from normlab.lab.data import load_dataset
from normlab.lab.models import build_model, needs_data_init
from normlab.lab.models import recurrent as rnn_models
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import (
    Interval,
    diff_ci,
    format_interval,
    mean_ci,
    paired_diff_ci,
    rate_ci,
    scale_interval,
    verdict,
)
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure, Ranking
from normlab.lab.train import seed_everything, train
from normlab.nn.utils import init_weight_norm_

NAME = "rnn"
TITLE = "Normalization in recurrent networks (LSTM)"
SUMMARY = (
    "Plain vs layer-, batch- and weight-normalized LSTMs on row-wise and permuted pixel-wise "
    "digits; per-step BN statistics; γ init and gradient flow in the BN-LSTM."
)
ORDER = 40

NORMS: tuple[str, ...] = ("none", "ln", "bn", "wn")
SHARED_ARM = "bn-shared"

QUESTION = "Which normalization for RNNs?"
CLAIM_LN_BN = "LN works better than BN in RNNs."
CLAIM_SHARED = "BN in RNNs needs separate statistics per time step."
CLAIM_GAMMA = (
    "Small γ init preserves gradient flow in BN-LSTM: with γ = 1 the gradient vanishes on its "
    "way back to early time steps (saturation), with γ = 0.1 it does not."
)
CLAIM_GAMMA_BALANCE = (
    "Small γ init keeps the BN-LSTM's gradient norm closer to constant across time steps "
    "(neither vanishing nor exploding) than γ = 1."
)


@dataclass
class Config:
    """Full grid of the RNN study (``quick()`` is the small profile used by ``normlab demo``)."""

    norms: tuple[str, ...] = NORMS
    data: tuple[str, ...] = ("digits-rows", "digits-pixels-permuted")
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 15
    hidden: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    limit: int | None = None  # training samples per data set (None = all)
    val_limit: int | None = None
    target_acc: float = 0.9
    shared_stats: bool = True  # BN with one set of running statistics, on data[0]
    # Gradient-flow check (runner "rnn-gradflow").
    grad_data: str = "digits-pixels-permuted"
    grad_gammas: tuple[float, ...] = (0.1, 1.0)
    grad_refs: tuple[str, ...] = ("none", "ln")
    grad_batches: int = 4
    grad_batch_size: int = 64
    grad_train_steps: int = 60
    grad_check_every: int = 20

    @classmethod
    def quick(cls) -> Config:
        return cls(
            data=("digits-rows",),
            seeds=(0, 1),
            epochs=6,
            limit=800,
            val_limit=300,
            grad_refs=("none", "ln"),
            grad_batches=2,
            grad_train_steps=10,
            grad_check_every=10,
        )


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def _datasets(cfg: Config) -> tuple[str, ...]:
    """``cfg.data`` as a tuple (the CLI may give a single name)."""
    data = cfg.data
    return (data,) if isinstance(data, str) else tuple(data)


def validate(cfg: Config) -> None:
    """Reject settings the runners cannot handle, before anything runs."""
    bad = [n for n in cfg.norms if n not in rnn_models.LSTM_NORMS]
    if bad or not cfg.norms:
        raise ValueError(
            f"norms {list(bad) or '(none)'} have no LSTM cell; this study knows {', '.join(NORMS)}"
        )
    if not _datasets(cfg):
        raise ValueError("needs at least one data set")
    if not cfg.seeds:
        raise ValueError("needs at least one seed")
    for name in ("epochs", "hidden", "batch_size", "grad_batches", "grad_batch_size", "grad_check_every"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(cfg.grad_train_steps, int) or cfg.grad_train_steps < 0:
        raise ValueError(f"grad_train_steps must be an int >= 0, got {cfg.grad_train_steps!r}")
    if not 0.0 < cfg.target_acc <= 1.0:
        raise ValueError(f"target_acc must be in (0, 1], got {cfg.target_acc!r}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
    if any(not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0) for g in cfg.grad_gammas):
        raise ValueError(f"grad_gammas must be finite numbers > 0, got {cfg.grad_gammas!r}")
    bad_refs = [n for n in cfg.grad_refs if n not in rnn_models.LSTM_NORMS]
    if bad_refs:
        raise ValueError(f"grad_refs {bad_refs} have no LSTM cell; use some of {', '.join(NORMS)}")


def _train_run(cfg: Config, data: str, norm: str, seed: int, arm: str, **model_options: Any) -> dict[str, Any]:
    data_options: dict[str, Any] = {}
    if cfg.limit is not None:
        data_options["limit"] = int(cfg.limit)
    if cfg.val_limit is not None:
        data_options["val_limit"] = int(cfg.val_limit)
    return {
        "runner": "rnn-train",
        "arm": arm,
        "data": data,
        "model": rnn_models.MODEL_NAME,
        "norm": norm,
        "batch_size": int(cfg.batch_size),
        "epochs": int(cfg.epochs),
        "optimizer": "adam",
        "lr": float(cfg.lr),
        "lr_scaling": "none",
        "seed": int(seed),
        "data_seed": 0,
        "val_fraction": 0.2,
        "data_options": data_options,
        "model_options": {"hidden": int(cfg.hidden), **model_options},
    }


def _grad_arms(cfg: Config) -> list[tuple[str, str, float | None]]:
    """``(arm, norm, gamma_init)`` of the gradient-flow check."""
    arms: list[tuple[str, str, float | None]] = [
        (f"bn-g{float(g):g}", "bn", float(g)) for g in cfg.grad_gammas
    ]
    arms += [(ref, ref, None) for ref in cfg.grad_refs if ref != "bn"]
    return arms


def runs(cfg: Config) -> list[dict[str, Any]]:
    """Training runs (data × norm × seed, plus the shared-statistics BN arm) and gradient checks."""
    out: list[dict[str, Any]] = []
    datasets = _datasets(cfg)
    for data in datasets:
        for norm in cfg.norms:
            for seed in cfg.seeds:
                out.append(_train_run(cfg, data, norm, seed, norm))
    if cfg.shared_stats and "bn" in cfg.norms:
        for seed in cfg.seeds:
            out.append(_train_run(cfg, datasets[0], "bn", seed, SHARED_ARM, stats_steps=1))
    for arm, norm, gamma in _grad_arms(cfg):
        for seed in cfg.seeds:
            out.append(
                {
                    "runner": "rnn-gradflow",
                    "arm": arm,
                    "data": cfg.grad_data,
                    "norm": norm,
                    "gamma_init": gamma,
                    "hidden": int(cfg.hidden),
                    "batch_size": int(cfg.grad_batch_size),
                    "batches": int(cfg.grad_batches),
                    "train_steps": int(cfg.grad_train_steps),
                    "check_every": int(cfg.grad_check_every),
                    "lr": float(cfg.lr),
                    "seed": int(seed),
                    "data_seed": 0,
                    "val_fraction": 0.2,
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------
@register_runner("rnn-train")
def rnn_train(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """:func:`normlab.lab.train.train` on the study's LSTM (``arm`` is a label only).

    Defined here (not the built-in ``train`` runner) so that sweep workers import this module,
    which registers the ``lstm`` model. Adds ``cpu_time_s`` (process CPU time of the run).
    """
    t0 = time.process_time()
    result = train({k: v for k, v in config.items() if k not in ("runner", "arm")}, log)
    result["cpu_time_s"] = time.process_time() - t0
    return result


def _log10(x: float) -> float:
    return math.log10(max(x, 1e-30))  # floor: a gradient that underflowed to 0 -> -30


def grad_norms(model: Any, x: Any, y: Any) -> list[float]:
    """``‖∂L/∂h_t‖`` for t = 1..T (Frobenius norm over the batch), L = cross-entropy of the
    prediction from ``h_T``, in the model's current mode.

    The LSTM is run one step at a time (``lstm(x[:, t:t+1], (h, c))``) so that every h_t is a
    tensor of the graph; in train mode each call normalizes with that step's batch statistics,
    exactly as the full forward does (running statistics are saved and restored around it).
    """
    lstm = model.lstm
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    n, steps = x.shape[0], x.shape[1]
    h = torch.zeros(lstm.num_layers, n, lstm.hidden_size, dtype=x.dtype)
    c = torch.zeros_like(h)
    states = []
    for t in range(steps):
        _, (h, c) = lstm(x[:, t : t + 1], (h, c))
        states.append(h)
    loss = F.cross_entropy(model.head(h[-1]), y)
    grads = torch.autograd.grad(loss, states)
    if buffers:
        model.load_state_dict(buffers, strict=False)
    return [float(g.norm()) for g in grads]


@register_runner("rnn-gradflow")
def rnn_gradflow(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Gradient norms ``‖∂L/∂h_t‖`` of an LSTM classifier at init and during early training.

    Logs one entry per checkpoint (step 0 = initialization, then every ``check_every`` Adam
    steps): ``step``, ``log10_ratio`` = mean over the measurement batches of
    ``log10(‖∂L/∂h_1‖ / ‖∂L/∂h_T‖)`` and ``profile`` (mean log10 ‖∂L/∂h_t‖ per step).
    """
    t0, w0 = time.process_time(), time.perf_counter()
    data = load_dataset(
        config["data"], seed=int(config["data_seed"]), val_fraction=float(config["val_fraction"])
    )
    x_all, y_all = data.train.tensors
    seed = int(config["seed"])
    seed_everything(seed)
    options: dict[str, Any] = {"hidden": int(config["hidden"])}
    if config.get("gamma_init") is not None:
        options["gamma_init"] = float(config["gamma_init"])
    model = build_model(
        rnn_models.MODEL_NAME,
        norm=config["norm"],
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        **options,
    )
    gen = torch.Generator().manual_seed(seed)
    bs = min(int(config["batch_size"]), len(y_all))
    if needs_data_init(model):
        idx = torch.randperm(len(y_all), generator=gen)[:256]
        init_weight_norm_(model, x_all[idx])
    measure = [torch.randperm(len(y_all), generator=gen)[:bs] for _ in range(int(config["batches"]))]
    model.train()

    def checkpoint(step: int) -> dict[str, Any]:
        profiles = [[_log10(v) for v in grad_norms(model, x_all[i], y_all[i])] for i in measure]
        prof = np.mean(np.asarray(profiles), axis=0)
        ratios = [p[0] - p[-1] for p in profiles]
        return {"step": step, "log10_ratio": float(np.mean(ratios)), "profile": prof.tolist()}

    points = [checkpoint(0)]
    log(0, points[-1])
    opt = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    every, total = int(config["check_every"]), int(config["train_steps"])
    losses: list[float] = []
    for step in range(1, total + 1):
        idx = torch.randperm(len(y_all), generator=gen)[:bs]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == total:
            points.append(checkpoint(step))
            points[-1]["train_loss"] = float(np.mean(losses[-every:]))
            log(len(points) - 1, points[-1])
    early = [p["log10_ratio"] for p in points[1:]] or [points[0]["log10_ratio"]]
    return {
        "log10_ratio_init": points[0]["log10_ratio"],
        "log10_ratio_early": float(np.mean(early)),
        "log10_ratio_last": points[-1]["log10_ratio"],
        "profile_init": points[0]["profile"],
        "profile_last": points[-1]["profile"],
        "steps": total,
        "seq_len": int(data.input_shape[0]),
        "cpu_time_s": time.process_time() - t0,
        "total_time_s": time.perf_counter() - w0,
    }


# --------------------------------------------------------------------------------------------
# analysis helpers
# --------------------------------------------------------------------------------------------
def epochs_to_target(result: RunResult, target: float) -> tuple[float, bool]:
    """(epochs to reach ``val_acc >= target``, reached?) of a run; never reached -> ``E + 1``.

    ``E`` is the configured number of epochs (a diverged run stopped early is censored too).
    """
    for entry in result.epochs:
        acc = entry.get("val_acc")
        if acc is not None and acc >= target:
            return float(entry["epoch"]), True
    return float(int(result.config.get("epochs", len(result.epochs))) + 1), False


def _acc_auc(result: RunResult) -> float | None:
    """Mean validation accuracy over the evaluated epochs (area under the accuracy curve)."""
    accs = [a for a in result.curve("val_acc") if a is not None]
    return float(np.mean(accs)) if accs else None


def _final_acc(r: RunResult) -> float | None:
    v = r.metric("final_val_acc")
    return None if v is None else float(v)


def _fmt_pp(iv: Interval) -> str:
    return pct(iv, 2, " pp")


def _combine(verdicts: list[str]) -> str:
    """One verdict from per-task verdicts: a direction found on some task and contradicted on
    none wins; supported on one task and not supported on another is inconclusive."""
    decided = {v for v in verdicts if v != "inconclusive"}
    return decided.pop() if len(decided) == 1 else "inconclusive"


_SEQ_LEN = {
    "digits-rows": 8,
    "digits-pixels": 64,
    "digits-pixels-permuted": 64,
    "mnist1d": 40,
}


def _primary(datasets: list[str], results: list[RunResult]) -> str | None:
    """The data set with the longest sequences among those with finished training runs
    (the first one listed on ties or unknown lengths)."""
    present = [d for d in datasets if select(results, runner="rnn-train", data=d)]
    if not present:
        return None
    return max(present, key=lambda d: (_SEQ_LEN.get(d, 0), -present.index(d)))


def _ranking(results: list[RunResult], data: str, norms: tuple[str, ...]) -> list[tuple[str, list[float]]]:
    """``(norm, final accuracies)`` sorted by mean final accuracy, best first."""
    rows = []
    for norm in norms:
        vals = list(by_seed(results, _final_acc, drop_missing=True, runner="rnn-train", data=data, arm=norm).values())
        if vals:
            rows.append((norm, vals))
    return sorted(rows, key=lambda kv: -float(np.mean(kv[1])))


def ranking(results: list[RunResult], cfg: Config) -> list[Ranking]:
    """Final validation accuracy (%) of every cell per data set, for the report's answers."""
    return [
        Ranking(study=NAME, task=f"LSTM on {data}", metric="final validation accuracy",
                values={norm: [100 * v for v in vals] for norm, vals in _ranking(results, data, tuple(cfg.norms))},
                lower_is_better=False, unit="%", bounds=(0.0, 100.0), question="architecture",
                evidence=QUESTION, figure="rnn_final_accuracy.png")
        for data in _datasets(cfg)
    ]


# --------------------------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------------------------
def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """The question card and the claim cards (rules in each card's details)."""
    return [
        _card_question(results, cfg),
        _card_ln_bn(results, cfg),
        _card_shared(results, cfg),
        _card_gamma(results, cfg),
        _card_gamma_balance(results, cfg),
    ]


def _card_question(results: list[RunResult], cfg: Config) -> Card:
    """Which normalization for RNNs? A ranking by final accuracy, per data set."""
    datasets = list(_datasets(cfg))
    target = float(cfg.target_acc)
    tpct = f"{target * 100:g}%"
    primary = _primary(datasets, results)
    cpu = sum(float(r.metric("cpu_time_s") or 0.0) for r in results if r.done)
    lines, effect, effect_label = [], None, ""
    answer = "no finished training runs"
    for data in datasets:
        ranked = _ranking(results, data, tuple(cfg.norms))
        if not ranked:
            continue
        nv = n_val(results, runner="rnn-train", data=data)
        parts = []
        for norm, vals in ranked:
            ett = [epochs_to_target(r, target) for r in select(results, runner="rnn-train", data=data, arm=norm)]
            reached = sum(ok for _, ok in ett)
            ett_iv = mean_ci([e for e, _ in ett])
            parts.append(
                f"{norm} {pct(rate_ci(vals, nv, scale=1))} (epochs to {tpct}: {format_interval(ett_iv, 2)}, "
                f"reached {reached}/{len(ett)})"
            )
        lines.append(f"{data}: " + " > ".join(parts))
        if data == primary:
            best, best_vals = ranked[0]
            tied = [n for n, v in ranked[1:] if diff_ci(best_vals, v).lo <= 0 or len(v) < 2 or len(best_vals) < 2]
            if len(ranked) > 1:
                effect = scale_interval(diff_ci(best_vals, ranked[1][1]), 100)
                effect_label = f"final accuracy on {data}, {best} − {ranked[1][0]} (points)"
            answer = (
                f"On {data} (the longest sequences in this run), the best final accuracy is {best}"
                + (f", not separable from {', '.join(tied)} (95% CIs of the differences include 0)" if tied else
                   ", ahead of every other cell (95% CIs of the differences exclude 0)")
                + "."
            )
    return Card(
        study=NAME,
        claim=QUESTION,
        question=QUESTION,
        measurement=answer + " Final validation accuracy, mean [95% CI] over "
        f"{len(cfg.seeds)} seeds: " + "; ".join(lines),
        verdict="answer",
        effect=effect,
        effect_label=effect_label,
        details=(
            "Cells: none = plain LSTM (torch.nn.LSTM), ln = LayerNorm-LSTM, bn = BatchNorm-LSTM "
            "(per-step statistics, γ = 0.1), wn = weight-normalized LSTM; one layer of "
            f"{cfg.hidden} units, Adam lr {cfg.lr:g}, batch {cfg.batch_size}, {cfg.epochs} epochs. "
            f"Ranked by mean final accuracy; 'effect' = best minus second (Welch 95% CI) on the "
            f"primary task. Epochs to {tpct}: first epoch with val_acc >= {target:g}; a run that "
            f"never reaches it counts as epochs + 1 = {cfg.epochs + 1} (censored, a lower bound). "
            f"CPU time recorded by this study's runs: {cpu:.0f} s."
        ),
    )


def _card_ln_bn(results: list[RunResult], cfg: Config) -> Card:
    """LN works better than BN: per-task verdicts from final accuracy, combined."""
    datasets = list(_datasets(cfg))
    target = float(cfg.target_acc)
    tpct = f"{target * 100:g}%"
    primary = _primary(datasets, results)
    per_task, texts, intervals = [], [], {}
    for data in datasets:
        ln = by_seed(results, _final_acc, drop_missing=True, runner="rnn-train", data=data, arm="ln")
        bn = by_seed(results, _final_acc, drop_missing=True, runner="rnn-train", data=data, arm="bn")
        if not ln or not bn:
            continue
        iv = diff_ci(list(ln.values()), list(bn.values()))
        v = verdict(iv, "greater", tolerance=0.01)
        per_task.append(v)
        ln_e = [epochs_to_target(r, target)[0] for r in select(results, runner="rnn-train", data=data, arm="ln")]
        bn_e = [epochs_to_target(r, target)[0] for r in select(results, runner="rnn-train", data=data, arm="bn")]
        e_iv = diff_ci(bn_e, ln_e)
        ln_auc = by_seed(results, _acc_auc, drop_missing=True, runner="rnn-train", data=data, arm="ln")
        bn_auc = by_seed(results, _acc_auc, drop_missing=True, runner="rnn-train", data=data, arm="bn")
        auc_iv = diff_ci(list(ln_auc.values()), list(bn_auc.values()))
        texts.append(
            f"{data}: final acc LN − BN {_fmt_pp(iv)} → {v}; epochs to {tpct} BN − LN "
            f"{format_interval(e_iv, 2)}; mean acc over epochs LN − BN {_fmt_pp(auc_iv)}"
        )
        intervals[data] = (iv, v)
    combined = _combine(per_task) if per_task else "inconclusive"
    # The interval shown is the one the verdict came from: the primary task's if it agrees with
    # the combined verdict, else the first task that does.
    deciding = sorted(intervals, key=lambda d: (intervals[d][1] != combined, d != primary))
    return Card(
        study=NAME,
        claim=CLAIM_LN_BN,
        measurement="; ".join(texts) if texts else "needs finished 'ln' and 'bn' runs",
        verdict=combined,
        effect=scale_interval(intervals[deciding[0]][0], 100) if deciding else None,
        effect_label=f"final accuracy on {deciding[0]}, LN − BN (points)" if deciding else "",
        details=(
            "Verdict per task from the Welch 95% CI of the final validation accuracy "
            "difference LN − BN with a 1 pp tolerance (supported: CI above +1 pp; not "
            "supported: CI below +1 pp), combined over tasks: a direction found on one task "
            "and contradicted on none. Epochs-to-target (censored at epochs + 1) and the mean "
            "accuracy over epochs (speed) are shown for context. 'effect' is the interval of the "
            "task the verdict comes from (the longest-sequence task when it agrees)."
        ),
    )


def _card_shared(results: list[RunResult], cfg: Config) -> Card:
    """BN needs per-step statistics: per-step vs shared running statistics, paired by seed."""
    datasets = list(_datasets(cfg))
    data0 = datasets[0]
    per_step = by_seed(results, _final_acc, drop_missing=True, runner="rnn-train", data=data0, arm="bn")
    shared = by_seed(results, _final_acc, drop_missing=True, runner="rnn-train", data=data0, arm=SHARED_ARM)
    seeds = sorted(set(per_step) & set(shared))
    if seeds:
        a, b = [per_step[s] for s in seeds], [shared[s] for s in seeds]
        iv = paired_diff_ci(a, b)
        v = verdict(iv, "greater", tolerance=0.01)
        nv = n_val(results, runner="rnn-train", data=data0)
        measurement = (
            f"{data0}, final validation accuracy: per-step statistics {pct(rate_ci(a, nv, scale=1))}, "
            f"shared statistics {pct(rate_ci(b, nv, scale=1))}; per-step − shared {_fmt_pp(iv)} "
            f"(paired over {len(seeds)} seeds)"
        )
    else:
        iv, v = None, "inconclusive"
        measurement = "not run (needs 'bn' in norms and shared_stats=True)"
    return Card(
        study=NAME,
        claim=CLAIM_SHARED,
        measurement=measurement,
        verdict=v,
        effect=None if iv is None else scale_interval(iv, 100),
        effect_label="final accuracy, BN-LSTM per-step − shared statistics (points)",
        details=(
            "BN-LSTM with one set of running statistics for all time steps (max_steps=1) vs "
            "one per step, same seeds. Training is the same computation in both (each step "
            "is normalized by its own batch statistics; the same seed gives the same weights "
            "and batches), so the difference is the statistics used at evaluation. Truly "
            "shared *training* statistics would pool over time, which a recurrent cell cannot "
            "do (step t's input needs step t−1's output), so that variant is not tested. "
            "Supported if the paired 95% CI of per-step − shared is above +1 pp."
        ),
    )


def _gamma_evidence(results: list[RunResult], cfg: Config) -> dict[str, Any]:
    """What both γ cards rest on: the two paired intervals, their verdicts, measurements, caveat."""
    arms = _grad_arms(cfg)
    g_small = f"bn-g{min(cfg.grad_gammas):g}" if cfg.grad_gammas else None
    g_large = f"bn-g{max(cfg.grad_gammas):g}" if cfg.grad_gammas else None
    small = by_seed(results, "log10_ratio_init", drop_missing=True, runner="rnn-gradflow", arm=g_small)
    large = by_seed(results, "log10_ratio_init", drop_missing=True, runner="rnn-gradflow", arm=g_large)
    small_e = by_seed(results, "log10_ratio_early", drop_missing=True, runner="rnn-gradflow", arm=g_small)
    large_e = by_seed(results, "log10_ratio_early", drop_missing=True, runner="rnn-gradflow", arm=g_large)
    refs = []
    for arm, _norm, _g in arms:
        vals = list(by_seed(results, "log10_ratio_init", drop_missing=True, runner="rnn-gradflow", arm=arm).values())
        if vals:
            refs.append(f"{arm} {format_interval(mean_ci(vals), 3)}")
    seeds = sorted(set(small) & set(large))
    grad_where = f"{cfg.grad_data}, log10(‖∂L/∂h_1‖ / ‖∂L/∂h_T‖) at init"
    if seeds and g_small != g_large:
        a, b = [small[s] for s in seeds], [large[s] for s in seeds]
        iv = paired_diff_ci(a, b)
        v = verdict(iv, "greater")
        iv_abs = paired_diff_ci([abs(x) for x in b], [abs(x) for x in a])
        v_abs = verdict(iv_abs, "greater")
        es = sorted(set(small_e) & set(large_e))
        early = (
            f"; over early training ({cfg.grad_train_steps} steps): γ={min(cfg.grad_gammas):g} − "
            f"γ={max(cfg.grad_gammas):g} {format_interval(paired_diff_ci([small_e[s] for s in es], [large_e[s] for s in es]), 3)}"
            if es and cfg.grad_train_steps > 0 else ""
        )
        base = f"{grad_where} (mean [95% CI] over seeds): " + ", ".join(refs)
        m1 = base + f". γ={min(cfg.grad_gammas):g} − γ={max(cfg.grad_gammas):g}: {format_interval(iv, 3)} (paired, {len(seeds)} seeds){early}"
        m2 = base + (
            f". |log10 ratio| at γ={max(cfg.grad_gammas):g} minus at γ={min(cfg.grad_gammas):g}: "
            f"{format_interval(iv_abs, 3)} (paired, {len(seeds)} seeds)"
        )
    else:
        iv = iv_abs = None
        v = v_abs = "inconclusive"
        m1 = m2 = "needs the gradient-flow runs of two γ values"
    caveat = (
        " Measured in train mode (batch statistics) on batches of "
        f"{cfg.grad_batch_size}, averaged over {cfg.grad_batches} batches, L = cross-entropy of the "
        "prediction from h_T. Caveat: the first permuted pixel is almost always 0, so h_1 has "
        "almost no batch variance and the next step's BN amplifies its gradient by about "
        "γ/sqrt(eps); see the profile figure for the whole curve."
    )
    return {"iv": iv, "v": v, "m1": m1, "iv_abs": iv_abs, "v_abs": v_abs, "m2": m2, "caveat": caveat}


def _card_gamma(results: list[RunResult], cfg: Config) -> Card:
    """Small γ init: the gradient does not vanish toward early steps (the paper's direction)."""
    e = _gamma_evidence(results, cfg)
    direction = (
        "Direction predicted by Cooijmans et al. (Fig. 1): with large γ the normalized "
        "pre-activations saturate the nonlinearities and the gradient vanishes toward early steps, "
        "so γ = 0.1 should give a LARGER ratio ‖∂L/∂h_1‖/‖∂L/∂h_T‖ than γ = 1. Supported if the "
        "paired 95% CI of log10 ratio(γ small) − log10 ratio(γ large) is above 0; not supported "
        "if below 0 (then γ = 1 sends MORE gradient back: it explodes rather than vanishes)."
    )
    small, large = (min(cfg.grad_gammas), max(cfg.grad_gammas)) if cfg.grad_gammas else (0.1, 1.0)
    return Card(study=NAME, claim=CLAIM_GAMMA, measurement=e["m1"], verdict=e["v"],
                effect=None if e["iv"] is None else ratio_interval(e["iv"]),
                effect_label=f"‖∂L/∂h_1‖ / ‖∂L/∂h_T‖ at init, γ={small:g} / γ={large:g} (×)",
                details=direction + e["caveat"])


def _card_gamma_balance(results: list[RunResult], cfg: Config) -> Card:
    """Small γ init: the gradient norm stays closer to constant across steps than with γ = 1."""
    e = _gamma_evidence(results, cfg)
    return Card(
        study=NAME,
        claim=CLAIM_GAMMA_BALANCE,
        measurement=e["m2"],
        verdict=e["v_abs"],
        effect=e["iv_abs"],
        effect_label=(
            f"|log10 ‖∂L/∂h_1‖/‖∂L/∂h_T‖| at init, γ={max(cfg.grad_gammas or (1,)):g} − "
            f"γ={min(cfg.grad_gammas or (0.1,)):g} (decades)"
        ),
        details=(
            "Preserved flow = log10 ratio near 0 (the gradient reaching h_1 is as large as the "
            "one at h_T). Supported if the paired 95% CI of |log10 ratio(γ large)| − "
            "|log10 ratio(γ small)| is above 0." + e["caveat"]
        ),
    )


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------
def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing to show when no run finished
        ax.legend(fontsize=8, **kw)


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """Accuracy curves, final accuracy / epochs to target, and the gradient-norm profiles."""
    outdir.mkdir(parents=True, exist_ok=True)
    arms = list(cfg.norms) + ([SHARED_ARM] if cfg.shared_stats and "bn" in cfg.norms else [])
    return [
        _fig_accuracy_curves(results, cfg, arms, outdir),
        _fig_final_accuracy(results, cfg, arms, outdir),
        _fig_gradient_flow(results, cfg, outdir),
    ]


def _fig_accuracy_curves(results: list[RunResult], cfg: Config, arms: list[str], outdir: Path) -> Figure:
    datasets = list(_datasets(cfg))
    target = float(cfg.target_acc)
    fig, axes = plotting.panels(1, len(datasets), (4.6, 3.4))
    for ax, data in zip(axes[0], datasets):
        for arm in arms:
            band = plotting.t_band([
                [a for a in r.curve("val_acc") if a is not None]
                for r in select(results, runner="rnn-train", data=data, arm=arm)
            ])
            if band is None:
                continue
            mean, lo, hi = band
            x = np.arange(1, len(mean) + 1)
            style = ":" if arm == SHARED_ARM else "-"
            ax.plot(x, mean, style, color=plotting.color(arm), label=arm)
            plotting.band(ax, x, np.clip(lo, 0, 1), np.clip(hi, 0, 1), plotting.color(arm), alpha=0.15)
        ax.axhline(target, color="k", lw=0.8, ls="--")
        ax.set_title(data)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1)
        _legend(ax, loc="lower right")
    return plotting.finish(fig, outdir / "rnn_accuracy_curves.png",
        title="LSTM validation accuracy per epoch",
        caption=(
            f"Mean over {len(cfg.seeds)} seeds with a 95% t-band; dashed line: the {target:.0%} "
            f"target. '{SHARED_ARM}' (dotted) = BN-LSTM with one set of running statistics for "
            "all steps."
        ),
    )


def _fig_final_accuracy(results: list[RunResult], cfg: Config, arms: list[str], outdir: Path) -> Figure:
    datasets = list(_datasets(cfg))
    target = float(cfg.target_acc)
    fig, axes = plotting.plt().subplots(1, 2, figsize=(9.2, 3.4), dpi=100)
    width = 0.8 / max(len(datasets), 1)
    for k, data in enumerate(datasets):
        for j, arm in enumerate(arms):
            rs = select(results, runner="rnn-train", data=data, arm=arm)
            accs = [v for v in (_final_acc(r) for r in rs) if v is not None]
            if not accs:
                continue
            xpos = j + (k - (len(datasets) - 1) / 2) * width
            iv = mean_ci(accs)
            axes[0].errorbar(xpos, iv.mean, yerr=plotting.ci_yerr(iv), fmt="o", color=f"C{k}", capsize=3,
                             label=data if j == 0 else None)
            ett = [epochs_to_target(r, target) for r in rs]
            eiv = mean_ci([e for e, _ in ett])
            censored = not any(ok for _, ok in ett)
            axes[1].errorbar(xpos, eiv.mean, yerr=plotting.ci_yerr(eiv), fmt="^" if censored else "o",
                             color=f"C{k}", mfc="none" if censored else None, capsize=3,
                             label=data if j == 0 else None)
    for ax in axes:
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms)
        _legend(ax)
    axes[0].set_ylabel("final validation accuracy")
    axes[0].set_ylim(0, 1.02)
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylabel(f"epochs to {target:.0%} (censored: E+1)")
    axes[1].axhline(cfg.epochs + 1, color="k", lw=0.8, ls="--")
    return plotting.finish(fig, outdir / "rnn_final_accuracy.png",
        title="Final accuracy and epochs to target",
        caption=(
            "Mean with 95% CI over seeds. Right: epochs until the validation accuracy first reaches "
            f"{target:.0%}; runs that never do count as {cfg.epochs + 1} (dashed line); hollow "
            "triangles: no run of that arm reached the target."
        ),
    )


def _fig_gradient_flow(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, axes = plotting.plt().subplots(1, 2, figsize=(9.2, 3.4), dpi=100, sharey=False)
    for i, (arm, norm, _g) in enumerate(_grad_arms(cfg)):
        rs = select(results, runner="rnn-gradflow", arm=arm)
        for ax, key in zip(axes, ("profile_init", "profile_last")):
            curves = []
            for r in rs:
                prof = r.metric(key)
                if prof:
                    curves.append([p - prof[-1] for p in prof])  # relative to h_T
            band = plotting.t_band(curves)
            if band is None:
                continue
            mean, lo, hi = band
            x = np.arange(1, len(mean) + 1)
            # The γ arms are all BN: told apart by the colour cycle, not by the norm's colour.
            color = plotting.color(norm) if not arm.startswith("bn-") else f"C{3 + i}"
            ax.plot(x, mean, color=color, label=arm)
            plotting.band(ax, x, lo, hi, color, alpha=0.15)
    axes[0].set_title("at initialization")
    axes[1].set_title(f"after {cfg.grad_train_steps} training steps")
    for ax in axes:
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("time step t")
        ax.set_ylabel("log10 ‖∂L/∂h_t‖ / ‖∂L/∂h_T‖")
        _legend(ax)
    return plotting.finish(fig, outdir / "rnn_gradient_flow.png",
        title="Gradient flow through time (Cooijmans et al. Fig. 1)",
        caption=(
            f"log10 of the gradient norm w.r.t. each hidden state relative to the last one, on "
            f"{cfg.grad_data}; mean with 95% t-band over seeds. Below 0: the "
            "gradient vanishes going back in time; above 0: it grows. bn-gX = BN-LSTM with γ "
            "initialized to X."
        ),
    )
