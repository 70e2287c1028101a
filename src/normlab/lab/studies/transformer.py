"""Which normalization for transformers? A character-level language model, norm by norm.

The article asks "which normalization for CNN, RNN, …?"; today the "…" is the transformer. The
study trains the lab's small decoder-only ``transformer`` (:mod:`normlab.lab.models.transformer`:
2 layers, d_model 64, 4 heads, context 64, causal attention, learned positions) as a
character-level language model on the ``chars`` corpus (the source of 21 standard-library
modules, no download, its SHA-256 in every run's data identity: :func:`normlab.lab.data.char_corpus`)
with the ``lm-train`` runner (:mod:`normlab.lab.lm`: AdamW, linear warm-up, cosine decay,
validation bits per character). Arms:

* **methods**: LN, RMSNorm, DyT, Derf and none, Pre-LN placement with warm-up, over a learning
  rate sweep, at two corpus sizes 8× apart (``sizes``: small and large; the validation blocks
  are the same);
* **warm-up**: LN, Pre-LN vs Post-LN, with and without warm-up, over the sweep (large corpus);
* **QK-norm**: LN with and without LayerNorm on queries and keys, over a wider sweep
  (``qk_lrs``, up to rates where plain attention breaks);
* **Peri-LN** (optional): LN around each sub-layer's input and output.

Every method is scored at its own best learning rate (chosen on the mean over seeds, then the
per-seed values at that rate, paired by seed with the other method's); a diverged run counts as
the loss at initialization (log2 128 = 7 bits/char). Cards: Pre-LN trains without warm-up where
Post-LN needs it (Xiong et al. 2020); RMSNorm matches LN at lower cost (Zhang & Sennrich 2019);
DyT matches LN (Zhu et al. 2025); DyT helps at small data and hurts at more data (2026); QK-norm
widens the range of stable learning rates (Wortsman et al. 2023, their LR sensitivity); is
normalization needed at all; and the answer to "which normalization for transformers?".

Cost, one thread per run (measured on the 2-core development machine while ~6 other jobs
shared it, so wall times there were ~10× the CPU times; CPU seconds are the robust number): a
full-grid run (300 steps of 16 × 64 characters, 4 evaluations, timing) takes 18 CPU-s, so the
full grid's 102 runs are ~1900 CPU-s: **about 16 minutes with** ``--workers 2`` **on two free
cores** (an estimate from that measurement; the full grid itself was not run there). The quick
profile (12 runs of 150 steps of 16 × 32: LN, RMSNorm, DyT, none at lr 0.01) is part of
``normlab demo``; an 18-run version (3 norms × 2 rates) took 55 s wall for the whole ``normlab
study transformer --quick --workers 2`` on two free cores (2026-12-01).

Embeddings start at std 1 (``embed_scale = 50`` on GPT-2's std 0.02): with std 0.02 the DyT and
Derf models stayed on the unigram plateau (~4.4 bits/char) for the whole short budget while LN
trained (plausibly DyT's shift β, moved at Adam's rate, swamps inputs of size 0.02; ``embed_scale = 8``
did not help in a 150-step pilot) — an artefact of the initialization, not of DyT, so every
method now gets unit-scale tokens. The same plateau caught Post-LN *with*
warm-up in a one-seed pilot of the full setup at lr 0.01 (4.38 bits/char; without warm-up 3.45,
Pre-LN 3.36 with and 3.53 without): 300 steps are short enough for escaping the plateau to
decide a run, so read the warm-up card with its intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import plotting
from normlab.lab.analysis import by_seed, log_ratio_ci, select, values
from normlab.lab.data import CHARS_SIZES, CHARS_VOCAB
from normlab.lab.lm import LM_RUNNER, lm_config
from normlab.lab.models.transformer import PLACEMENTS, TOKEN_NORMS
from normlab.lab.stats import (
    Interval,
    combine_verdicts,
    format_interval,
    mean_ci,
    paired_diff_ci,
    verdict,
)
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure, Ranking

NAME = "transformer"
TITLE = "Which normalization for transformers: a character-level language model"
SUMMARY = ("Small decoder-only transformer on a stdlib-source character corpus: LN, RMSNorm, DyT, "
           "Derf, none; Pre/Post-LN with and without warm-up; QK-norm; over learning rates.")
ORDER = 45
QUESTION = "Which normalization for transformers?"
CLAIM_NEEDED = "A transformer needs normalization: without it the loss is higher"
CLAIM_RMS = "RMSNorm matches LayerNorm's loss at a lower cost (Zhang & Sennrich 2019)"
CLAIM_DYT = "Dynamic Tanh (DyT) matches LayerNorm (Zhu et al. 2025)"
CLAIM_WARMUP = "Pre-LN trains without learning-rate warm-up where Post-LN needs it (Xiong et al. 2020)"
CLAIM_QK = "QK-norm widens the range of learning rates that train well (Wortsman et al. 2023)"

#: Loss of a diverged run, and the ceiling of every loss in the analysis: a uniform guess over
#: the 128 ASCII codes (the model's loss at initialization is this, to 0.02 bit).
L0 = math.log2(CHARS_VOCAB)
#: Smallest difference in bits per character that counts ("matches" = within ±TOL).
TOL = 0.05
#: Smallest difference of LR sensitivity (bits per character) that counts as "widens".
SENS_TOL = 0.02
BPC = "bits/char"


@dataclass
class Config:
    """Full grid of the transformer study (``quick()`` is the small profile)."""

    norms: tuple[str, ...] = ("ln", "rms", "dyt", "derf", "none")
    sizes: tuple[str, ...] = ("small", "large")  # the last one is where methods are compared
    small_norms: tuple[str, ...] = ("ln", "dyt")  # the norms also run at the smaller sizes
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    qk_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    placements: tuple[str, ...] = ("pre", "post")
    warmup: int = 30
    peri: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    batch_size: int = 16
    context: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    eval_every: int = 100
    val_windows: int = 256
    schedule: str = "cosine"
    # Token + position embeddings at std 1 (0.02 × 50; torch's nn.Embedding default): LN and
    # RMSNorm do not see the scale, but DyT/Derf and "none" pass it on, and at GPT-2's std 0.02
    # (plausibly) DyT's per-channel shift β, moved at Adam's rate, drowns the tokens: a pilot (150 steps,
    # small corpus, lr 1e-2) stayed on the unigram plateau at ≈ 4.4 bits/char with scale 1 and
    # reached 3.57 with scale 50 (LN: 3.46).
    embed_scale: float = 50.0

    @classmethod
    def quick(cls) -> Config:
        # One corpus size (two sizes 8× apart separate only after many passes over the smaller
        # one, more steps than a demo has: the DyT-vs-data card says "not tested" here rather
        # than a verdict the full grid could contradict); four methods at one learning rate
        # (LN's and DyT's best in a two-rate pilot), so the demo's budget holds 12 runs; no
        # warm-up/QK/Peri arms.
        return cls(norms=("ln", "rms", "dyt", "none"), sizes=("small",), small_norms=(), lrs=(1e-2,),
                   qk_lrs=(), placements=("pre",), peri=False, seeds=(0, 1, 2), steps=150,
                   batch_size=16, context=32, eval_every=50, val_windows=256)


def validate(cfg: Config) -> None:
    bad = [n for n in cfg.norms if n not in TOKEN_NORMS]
    if bad:
        raise ValueError(f"norms: {bad} are not per-token norms; expected some of {list(TOKEN_NORMS)}")
    bad = [s for s in cfg.sizes if s not in CHARS_SIZES]
    if bad or not cfg.sizes:
        raise ValueError(f"sizes: expected some of {list(CHARS_SIZES)}, got {list(cfg.sizes)}")
    bad = [p for p in cfg.placements if p not in PLACEMENTS]
    if bad:
        raise ValueError(f"placements: expected some of {list(PLACEMENTS)}, got {bad}")
    if not cfg.lrs or any(not lr > 0 for lr in (*cfg.lrs, *cfg.qk_lrs)):
        raise ValueError(f"lrs: expected positive learning rates, got {list(cfg.lrs)}")
    if not 0 <= cfg.warmup < cfg.steps:
        raise ValueError(f"warmup: expected 0 <= warmup < steps ({cfg.steps}), got {cfg.warmup}")
    if "ln" not in cfg.norms:
        raise ValueError("norms: 'ln' is the reference every card compares with; include it")
    bad = [n for n in cfg.small_norms if n not in cfg.norms]
    if bad:
        raise ValueError(f"small_norms: {bad} are not in norms {list(cfg.norms)}")


# -- runs ----------------------------------------------------------------------------------------
def _large(cfg: Config) -> str:
    return cfg.sizes[-1]


def _run(cfg: Config, *, norm: str, size: str, lr: float, seed: int, placement: str = "pre",
         warmup: int | None = None, qk: str | None = None) -> dict[str, Any]:
    model_options = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                     "context": cfg.context, "placement": placement, "qk_norm": qk,
                     "embed_scale": cfg.embed_scale}
    return lm_config(
        data_options={"size": size}, model_options=model_options, norm=norm, seed=seed,
        steps=cfg.steps, batch_size=cfg.batch_size, context=cfg.context, lr=float(lr),
        warmup=cfg.warmup if warmup is None else warmup, schedule=cfg.schedule,
        eval_every=cfg.eval_every, val_windows=cfg.val_windows, timing=size == _large(cfg) and placement == "pre" and qk is None,
    )


def runs(cfg: Config) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    big = _large(cfg)
    for size in cfg.sizes:
        for norm in cfg.norms if size == big else [n for n in cfg.norms if n in cfg.small_norms]:
            out += [_run(cfg, norm=norm, size=size, lr=lr, seed=s) for lr in cfg.lrs for s in cfg.seeds]
    for placement in cfg.placements:
        for warmup in (cfg.warmup, 0):
            if len(cfg.placements) < 2 and warmup == 0:
                continue  # one placement: nothing to compare the warm-up penalty with
            out += [_run(cfg, norm="ln", size=big, lr=lr, seed=s, placement=placement, warmup=warmup)
                    for lr in cfg.lrs for s in cfg.seeds]
    for qk in (None, "ln") if cfg.qk_lrs else ():
        out += [_run(cfg, norm="ln", size=big, lr=lr, seed=s, qk=qk) for lr in cfg.qk_lrs for s in cfg.seeds]
    if cfg.peri:
        out += [_run(cfg, norm="ln", size=big, lr=lr, seed=s, placement="peri") for lr in cfg.lrs
                for s in cfg.seeds]
    unique = {repr(sorted(c.items(), key=lambda kv: kv[0])): c for c in out}  # shared arms once
    return list(unique.values())


# -- analysis helpers ------------------------------------------------------------------------------
def _where(cfg: Config, *, norm: str, size: str, lr: float, placement: str = "pre",
           warmup: int | None = None, qk: str | None = None) -> dict[str, Any]:
    run = _run(cfg, norm=norm, size=size, lr=lr, seed=0, placement=placement, warmup=warmup, qk=qk)
    return {k: run[k] for k in ("runner", "norm", "data_options", "model_options", "lr", "warmup",
                                "steps", "batch_size", "context", "schedule")}


def capped_bpc(r: RunResult) -> float | None:
    """Final validation bits/char, a diverged run (or one worse than a uniform guess) as :data:`L0`."""
    if not r.done:
        return None
    if r.metric("diverged"):
        return L0
    v = r.metric("final_val_bpc")
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return L0
    return min(float(v), L0)


def _bpc(results: list[RunResult], cfg: Config, **arm: Any) -> dict[int, float]:
    return by_seed(results, capped_bpc, drop_missing=True, **_where(cfg, **arm))


def _best_lr(results: list[RunResult], cfg: Config, lrs: tuple[float, ...], **arm: Any) -> float | None:
    """The learning rate of the grid with the lowest mean capped loss over seeds (``None``: no runs)."""
    means = {lr: float(np.mean(list(v.values()))) for lr in lrs if (v := _bpc(results, cfg, lr=lr, **arm))}
    return min(means, key=means.__getitem__) if means else None


def _at_best(results: list[RunResult], cfg: Config, lrs: tuple[float, ...] | None = None,
             **arm: Any) -> tuple[float | None, dict[int, float]]:
    lr = _best_lr(results, cfg, lrs or cfg.lrs, **arm)
    return lr, ({} if lr is None else _bpc(results, cfg, lr=lr, **arm))


def _paired(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    common = sorted(set(a) & set(b))
    return paired_diff_ci([a[s] for s in common], [b[s] for s in common]) if len(common) >= 2 else None


def _bits(iv: Interval) -> str:
    return format_interval(iv, 3, "")


def _mean_text(v: dict[int, float]) -> str:
    return f"{_bits(mean_ci(list(v.values())))} {BPC}" if v else "no runs"


def _setup(cfg: Config) -> str:
    return (f"transformer d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, context "
            f"{cfg.context}; chars corpus ({', '.join(f'{s}: {CHARS_SIZES[s] // 1024} K chars' for s in cfg.sizes)}"
            f"); AdamW, {cfg.steps} steps of {cfg.batch_size} windows, warm-up {cfg.warmup} steps, "
            f"{cfg.schedule} schedule; learning rates {', '.join(f'{lr:g}' for lr in cfg.lrs)}; "
            f"{len(cfg.seeds)} seeds. Loss: validation bits per character (diverged = {L0:g}); each "
            "method at its best learning rate (lowest mean over seeds); 95% intervals paired by seed.")


def _untested(claim: str, what: str, cfg: Config) -> Card:
    return Card(NAME, claim, f"not tested at this profile ({what})", "inconclusive", QUESTION,
                details=_setup(cfg))


# -- cards ----------------------------------------------------------------------------------------
def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    return [_card_answer(results, cfg), _card_none(results, cfg), _card_rms(results, cfg),
            _card_dyt(results, cfg), _card_dyt_data(results, cfg), _card_warmup(results, cfg),
            _card_qk(results, cfg)]


def _card_none(results: list[RunResult], cfg: Config) -> Card:
    claim = CLAIM_NEEDED
    if "none" not in cfg.norms:
        return _untested(claim, "no 'none' arm", cfg)
    size = _large(cfg)
    lr_n, none = _at_best(results, cfg, norm="none", size=size)
    lr_l, ln = _at_best(results, cfg, norm="ln", size=size)
    d = _paired(none, ln)
    if d is None:
        return Card(NAME, claim, "needs finished 'none' and 'ln' runs", "inconclusive", QUESTION, details=_setup(cfg))
    text = (f"{size} corpus, each at its best learning rate: none (lr {lr_n:g}) {_mean_text(none)}, LN "
            f"(lr {lr_l:g}) {_mean_text(ln)}; none − LN = {_bits(d)} {BPC}")
    return Card(NAME, claim, text + ".", verdict(d, "greater", TOL), QUESTION, effect=d,
                effect_label=f"none − LN ({BPC})", details=_setup(cfg) + f" Tolerance {TOL} {BPC}.")


def _time_ratio(results: list[RunResult], cfg: Config, norm: str) -> tuple[Interval, Interval] | None:
    """(log, ratio) interval of the step time of ``norm`` over LN's, from the interleaved timings."""
    ratios = [v for v in values(results, "train_ratio_ln", norm=norm, runner=LM_RUNNER,
                                data_options={"size": _large(cfg)}) if v > 0]
    return log_ratio_ci(ratios) if len(ratios) >= 2 else None


