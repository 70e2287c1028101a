"""Learning rate, convergence and saturating units: the Batch Norm paper's §4.1–4.2 on digits.

The article lists BatchNorm's benefits (from Ioffe & Szegedy, 2015): it reduces internal
covariate shift and speeds up training; it allows higher learning rates without the risk of
divergence; it lets saturating nonlinearities be used by keeping the network out of their
saturated regime. The paper's MNIST experiment (§4.1) trains a network of 3 fully connected
hidden layers of 100 sigmoid units, with and without BN, and shows (Fig. 1) that the BN network
trains faster and that the distribution of a sigmoid's input, as 15th/50th/85th percentiles,
drifts during training without BN and stays put with BN. §4.2 raises the learning rate ×5 and ×30.

This study repeats that on the lab's ``digits`` (8×8) data:

* MLP 64-100-100-100-10 with sigmoid units, ``norm`` ``none`` or ``bn`` (BN between each linear
  layer and its sigmoid), SGD with momentum 0.9, batch 32, constant learning rate
  ``base_lr × m`` for ``m`` in ``multipliers`` (×1, ×5, ×30). ``base_lr = 0.2`` is near the best
  rate of the network *without* BN in a pilot (0.1: 90% after ~2 700 steps, 0.2: ~1 900, 0.5: stuck
  near 30%), as in the paper, where the baseline's own rate is the reference.
* Every ``eval_every_steps`` steps the validation accuracy is measured; "steps to 90%" is the
  first step at which it reaches ``target_acc``. A run that never gets there is *censored* at
  the step budget: the budget is a lower bound of its true value. It is used as such in the
  interval (which can only understate a speed-up of the other arm); if the arm claimed to be
  faster has censored runs, a "supported" verdict is downgraded to "inconclusive".
* Failure ("divergence"): a non-finite training or validation loss (training stops), or a final
  validation accuracy below ``collapse_acc`` (50%, chance is 10%): the run did not train.
* Pre-activation percentiles (the paper's Fig. 1(b,c)): the inputs of the sigmoids of one hidden
  layer (``probe_layer``, default the last) on a fixed probe set of ``probe_samples`` training
  images, every ``probe_every_steps`` steps, in training mode (BN uses the probe batch's
  statistics; its running statistics are saved and restored, so the probe does not change the
  run). Percentiles are taken per unit over the probe samples. Drift = mean over units and over
  the three percentiles of ``|mean over the last 10% of probes − mean over the first 10%|``, in
  the sigmoid's input units (what decides saturation). Also recorded: the fraction of sigmoid
  inputs with ``|x| > 3`` (where the sigmoid's slope is below 0.05), "saturated".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.lab import plotting
from normlab.lab.analysis import by_seed, n_val, ratio_interval, select
from normlab.lab.data import load_dataset
from normlab.lab.hooks import AccuracyEvery
from normlab.lab.models import ACTIVATIONS
from normlab.lab.norms import get_norm
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import diff_ci, format_interval, mean_ci, rate_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure
from normlab.lab.train import train

NAME = "learning-rate"
TITLE = "Learning rate, convergence and saturating units (Batch Norm paper §4.1–4.2)"
SUMMARY = (
    "Sigmoid MLP (3×100) on digits with and without BN at learning rate ×1, ×5, ×30: divergence, "
    "steps to 90%, drift of the sigmoid inputs' percentiles, saturation."
)
ORDER = 30

PERCENTILES = (0.15, 0.50, 0.85)
SATURATION = 3.0  # |x| above which the sigmoid's slope is < 0.05 (0.25 at 0)

CLAIM_LR = "BatchNorm allows higher learning rates without divergence."
CLAIM_SPEED = "BatchNorm speeds up convergence (fewer steps to reach 90% accuracy)."
CLAIM_ICS = (
    "BatchNorm stabilizes the distribution of a layer's inputs during training (reduces internal "
    "covariate shift in the original sense)."
)
CLAIM_SAT = "BatchNorm lets networks with saturating nonlinearities (sigmoid) train."


@dataclass
class Config:
    """Full grid (``quick()`` is the small profile used by ``normlab demo``).

    Attributes:
        norms: ``none`` and ``bn`` (the cards compare these two; other MLP norms may be added).
        seeds: training seeds (init and batch order; the data split is fixed).
        data: data set (digits).
        base_lr / multipliers: learning rates ``base_lr × m``.
        hidden / activation: the MLP.
        batch_size / max_steps: training budget.
        eval_every_steps: validation accuracy measured every this many steps.
        target_acc: the accuracy of "steps to 90%".
        collapse_acc: a final validation accuracy below this counts as a failed (diverged) run.
        probe_layer: hidden layer whose sigmoid inputs are probed (0-based, negative from the end).
        probe_every_steps / probe_samples: percentile probe schedule and probe-set size.
        limit: at most this many training samples (None: all).
        tolerance: smallest accuracy difference (percentage points) that counts for the
            saturating-units card.
    """

    norms: tuple[str, ...] = ("none", "bn")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    data: str = "digits"
    base_lr: float = 0.2
    multipliers: tuple[float, ...] = (1.0, 5.0, 30.0)
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    batch_size: int = 32
    max_steps: int = 3000
    eval_every_steps: int = 10
    target_acc: float = 0.9
    collapse_acc: float = 0.5
    probe_layer: int = -1
    probe_every_steps: int = 25
    probe_samples: int = 256
    limit: int | None = None
    tolerance: float = 1.0

    @classmethod
    def quick(cls) -> Config:
        # 2 000 steps: the sigmoid net without BN needs ~1 500 to leave its initial plateau.
        # Rates ×1 and ×5 only: ×30 fails with and without BN (in the full grid too), so it
        # decides none of the cards, and its runs were a third of this profile's time.
        return cls(seeds=(0, 1), multipliers=(1.0, 5.0), max_steps=2000, eval_every_steps=20,
                   probe_every_steps=40)


def validate(cfg: Config) -> None:
    """Reject settings the runner cannot handle."""
    for n in cfg.norms:
        get_norm(n)
    if not cfg.seeds:
        raise ValueError("seeds: at least one seed is needed")
    if cfg.base_lr <= 0 or not cfg.multipliers or min(cfg.multipliers) <= 0:
        raise ValueError(f"base_lr and multipliers must be > 0, got {cfg.base_lr}, {cfg.multipliers}")
    if not cfg.hidden:
        raise ValueError("hidden: at least one hidden layer is needed (its inputs are probed)")
    if not -len(cfg.hidden) <= cfg.probe_layer < len(cfg.hidden):
        raise ValueError(f"probe_layer {cfg.probe_layer} is out of range for {len(cfg.hidden)} hidden layers")
    if not 0 < cfg.target_acc < 1 or not 0 <= cfg.collapse_acc < 1:
        raise ValueError("target_acc must be in (0, 1) and collapse_acc in [0, 1)")
    for name in ("batch_size", "max_steps", "eval_every_steps", "probe_every_steps", "probe_samples"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def runs(cfg: Config) -> list[dict[str, Any]]:
    """One run per (norm, multiplier, seed); the largest rates first (they fail fastest)."""
    data_options: dict[str, Any] = {} if cfg.limit is None else {"limit": int(cfg.limit)}
    out = []
    for mult in cfg.multipliers:
        for norm in cfg.norms:
            for seed in cfg.seeds:
                out.append(
                    {
                        "runner": "learning-rate-train",
                        "data": cfg.data,
                        "data_options": data_options,
                        "norm": norm,
                        "seed": int(seed),
                        "base_lr": float(cfg.base_lr),
                        "multiplier": float(mult),
                        "lr": float(cfg.base_lr * mult),
                        "hidden": [int(h) for h in cfg.hidden],
                        "activation": cfg.activation,
                        "batch_size": int(cfg.batch_size),
                        "max_steps": int(cfg.max_steps),
                        "eval_every_steps": int(cfg.eval_every_steps),
                        "target_acc": float(cfg.target_acc),
                        "collapse_acc": float(cfg.collapse_acc),
                        "probe_layer": int(cfg.probe_layer),
                        "probe_every_steps": int(cfg.probe_every_steps),
                        "probe_samples": int(cfg.probe_samples),
                    }
                )
    return out


# ---------------------------------------------------------------------------------------------
# Hooks and runner
# ---------------------------------------------------------------------------------------------
class PercentileProbe:
    """Per-unit 15/50/85th percentiles of one activation layer's inputs on a fixed probe set.

    The probe runs in training mode (BN normalizes with the probe batch's statistics, as during
    training) without gradients; every buffer (BN's running statistics) is saved before and
    restored after, so probing does not change the run.
    """

    def __init__(self, layer: int, every: int, samples: int, activation: type | None = None) -> None:
        self.layer, self.every, self.samples = int(layer), int(every), int(samples)
        self.activation = activation
        self.steps: list[int] = []
        self.pct: list[np.ndarray] = []  # each (3, units)
        self.saturated: list[float] = []
        self._x: Any = None
        self._module: Any = None
        self._captured: Any = None

    def on_train_start(self, model: Any, config: Any, data: Any) -> None:
        kinds = (self.activation,) if self.activation is not None else tuple(ACTIVATIONS.values())
        acts = [m for m in model.modules() if isinstance(m, kinds)]
        if not acts:
            raise ValueError("PercentileProbe: the model has no activation layer to probe")
        self._module = acts[self.layer]
        self._x = data.train.tensors[0][: self.samples]
        self._probe(0, model)

    def on_step(self, step: int, model: Any, batch: Any, loss: float) -> None:
        if step % self.every == 0:
            self._probe(step, model)

    def _probe(self, step: int, model: Any) -> None:
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        was_training = model.training
        handle = self._module.register_forward_hook(self._grab)
        try:
            model.train()
            with torch.no_grad():
                model(self._x)
        finally:
            handle.remove()
            model.train(was_training)
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])
        z = self._captured.double()
        if not torch.isfinite(z).all():
            return
        q = torch.quantile(z, torch.tensor(PERCENTILES, dtype=z.dtype), dim=0)
        self.steps.append(int(step))
        self.pct.append(q.numpy())
        self.saturated.append(float((z.abs() > SATURATION).double().mean()))

    def _grab(self, module: Any, inputs: Any, output: Any) -> None:
        self._captured = inputs[0].detach().reshape(inputs[0].shape[0], -1)

    def drift(self, window: float = 0.1) -> float | None:
        """Mean |late − early| of the per-unit percentiles (first/last ``window`` of the probes)."""
        if len(self.pct) < 2:
            return None
        p = np.stack(self.pct)  # (probes, 3, units)
        k = max(1, int(round(window * len(p))))
        return float(np.mean(np.abs(p[-k:].mean(axis=0) - p[:k].mean(axis=0))))


@register_runner("learning-rate-train")
def learning_rate_runner(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train the sigmoid MLP once, with the accuracy and percentile probes."""
    bs = int(config["batch_size"])
    n_train = load_dataset(config["data"], seed=0, **config["data_options"]).n_train
    per_epoch = max(1, n_train // bs)
    max_steps = int(config["max_steps"])
    epochs = math.ceil(max_steps / per_epoch)
    tcfg = {
        "data": config["data"],
        "model": "mlp",
        "norm": config["norm"],
        "batch_size": bs,
        "epochs": epochs,
        "max_steps": max_steps,
        "lr": float(config["lr"]),
        "lr_scaling": "none",
        "seed": int(config["seed"]),
        "data_options": dict(config["data_options"]),
        "model_options": {"hidden": list(config["hidden"]), "activation": config["activation"]},
        "eval_every": max(1, epochs // 20),
    }
    acc = AccuracyEvery(int(config["eval_every_steps"]), float(config["target_acc"]))
    probe = PercentileProbe(
        int(config["probe_layer"]),
        int(config["probe_every_steps"]),
        int(config["probe_samples"]),
        ACTIVATIONS[config["activation"]],
    )
    result = train(tcfg, log, hooks=[acc, probe])
    final_acc = result.get("final_val_acc")
    finite = not result["diverged"] and final_acc is not None and math.isfinite(float(result["final_train_loss"]))
    failed = (not finite) or float(final_acc) < float(config["collapse_acc"])
    pct = np.stack(probe.pct) if probe.pct else np.zeros((0, 3, 1))
    late = max(1, int(round(0.1 * len(probe.saturated)))) if probe.saturated else 0
    result.update(
        steps_to_target=acc.hit,
        reached=acc.hit is not None,
        steps_to_target_censored=acc.hit if acc.hit is not None else max_steps,
        failed=bool(failed),
        val_err=100.0 * (1.0 - float(final_acc)) if final_acc is not None and finite else 100.0,
        acc_curve=[list(p) for p in acc.curve],
        drift=probe.drift(),
        probe_steps=probe.steps,
        # unit 0 ("a typical sigmoid", as in the paper's figure) and the mean over units
        pct_unit0=pct[:, :, 0].T.tolist() if len(pct) else [],
        pct_mean=pct.mean(axis=2).T.tolist() if len(pct) else [],
        saturated_curve=probe.saturated,
        saturated_late=float(np.mean(probe.saturated[-late:])) if late else None,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------
def _m(x: float) -> str:
    return f"×{x:g}"


def _card_lr(results: list[RunResult], cfg: Config) -> Card:
    mults = sorted(cfg.multipliers)
    rank: dict[str, dict[int, int]] = {}
    lines = []
    for norm in ("none", "bn"):
        fails = {m: by_seed(results, "failed", norm=norm, multiplier=float(m)) for m in mults}
        seeds = sorted(set.union(set(), *(set(v) for v in fails.values())))
        rank[norm] = {
            s: max([i + 1 for i, m in enumerate(mults) if fails[m].get(s) is False], default=0) for s in seeds
        }
        nonfinite = {m: by_seed(results, "diverged", norm=norm, multiplier=float(m)) for m in mults}
        per = ", ".join(
            f"{_m(m)}: {sum(bool(v) for v in fails[m].values())}/{len(fails[m])}"
            + (f" ({sum(bool(v) for v in nonfinite[m].values())} non-finite)" if any(nonfinite[m].values()) else "")
            for m in mults if fails[m]
        )
        lines.append(f"{norm} {per}")
    a, b = list(rank["bn"].values()), list(rank["none"].values())
    if not a or not b:
        return Card(study=NAME, claim=CLAIM_LR, verdict="inconclusive", measurement="needs finished 'bn' and 'none' runs")
    effect = diff_ci(a, b)
    v = verdict(effect, "greater")

    def largest(ranks: list[int]) -> str:
        vals = [("none" if r == 0 else _m(mults[r - 1])) for r in ranks]
        u, c = np.unique(vals, return_counts=True)
        return ", ".join(f"{x} ({n}/{len(ranks)} seeds)" for x, n in zip(u, c))

    return Card(
        study=NAME,
        claim=CLAIM_LR,
        measurement=(
            f"runs that failed (non-finite loss, or final validation accuracy < "
            f"{100 * cfg.collapse_acc:g}% after {cfg.max_steps} steps), base rate {cfg.base_lr:g}: "
            + "; ".join(lines)
            + f". Largest multiplier that trained: BN {largest(a)}; none {largest(b)}. "
            f"BN − none in multiplier steps (0 = none of them, 1 = {_m(mults[0])} …): {format_interval(effect)}."
        ),
        verdict=v,
        effect=effect,
        effect_label="largest rate that trained, BN − none (steps of the multiplier grid)",
        details=(
            "Per seed, the largest learning-rate multiplier of the grid at which the run trained "
            "(index in the grid); Welch 95% interval of BN − none. Supported when the interval is "
            "above 0 (BN trains at a higher rate than the same network without BN). A sigmoid "
            "network rarely produces a non-finite loss: too large a rate drives its units into "
            "saturation, where it stays at chance accuracy (the 'accuracy collapse' counted here). "
            "A budget too short for a slow run to leave its initial plateau also counts as failed: "
            "check the accuracy figure when the budget is small (quick profile)."
        ),
    )


def _censored(results: list[RunResult], norm: str, mult: float) -> tuple[list[float], int]:
    rs = select(results, norm=norm, multiplier=float(mult))
    vals = [float(r.metric("steps_to_target_censored")) for r in rs]
    return vals, sum(not r.metric("reached") for r in rs)


def _card_speed(results: list[RunResult], cfg: Config) -> Card:
    m1 = min(cfg.multipliers)
    sn, cn = _censored(results, "none", m1)
    sb, cb = _censored(results, "bn", m1)
    if not sn or not sb:
        return Card(study=NAME, claim=CLAIM_SPEED, verdict="inconclusive", measurement="needs finished 'bn' and 'none' runs")
    effect = diff_ci(np.log10(sn), np.log10(sb))
    ratio = ratio_interval(effect)
    v = verdict(effect, "greater")
    note = ""
    if cb and v == "supported":
        v, note = "inconclusive", " (downgraded: some BN runs never reached the target)"
    other = []
    for m in sorted(cfg.multipliers):
        if m == m1:
            continue
        for norm in ("none", "bn"):
            s, c = _censored(results, norm, m)
            if s:
                other.append(f"{norm} {_m(m)}: {len(s) - c}/{len(s)} reached, mean {np.mean(s):.0f}")
    tgt = f"{100 * cfg.target_acc:g}%"
    return Card(
        study=NAME,
        claim=CLAIM_SPEED,
        measurement=(
            f"steps to {tgt} validation accuracy at the same rate ({cfg.base_lr * m1:g}): none "
            f"{format_interval(mean_ci(sn))} ({len(sn) - cn}/{len(sn)} reached within {cfg.max_steps}), BN "
            f"{format_interval(mean_ci(sb))} ({len(sb) - cb}/{len(sb)} reached); none/BN "
            f"{ratio.mean:.3g}× [{ratio.lo:.3g}, {ratio.hi:.3g}]{note}. "
            + ("Other rates: " + "; ".join(other) + "." if other else "")
        ),
        verdict=v,
        effect=ratio,
        effect_label=f"steps to {tgt} accuracy, none / BN (×)",
        details=(
            "Effect = steps none / steps BN: geometric-mean ratio with the Welch 95% interval of "
            "log10(steps none) − log10(steps BN) over seeds; supported when above 1. A run that "
            f"never reaches {tgt} counts as {cfg.max_steps} steps, a lower bound of its true value: "
            "this can only understate BN's advantage when it is the no-BN runs that are censored; a "
            "'supported' verdict resting on censored BN runs is downgraded. Accuracy measured every "
            f"{cfg.eval_every_steps} steps."
        ),
    )


def _card_ics(results: list[RunResult], cfg: Config) -> Card:
    m1 = min(cfg.multipliers)
    dn = [v for v in by_seed(results, "drift", norm="none", multiplier=float(m1)).values() if v is not None]
    db = [v for v in by_seed(results, "drift", norm="bn", multiplier=float(m1)).values() if v is not None]
    if not dn or not db:
        return Card(study=NAME, claim=CLAIM_ICS, verdict="inconclusive", measurement="needs finished 'bn' and 'none' runs with probes")
    effect = diff_ci(dn, db)
    v = verdict(effect, "greater")
    other = []
    for m in sorted(cfg.multipliers):
        if m == m1:
            continue
        for norm in ("none", "bn"):
            d = [x for x in by_seed(results, "drift", norm=norm, multiplier=float(m)).values() if x is not None]
            if d:
                other.append(f"{norm} {_m(m)} {format_interval(mean_ci(d))}")
    layer = cfg.probe_layer if cfg.probe_layer >= 0 else len(cfg.hidden) + cfg.probe_layer
    return Card(
        study=NAME,
        claim=CLAIM_ICS,
        measurement=(
            f"drift of the 15/50/85th percentiles of the sigmoid inputs of hidden layer {layer + 1} "
            f"(rate {cfg.base_lr * m1:g}): none {format_interval(mean_ci(dn))}, BN {format_interval(mean_ci(db))}; "
            f"none − BN {format_interval(effect)}."
            + (" Other rates: " + "; ".join(other) + "." if other else "")
        ),
        verdict=v,
        effect=effect,
        effect_label="drift of the sigmoid-input percentiles, none − BN (pre-activation units)",
        details=(
            "Drift = mean over units and percentiles of |late − early|, early/late = the first/last "
            f"10% of the probes (every {cfg.probe_every_steps} steps on {cfg.probe_samples} fixed "
            "training images, training-mode statistics), in the sigmoid's input units. Welch 95% "
            "interval. This is ICS in the original sense (the distribution a layer sees moves); "
            "whether that is why BN helps is another question (Santurkar et al., 2018, the article's "
            "reference 4, argue it is not)."
        ),
    )


def _card_saturation(results: list[RunResult], cfg: Config) -> Card:
    best: dict[str, float] = {}
    accs: dict[str, list[float]] = {}
    for norm in ("none", "bn"):
        per_m = {}
        for m in cfg.multipliers:
            vals = [100 * float(r.metric("final_val_acc") or 0.0) for r in select(results, norm=norm, multiplier=float(m))]
            vals = [x if math.isfinite(x) else 0.0 for x in vals]
            if vals:
                per_m[m] = vals
        if per_m:
            best[norm] = max(per_m, key=lambda m: float(np.mean(per_m[m])))
            accs[norm] = per_m[best[norm]]
    if "none" not in accs or "bn" not in accs:
        return Card(study=NAME, claim=CLAIM_SAT, verdict="inconclusive", measurement="needs finished 'bn' and 'none' runs")
    effect = diff_ci(accs["bn"], accs["none"])
    v = verdict(effect, "greater", tolerance=cfg.tolerance)
    nv = n_val(results)
    m1 = min(cfg.multipliers)
    sat = {}
    for norm in ("none", "bn"):
        s = [x for x in by_seed(results, "saturated_late", norm=norm, multiplier=float(m1)).values() if x is not None]
        sat[norm] = format_interval(rate_ci([100 * x for x in s])) + "%" if s else "n/a"
    return Card(
        study=NAME,
        claim=CLAIM_SAT,
        measurement=(
            f"final validation accuracy of the sigmoid MLP, each at its best rate multiplier: BN "
            f"{_m(best['bn'])} {format_interval(rate_ci(accs['bn'], nv))}%, none {_m(best['none'])} "
            f"{format_interval(rate_ci(accs['none'], nv))}%; BN − none {format_interval(effect)} points. "
            f"Saturated sigmoid inputs (|x| > {SATURATION:g}) late in training at rate {cfg.base_lr * m1:g}: "
            f"none {sat['none']}, BN {sat['bn']}."
        ),
        verdict=v,
        effect=effect,
        effect_label="final validation accuracy at each arm's best rate, BN − none (points)",
        details=(
            f"Supported when BN's accuracy is higher by more than {cfg.tolerance:g} point(s) (Welch "
            "95% interval entirely above); not supported when the interval lies below that, i.e. the "
            "sigmoid network trains about as well without BN once its learning rate is right. Each "
            f"arm is given its best multiplier of {', '.join(_m(m) for m in cfg.multipliers)}, "
            f"within {cfg.max_steps} steps; failed runs count with their final accuracy."
        ),
    )


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """Four claim cards: higher rates, faster convergence, stable inputs, saturating units."""
    return [_card_lr(results, cfg), _card_speed(results, cfg), _card_ics(results, cfg), _card_saturation(results, cfg)]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """Accuracy curves per rate, percentile curves (Fig. 1(b,c) style), saturation."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    norms = [n for n in cfg.norms if select(results, norm=n)]
    if not norms:
        return []
    return [
        _fig_accuracy(results, cfg, norms, outdir),
        _fig_percentiles(results, cfg, norms, outdir),
        _fig_saturation(results, cfg, norms, outdir),
    ]


def _fig_accuracy(results: list[RunResult], cfg: Config, norms: list[str], outdir: Path) -> Figure:
    mults = sorted(cfg.multipliers)
    fig, axes = plotting.panels(1, len(mults), (4, 3.3), sharey=True)
    for ax, m in zip(axes[0], mults):
        for norm in norms:
            for k, r in enumerate(select(results, norm=norm, multiplier=float(m))):
                cv = np.array(r.metric("acc_curve") or [], dtype=float)
                if cv.size:
                    ax.plot(cv[:, 0], 100 * cv[:, 1], color=plotting.color(norm), lw=0.8, alpha=0.7,
                            label=norm if k == 0 else None)
        ax.axhline(100 * cfg.target_acc, color="k", lw=0.6, ls=":")
        ax.set_title(f"lr {cfg.base_lr * m:g} ({_m(m)})", fontsize=10)
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][0].legend(fontsize=8)
    return plotting.finish(fig, outdir / "learning_rate_accuracy.png",
        title="Validation accuracy at ×1, ×5, ×30 the base learning rate",
        caption=f"Sigmoid MLP on {cfg.data}, one line per seed; dotted: {100 * cfg.target_acc:g}%.",
    )


def _fig_percentiles(results: list[RunResult], cfg: Config, norms: list[str], outdir: Path) -> Figure:
    mults = sorted(cfg.multipliers)
    seed = min(int(r.config["seed"]) for r in select(results))
    fig, axes = plotting.panels(len(norms), len(mults), (4, 2.8), sharex=True)
    for i, norm in enumerate(norms):
        for j, m in enumerate(mults):
            ax = axes[i][j]
            rs = select(results, norm=norm, multiplier=float(m), seed=seed)
            if rs and rs[0].metric("pct_unit0"):
                steps = rs[0].metric("probe_steps")
                for q, style in zip(rs[0].metric("pct_unit0"), ("--", "-", "--")):
                    ax.plot(steps[: len(q)], q, style, color=plotting.color(norm) or "k", lw=1.1)
            ax.set_title(f"{norm}, lr {cfg.base_lr * m:g} ({_m(m)})", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(norms) - 1:
                ax.set_xlabel("steps")
            if j == 0:
                ax.set_ylabel("sigmoid input")
    layer = cfg.probe_layer if cfg.probe_layer >= 0 else len(cfg.hidden) + cfg.probe_layer
    return plotting.finish(
        fig,
        outdir / "learning_rate_percentiles.png",
        title="Input distribution of a typical sigmoid during training",
        caption=(
            f"15th, 50th, 85th percentiles (dashed, solid, dashed) of the input to unit 0 of hidden layer "
            f"{layer + 1} over {cfg.probe_samples} fixed training images (seed {seed}), as in the Batch "
            "Norm paper's Figure 1(b, c)."
        ),
    )


def _fig_saturation(results: list[RunResult], cfg: Config, norms: list[str], outdir: Path) -> Figure:
    mults = sorted(cfg.multipliers)
    fig, ax = plotting.plt().subplots(figsize=(5.2, 3.3), dpi=100)
    for norm in norms:
        for ls, m in zip(("-", "--", ":"), mults):
            curves = [r for r in select(results, norm=norm, multiplier=float(m)) if r.metric("saturated_curve")]
            if not curves:
                continue
            n = min(len(r.metric("saturated_curve")) for r in curves)
            mean = np.mean([r.metric("saturated_curve")[:n] for r in curves], axis=0)
            ax.plot(curves[0].metric("probe_steps")[:n], 100 * mean, ls, color=plotting.color(norm),
                    label=f"{norm} {_m(m)}")
    ax.set_xlabel("steps")
    ax.set_ylabel(f"sigmoid inputs with |x| > {SATURATION:g} (%)")
    ax.set_title("saturation (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return plotting.finish(fig, outdir / "learning_rate_saturation.png",
        title="Saturated sigmoid units",
        caption="Fraction of the probed layer's sigmoid inputs in the saturated range, per rate.",
    )
