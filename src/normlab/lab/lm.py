"""The ``lm-train`` runner: train a language model on next-token loss over whole sequences.

The lab's loop (:func:`normlab.lab.train.train`) trains a classifier with one label per sample;
a language model predicts every position of a sequence. This runner does that, with the lab's
pieces (seeding, deterministic algorithms, the model registry, the store's per-log curves, the
interleaved timing of :mod:`normlab.lab.metrics`), on the ``chars`` corpus
(:func:`normlab.lab.data.char_corpus`):

* each step draws ``batch_size`` windows of ``context + 1`` characters uniformly from the
  training blocks (a window never crosses a block boundary; the draw is seeded by ``seed``), and
  minimizes the mean cross-entropy of the ``context`` next-character predictions;
* AdamW (β = (0.9, ``beta2``), decoupled ``weight_decay`` on matrices only), a linear warm-up of
  ``warmup`` steps from 0 to ``lr``, then ``schedule`` ``"cosine"`` (down to
  ``min_lr_ratio·lr`` at the last step) or ``"constant"``; optional gradient clipping;
* every ``eval_every`` steps (and at steps 0 and ``steps``), the validation loss in **bits per
  character** over fixed non-overlapping windows of the validation blocks (at most
  ``val_windows``): ``bpc = mean CE (nats) / ln 2``.

Logged at each evaluation (``log(k, metrics)``, ``k = 0, 1, …``): ``step``, ``lr``,
``val_bpc``, ``train_bpc`` (mean over the steps since the last evaluation), ``diverged``.
A non-finite training loss stops the run (``diverged``; the bad gradient never reaches the
weights). Returned: ``final_val_bpc`` (``None`` when diverged), ``best_val_bpc``,
``final_train_bpc``, ``diverged``, ``steps``, ``time_per_step_s``, ``train_time_s``,
``n_params``, ``n_train_chars``, ``corpus_sha256``, ``python``, ``peak_rss_mb`` and, with
``timing``, ``train_step_s`` and ``train_ratio_<ref>``: the median time of one training step of
this model over that of the same architecture with norm ``timing_reference``, timed in turns so
that the machine's load drifting hits both alike.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab._checks import check_positive_int
from normlab.lab.data import CHARS_BLOCK, CharCorpus, char_corpus
from normlab.lab.metrics import interleaved_times, median_ratio
from normlab.lab.models import build_model, count_parameters
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.train import _deterministic, peak_rss_mb, seed_everything

__all__ = ["LM_DEFAULTS", "LM_RUNNER", "SCHEDULES", "bits_per_char", "lm_config", "lm_train", "lr_at"]

LM_RUNNER = "lm-train"
SCHEDULES: tuple[str, ...] = ("cosine", "constant")

#: Every key of an ``lm-train`` config and its default.
LM_DEFAULTS: dict[str, Any] = {
    "data": "chars",
    "data_options": {"size": "large"},
    "model": "transformer",
    "model_options": {},
    "norm": "ln",
    "seed": 0,
    "steps": 300,
    "batch_size": 32,
    "context": 64,
    "lr": 3e-3,
    "warmup": 30,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "beta2": 0.95,
    "grad_clip": None,
    "eval_every": 50,
    "val_windows": 512,
    "timing": False,
    "timing_reference": "ln",
    "timing_repeats": 10,
}


def lm_config(**values: Any) -> dict[str, Any]:
    """A full ``lm-train`` run config: :data:`LM_DEFAULTS` with ``values`` (unknown keys: error)."""
    unknown = sorted(set(values) - set(LM_DEFAULTS))
    if unknown:
        raise ValueError(f"lm config: unknown keys {unknown}; expected some of {sorted(LM_DEFAULTS)}")
    return {"runner": LM_RUNNER, **LM_DEFAULTS, **values}


def lr_at(step: int, *, lr: float, steps: int, warmup: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warm-up: ``lr·(step + 1)/warmup`` for ``step < warmup``; then ``"constant"``: ``lr``;
    ``"cosine"``: ``lr·(r + (1 − r)·(1 + cos(π·p))/2)`` with ``r = min_lr_ratio`` and
    ``p = (step − warmup)/(steps − warmup − 1)`` going from 0 to 1 over the remaining steps.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    rest = max(steps - warmup - 1, 1)
    p = min((step - warmup) / rest, 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def bits_per_char(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy of ``logits (…, V)`` against ``targets (…)`` in bits (nats / ln 2)."""
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))) / math.log(2)