def _card_rms(results: list[RunResult], cfg: Config) -> Card:
    claim = CLAIM_RMS
    if "rms" not in cfg.norms:
        return _untested(claim, "no 'rms' arm", cfg)
    size = _large(cfg)
    lr_r, rms = _at_best(results, cfg, norm="rms", size=size)
    lr_l, ln = _at_best(results, cfg, norm="ln", size=size)
    d = _paired(rms, ln)
    t = _time_ratio(results, cfg, "rms")
    if d is None or t is None:
        return Card(NAME, claim, "needs finished 'rms' and 'ln' runs with timings", "inconclusive", QUESTION,
                    details=_setup(cfg))
    log_t, ratio = t
    v = combine_verdicts([verdict(d, "equal", TOL), verdict(log_t, "less")])
    text = (f"{size} corpus: RMSNorm (lr {lr_r:g}) {_mean_text(rms)}, LN (lr {lr_l:g}) {_mean_text(ln)}; "
            f"RMS − LN = {_bits(d)} {BPC} (matches: within ±{TOL}); training-step time RMS / LN = "
            f"{format_interval(ratio)}× (timed in turns in each run, geometric mean over runs)")
    return Card(NAME, claim, text + ".", v, QUESTION, effect=d, effect_label=f"RMS − LN ({BPC})",
                details=_setup(cfg) + " Supported when the loss difference lies within the tolerance "
                "and the time ratio's interval below 1.")


def _card_dyt(results: list[RunResult], cfg: Config) -> Card:
    claim = CLAIM_DYT
    if "dyt" not in cfg.norms:
        return _untested(claim, "no 'dyt' arm", cfg)
    size = _large(cfg)
    lr_d, dyt = _at_best(results, cfg, norm="dyt", size=size)
    lr_l, ln = _at_best(results, cfg, norm="ln", size=size)
    d = _paired(dyt, ln)
    if d is None:
        return Card(NAME, claim, "needs finished 'dyt' and 'ln' runs", "inconclusive", QUESTION, details=_setup(cfg))
    text = (f"{size} corpus: DyT (lr {lr_d:g}) {_mean_text(dyt)}, LN (lr {lr_l:g}) {_mean_text(ln)}; "
            f"DyT − LN = {_bits(d)} {BPC} (matches: within ±{TOL})")
    return Card(NAME, claim, text + ".", verdict(d, "equal", TOL), QUESTION, effect=d,
                effect_label=f"DyT − LN ({BPC})", details=_setup(cfg))


def _card_dyt_data(results: list[RunResult], cfg: Config) -> Card:
    claim = ("Removing LayerNorm (DyT) helps at small data and hurts at more data "
             "(\"When does removing LayerNorm help?\", 2026)")
    if len(cfg.sizes) < 2 or not {"dyt", "ln"} <= set(cfg.small_norms) or "dyt" not in cfg.norms:
        return _untested(claim, "needs 'dyt' and 'ln' at two corpus sizes", cfg)
    small, big = cfg.sizes[0], cfg.sizes[-1]
    gaps = {}
    for size in (small, big):
        _, dyt = _at_best(results, cfg, norm="dyt", size=size)
        _, ln = _at_best(results, cfg, norm="ln", size=size)
        gaps[size] = {s: dyt[s] - ln[s] for s in sorted(set(dyt) & set(ln))}
    g_small, g_big = (_paired(gaps[s], {k: 0.0 for k in gaps[s]}) for s in (small, big))
    inter = _paired(gaps[big], gaps[small])
    if g_small is None or g_big is None or inter is None:
        return Card(NAME, claim, "needs finished 'dyt' and 'ln' runs at both sizes", "inconclusive", QUESTION,
                    details=_setup(cfg))
    v = combine_verdicts([verdict(g_small, "less"), verdict(g_big, "greater")])
    text = (f"DyT − LN (each at its best learning rate): {small} corpus ({CHARS_SIZES[small] // 1024} K chars) "
            f"{_bits(g_small)} {BPC}; {big} corpus ({CHARS_SIZES[big] // 1024} K chars) {_bits(g_big)} {BPC}; "
            f"the change from {small} to {big}: {_bits(inter)} {BPC}")
    return Card(NAME, claim, text + ".", v, QUESTION, effect=inter,
                effect_label=f"(DyT − LN) at {big} − (DyT − LN) at {small} ({BPC})",
                details=_setup(cfg) + " Supported when DyT − LN is below 0 at the small size and "
                "above 0 at the large one (both intervals).")