def _check(cfg: dict[str, Any]) -> None:
    for name in ("steps", "batch_size", "context", "eval_every", "val_windows", "timing_repeats"):
        check_positive_int(cfg[name], name)
    if isinstance(cfg["warmup"], bool) or not isinstance(cfg["warmup"], int) or cfg["warmup"] < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {cfg['warmup']!r}")
    if cfg["warmup"] >= cfg["steps"]:
        raise ValueError(f"warmup: expected fewer steps than steps={cfg['steps']}, got {cfg['warmup']}")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {list(SCHEDULES)}, got {cfg['schedule']!r}")
    if not (isinstance(cfg["lr"], (int, float)) and cfg["lr"] > 0):
        raise ValueError(f"lr: expected a number > 0, got {cfg['lr']!r}")
    if not 0 <= cfg["min_lr_ratio"] <= 1:
        raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {cfg['min_lr_ratio']!r}")
    if cfg["context"] + 1 > CHARS_BLOCK:
        raise ValueError(f"context: expected at most {CHARS_BLOCK - 1}, got {cfg['context']}")
    if cfg["data"] != "chars":
        raise ValueError(f"data: the lm-train runner reads the 'chars' corpus, got {cfg['data']!r}")
    if cfg["grad_clip"] is not None and not cfg["grad_clip"] > 0:
        raise ValueError(f"grad_clip: expected None or a number > 0, got {cfg['grad_clip']!r}")