def _card_warmup(results: list[RunResult], cfg: Config) -> Card:
    claim = CLAIM_WARMUP
    if not {"pre", "post"} <= set(cfg.placements) or cfg.warmup == 0:
        return _untested(claim, "needs Pre-LN and Post-LN runs with and without warm-up", cfg)
    size = _large(cfg)
    penalty, texts = {}, []
    for placement in ("pre", "post"):
        lr, with_wu = _at_best(results, cfg, norm="ln", size=size, placement=placement)
        without = {} if lr is None else _bpc(results, cfg, norm="ln", size=size, lr=lr, placement=placement, warmup=0)
        penalty[placement] = {s: without[s] - with_wu[s] for s in sorted(set(with_wu) & set(without))}
        p = _paired(without, with_wu)
        texts.append(f"{placement.capitalize()}-LN at its best warm-up rate {lr if lr is None else f'{lr:g}'}: "
                     f"with {_mean_text(with_wu)}, without {_mean_text(without)}, penalty "
                     f"{_bits(p) if p else 'n/a'} {BPC}")
    p_post = _paired(penalty["post"], {s: 0.0 for s in penalty["post"]})
    d = _paired(penalty["post"], penalty["pre"])
    if p_post is None or d is None:
        return Card(NAME, claim, "needs finished Pre-/Post-LN runs with and without warm-up", "inconclusive",
                    QUESTION, details=_setup(cfg))
    v = combine_verdicts([verdict(p_post, "greater", TOL), verdict(d, "greater", TOL)])
    text = "; ".join(texts) + f"; Post-LN's penalty − Pre-LN's = {_bits(d)} {BPC}"
    return Card(NAME, claim, text + ".", v, QUESTION, effect=d,
                effect_label=f"no-warm-up penalty of Post-LN − that of Pre-LN ({BPC})",
                details=_setup(cfg) + f" Penalty: loss without warm-up − with ({cfg.warmup} steps), at the "
                f"rate that is best with warm-up. Supported when Post-LN's penalty exceeds {TOL} {BPC} and "
                "exceeds Pre-LN's by as much.")


def lr_sensitivity(curve: dict[float, float]) -> float:
    """Wortsman et al. (2023)'s LR sensitivity: ``mean over lrs of min(L(lr), L0) − min over lrs``."""
    capped = [min(v, L0) for v in curve.values()]
    return float(np.mean(capped) - min(capped))


def _sensitivity(results: list[RunResult], cfg: Config, qk: str | None) -> dict[int, float]:
    size = _large(cfg)
    per_lr = {lr: _bpc(results, cfg, norm="ln", size=size, lr=lr, qk=qk) for lr in cfg.qk_lrs}
    seeds = set.intersection(*(set(v) for v in per_lr.values())) if per_lr else set()
    return {s: lr_sensitivity({lr: v[s] for lr, v in per_lr.items()}) for s in sorted(seeds)}


def _card_qk(results: list[RunResult], cfg: Config) -> Card:
    claim = CLAIM_QK
    if len(cfg.qk_lrs) < 2:
        return _untested(claim, "no QK-norm learning-rate sweep", cfg)
    plain, qk = _sensitivity(results, cfg, None), _sensitivity(results, cfg, "ln")
    d = _paired(plain, qk)
    if d is None:
        return Card(NAME, claim, "needs finished LN runs with and without QK-norm at every rate", "inconclusive",
                    QUESTION, details=_setup(cfg))
    text = (f"LR sensitivity over {', '.join(f'{lr:g}' for lr in cfg.qk_lrs)} (mean loss over the rates − the "
            f"best, diverged = {L0:g}): LN {_mean_text(plain)}, LN + QK-norm {_mean_text(qk)}; "
            f"without − with = {_bits(d)} {BPC}")
    return Card(NAME, claim, text + ".", verdict(d, "greater", SENS_TOL), QUESTION, effect=d,
                effect_label=f"LR sensitivity without QK-norm − with ({BPC})",
                details=_setup(cfg) + f" Supported when the difference exceeds {SENS_TOL} {BPC}.")