def _val_windows(corpus: CharCorpus, context: int, limit: int) -> torch.Tensor:
    """Non-overlapping ``(n, context + 1)`` windows of the validation blocks (evenly thinned)."""
    per = CHARS_BLOCK // (context + 1)
    w = corpus.val[:, : per * (context + 1)].reshape(-1, context + 1)
    if len(w) > limit:
        w = w[(torch.arange(limit) * len(w)) // limit]
    return w


def _draw(corpus: CharCorpus, batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random ``(context + 1)``-character windows of the training blocks."""
    rows = torch.randint(len(corpus.train), (batch,), generator=gen)
    starts = torch.randint(CHARS_BLOCK - context, (batch,), generator=gen)
    offsets = starts[:, None] + torch.arange(context + 1)
    return corpus.train[rows[:, None], offsets]


@torch.no_grad()
def _evaluate(model: nn.Module, windows: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        w = windows[start : start + batch]
        logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    model.train()
    return total / count / math.log(2)


def _optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    # Decay matrices only: decaying norm gains, DyT's α and biases pulls them towards 0 for no gain.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": float(cfg["weight_decay"])},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=float(cfg["lr"]), betas=(0.9, float(cfg["beta2"])))


def _build(cfg: dict[str, Any], norm: str, corpus: CharCorpus) -> nn.Module:
    return build_model(cfg["model"], norm=norm, input_shape=(cfg["context"],), num_classes=corpus.vocab_size,
                       **cfg["model_options"])


def _timing(model: nn.Module, cfg: dict[str, Any], corpus: CharCorpus) -> dict[str, Any]:
    """Median training-step time of ``model`` and of the reference norm's model, in turns."""
    ref = cfg["timing_reference"]
    gen = torch.Generator().manual_seed(12345)
    w = _draw(corpus, cfg["batch_size"], cfg["context"], gen)
    models = {"self": model}
    if ref != cfg["norm"]:
        torch.manual_seed(cfg["seed"])
        models[ref] = _build(cfg, ref, corpus)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step_fn(m: nn.Module) -> Any:
        opt = torch.optim.AdamW(m.parameters(), lr=0.0)  # a full step that leaves the weights as they are

        def step() -> None:
            logits = m(w[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    times = interleaved_times({k: step_fn(m) for k, m in models.items()}, repeats=int(cfg["timing_repeats"]))
    model.load_state_dict(snapshot)
    key = ref.replace("+", "_")
    ratio = 1.0 if ref == cfg["norm"] else median_ratio(times["self"], times[ref])
    return {"train_step_s": float(np.median(times["self"])), f"train_ratio_{key}": ratio}


@register_runner(LM_RUNNER)
def lm_train(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train the language model of ``config`` (an :func:`lm_config`); see the module docstring."""
    cfg = {**LM_DEFAULTS, **{k: v for k, v in config.items() if k != "runner"}}
    unknown = sorted(set(cfg) - set(LM_DEFAULTS))
    if unknown:
        raise ValueError(f"lm config: unknown keys {unknown}; expected some of {sorted(LM_DEFAULTS)}")
    _check(cfg)
    t_start = time.perf_counter()
    with _deterministic():
        corpus = char_corpus(str(cfg["data_options"].get("size", "large")))
        extra = sorted(set(cfg["data_options"]) - {"size"})
        if extra:
            raise ValueError(f"data_options: unknown keys {extra}; the chars corpus takes 'size'")
        windows = _val_windows(corpus, cfg["context"], cfg["val_windows"])
        seed_everything(cfg["seed"])
        model = _build(cfg, cfg["norm"], corpus)
        model.train()
        opt = _optimizer(model, cfg)
        gen = torch.Generator().manual_seed(int(cfg["seed"]))
        steps, every = int(cfg["steps"]), int(cfg["eval_every"])
        sched = {k: cfg[k] for k in ("lr", "warmup", "schedule", "min_lr_ratio")}

        val = _evaluate(model, windows)
        log(0, {"step": 0, "lr": 0.0, "val_bpc": val, "train_bpc": None, "diverged": False})
        best, diverged, step, train_time = val, False, 0, 0.0
        window_sum, window_n, train_bpc = 0.0, 0, math.nan
        k = 0
        while step < steps and not diverged:
            lr = lr_at(step, steps=steps, **sched)
            for group in opt.param_groups:
                group["lr"] = lr
            w = _draw(corpus, cfg["batch_size"], cfg["context"], gen)
            t0 = time.perf_counter()
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            value = loss.item()
            if not math.isfinite(value):
                diverged = True  # stop before the bad gradient reaches the weights
                train_time += time.perf_counter() - t0
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
            opt.step()
            train_time += time.perf_counter() - t0
            step += 1
            window_sum += value / math.log(2)
            window_n += 1
            if step % every == 0 or step == steps:
                val = _evaluate(model, windows)
                train_bpc = window_sum / window_n
                window_sum, window_n = 0.0, 0
                if not math.isfinite(val):
                    diverged = True
                else:
                    best = min(best, val)
                k += 1
                log(k, {"step": step, "lr": lr, "val_bpc": val if math.isfinite(val) else None,
                        "train_bpc": train_bpc, "diverged": diverged})
        if diverged and window_n:
            k += 1
            log(k, {"step": step, "lr": lr, "val_bpc": None, "train_bpc": window_sum / window_n,
                     "diverged": True})
        result: dict[str, Any] = {
            "final_val_bpc": None if diverged or not math.isfinite(val) else val,
            "best_val_bpc": best,
            "final_train_bpc": train_bpc,
            "diverged": diverged,
            "steps": step,
            "time_per_step_s": train_time / step if step else None,
            "train_time_s": train_time,
            "n_params": count_parameters(model),
            "n_train_chars": corpus.n_train_chars,
            "corpus_sha256": corpus.sha256,
            "python": corpus.python,
        }
        if cfg["timing"]:
            result.update(_timing(model, cfg, corpus))
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = peak_rss_mb()
    result["total_time_s"] = time.perf_counter() - t_start
    return result