def _card_answer(results: list[RunResult], cfg: Config) -> Card:
    size = _large(cfg)
    scores = {n: _at_best(results, cfg, norm=n, size=size) for n in cfg.norms}
    scores = {n: v for n, v in scores.items() if len(v[1]) >= 2}
    if "ln" not in scores:
        return Card(NAME, QUESTION, "needs finished runs of LN and the other methods", "answer", QUESTION,
                    details=_setup(cfg))
    means = {n: float(np.mean(list(v[1].values()))) for n, v in scores.items()}
    order = sorted(means, key=means.__getitem__)
    best = order[0]
    ties, worse = [], []
    for n in order[1:]:
        d = _paired(scores[n][1], scores[best][1])
        (ties if d is not None and d.lo <= TOL else worse).append(n)
    parts = []
    for n in order:
        t = _time_ratio(results, cfg, n) if n != "ln" else None
        cost = f", step time {format_interval(t[1])}× LN's" if t else ""
        parts.append(f"{n} {_mean_text(scores[n][1])} (lr {scores[n][0]:g}{cost})")
    sentence = (f"On this character-level transformer ({size} corpus, Pre-LN placement): {best} is best"
                + (f"; {', '.join(ties)} within {TOL} {BPC} of it (interval of the gap reaches below {TOL})"
                   if ties else "")
                + (f"; worse: {', '.join(worse)}" if worse else "") + ". ")
    # the margin of the winner: runner-up − best (how far the answer is from a tie)
    second = order[1] if len(order) > 1 else None
    d = _paired(scores[second][1], scores[best][1]) if second else None
    return Card(NAME, QUESTION, sentence + "Per method: " + "; ".join(parts) + ".", "answer", QUESTION,
                answers="architecture", figure="transformer_lr.png", effect=d, effect_label=f"{second} − {best}, runner-up − best ({BPC})" if d else "",
                details=_setup(cfg))


def ranking(results: list[RunResult], cfg: Config) -> list[Ranking]:
    """Validation bits/char of every method at its best learning rate (the report's answer to
    "which normalization for CNNs, RNNs, transformers…?")."""
    size = _large(cfg)
    values = {n: list(_at_best(results, cfg, norm=n, size=size)[1].values()) for n in cfg.norms}
    return [Ranking(study=NAME, task=f"transformer LM on the {size} chars corpus (Pre-LN)",
                    metric="validation loss", values=values, unit=" bits/char", bounds=(0.0, L0),
                    question="architecture", evidence=QUESTION, figure="transformer_lr.png")]


# -- figures --------------------------------------------------------------------------------------
def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    outdir.mkdir(parents=True, exist_ok=True)
    return [_fig_curves(results, cfg, outdir), _fig_lr(results, cfg, outdir), _fig_time(results, cfg, outdir)]


def _curves(runs: list[RunResult]) -> tuple[np.ndarray, list[list[float]]] | None:
    good = [r for r in runs if not r.metric("diverged") and r.curve("val_bpc")]
    if not good:
        return None
    steps = [v for v in good[0].curve("step")]
    return np.asarray(steps), [[v for v in r.curve("val_bpc") if v is not None] for r in good]


def _fig_curves(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, len(cfg.sizes), (4.2, 3.2), sharey=True)
    for ax, size in zip(axes[0], cfg.sizes):
        for norm in cfg.norms if size == _large(cfg) else cfg.small_norms:
            lr = _best_lr(results, cfg, cfg.lrs, norm=norm, size=size)
            if lr is None:
                continue
            got = _curves(select(results, **_where(cfg, norm=norm, size=size, lr=lr)))
            band = got and plotting.t_band(got[1])
            if not band:
                continue
            mean, lo, hi = band
            x = got[0][: len(mean)]
            ax.plot(x, mean, color=plotting.color(norm), marker=plotting.marker(norm), ms=4,
                    label=f"{norm} (lr {lr:g})")
            plotting.band(ax, x, lo, hi, plotting.color(norm))
        ax.set_title(f"{size} corpus ({CHARS_SIZES[size] // 1024} K chars)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(top=min(L0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"validation {BPC}")
    return plotting.finish(fig, outdir / "transformer_curves.png", "Validation bits per character vs step",
                           "Pre-LN placement with warm-up; each method at its best learning rate; mean and "
                           "95% band over seeds (diverged runs left out).")


def _lr_series(ax: Any, results: list[RunResult], cfg: Config, lrs: tuple[float, ...], label: str, style: str,
               ls: str = "-", **arm: Any) -> None:
    pts = [(lr, mean_ci(list(v.values()))) for lr in lrs if (v := _bpc(results, cfg, lr=lr, **arm))]
    if not pts:
        return
    ax.errorbar([lr for lr, _ in pts], [iv.mean for _, iv in pts],
                yerr=np.hstack([plotting.ci_yerr(iv) or [[0.0], [0.0]] for _, iv in pts]),
                color=plotting.color(style), marker=plotting.marker(style), ls=ls, capsize=3, label=label)


def _fig_lr(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, 3, (4.0, 3.2), sharey=True)
    big = _large(cfg)
    ax = axes[0][0]
    for norm in cfg.norms:
        _lr_series(ax, results, cfg, cfg.lrs, norm, norm, norm=norm, size=big)
    ax.set_title(f"methods (Pre-LN, warm-up), {big}", fontsize=9)
    ax = axes[0][1]
    for placement, style in (("pre", "ln"), ("post", "post-ln"), ("peri", "peri-ln")):
        for warmup, ls in ((cfg.warmup, "-"), (0, "--")):
            if placement in cfg.placements or (placement == "peri" and cfg.peri and warmup == cfg.warmup):
                _lr_series(ax, results, cfg, cfg.lrs, f"{placement}-LN{'' if warmup else ', no warm-up'}",
                           style, ls, norm="ln", size=big, placement=placement, warmup=warmup)
    ax.set_title("placement × warm-up (LN)", fontsize=9)
    ax = axes[0][2]
    for qk, style in ((None, "ln"), ("ln", "ln+qk")):
        _lr_series(ax, results, cfg, cfg.qk_lrs, "LN + QK-norm" if qk else "LN", style, norm="ln", size=big, qk=qk)
    ax.set_title("QK-norm (LN, Pre-LN, warm-up)", fontsize=9)
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not run at this profile", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel(f"final validation {BPC}")
    return plotting.finish(fig, outdir / "transformer_lr.png", "Final loss vs learning rate",
                           f"Mean and 95% CI over seeds; a diverged run counts as {L0:g} {BPC} (a uniform guess).")


def _fig_time(results: list[RunResult], cfg: Config, outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, 2, (4.0, 3.0))
    big = _large(cfg)
    for i, norm in enumerate(cfg.norms):
        secs = values(results, "train_step_s", norm=norm, runner=LM_RUNNER, data_options={"size": big})
        if len(secs) >= 1:
            iv = mean_ci([1e3 * s for s in secs])
            axes[0][0].bar(i, iv.mean, color=plotting.color(norm), yerr=plotting.ci_yerr(iv), capsize=3)
        t = _time_ratio(results, cfg, norm) if norm != "ln" else None
        if t is not None:
            iv = t[1]
            axes[0][1].bar(i, iv.mean, color=plotting.color(norm), yerr=plotting.ci_yerr(iv), capsize=3)
        elif norm == "ln":
            axes[0][1].bar(i, 1.0, color=plotting.color(norm), alpha=0.4)  # the reference, by definition
    for ax, label in zip(axes[0], ("ms per training step", "step time / LN's (in turns)")):
        ax.set_xticks(range(len(cfg.norms)), list(cfg.norms))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0][1].axhline(1.0, color="gray", lw=0.8)
    return plotting.finish(fig, outdir / "transformer_time.png", "Training-step time per method",
                           f"Batch {cfg.batch_size} × {cfg.context} characters, one thread; right: each run's "
                           "model timed in turns with the same model under LN (geometric mean, 95% CI). "
                           "Timings on a shared machine are noisy; the ratio is the robust number.")
