"""Input normalization: the article's two-feature example, measured.

The article (section "Tầm quan trọng của việc normalization dữ liệu đầu vào") takes two features,
``x1`` in ``[-200, 200]`` and ``x2`` in ``[-10, 10]``, and argues that without normalization the
weights of the two features live on very different scales, so gradient descent oscillates in the
steep direction and crawls in the flat one; standardizing the features fixes this and training
is faster. This study measures each link of that argument on the lab's ``synthetic2d`` data
(:func:`normlab.lab.data.load_synthetic2d`: ``t = 0.05·x1 + 1.0·x2 + noise``, so both features
move ``t`` by about ±10).

Part 1 — gradient descent on the exact quadratic (runner ``input-scaling-gd``, numpy):

* Model: linear, **without bias**, squared loss ``L(w) = ||Xw - y||² / (2n)`` on the training
  part of the data. Its Hessian is ``H = XᵀX / n``. The features are (near) zero-mean, so ``H`` is
  (nearly) diagonal with the feature variances on the diagonal: ``200²/3 ≈ 13 333`` and
  ``10²/3 ≈ 33``, condition number ``κ = λmax/λmin ≈ 400``. After standardization (normlab's
  :class:`~normlab.nn.Standardizer`, fitted on the training features) ``H`` is the correlation
  matrix, ``κ ≈ 1``. (A bias column would add an eigenvalue ≈ 1 for the raw features and push
  their ``κ`` to ≈ 13 000: the no-bias model isolates the effect of the feature *scales*, which is
  the article's point; with a bias the contrast is only larger.)
* Gradient descent from ``w = 0`` with step ``η = f · 2/λmax`` for each fraction ``f`` of a grid;
  the iterations needed to reach ``L - L* ≤ tol · (L0 - L*)`` (default ``tol = 1e-6``) are counted
  for each ``f`` and the best ``f`` is kept (``L*`` from a least-squares solve). Theory: at the
  best step the rate is ``(κ-1)/(κ+1)``, about ``κ/4 · ln(1/tol)`` iterations, so ≈ 1 400 raw
  vs a handful standardized.
* Divergence: ``η = 1.1 · 2/λmax`` is run for ``diverge_steps`` steps; the loss must grow
  (``|1 - ηλmax| = 1.2 > 1``). Raw features force a step ≈ 400 times smaller than standardized
  ones, and that step is then too small for the flat direction: the oscillation and crawl of the
  article.

Part 2 — an MLP on raw vs standardized inputs (runner ``input-scaling-mlp``, wraps
:func:`normlab.lab.train.train`): ``synthetic2d-cls`` (classify ``t > 0``), MLP with ReLU, SGD
with momentum, a grid of learning rates; the validation accuracy is measured every few steps and
the steps to reach ``target_acc`` are recorded. Each arm is compared at its own best learning
rate (lowest mean steps to target), so that neither is handicapped by a rate tuned for the
other. Standardized inputs = the same MLP with a :class:`~normlab.nn.Standardizer` in front (fitted
on the training inputs; no parameters, so both arms start from the same weights for a seed).

Replicates: seed ``s`` draws the data (``data_seed = s``) and, for the MLP, the init and batch
order. Runs that never reach the target are censored at the step budget (a lower bound on their
true value); how that enters each verdict is described on the cards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.lab import plotting
from normlab.lab.analysis import by_seed, n_val, ratio_interval, select
from normlab.lab.data import load_dataset
from normlab.lab.hooks import AccuracyEvery
from normlab.lab.models import build_model
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import Interval, compare, diff_ci, format_interval, mean_ci, paired_diff_ci, rate_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure
from normlab.lab.train import train
from normlab.nn.standardizer import Standardizer

NAME = "input-scaling"
TITLE = "Input normalization: conditioning and speed of training"
SUMMARY = (
    "The article's 2-feature example (x1 in ±200, x2 in ±10): Hessian condition number, gradient "
    "descent iterations and MLP training speed on raw vs standardized inputs."
)
ORDER = 10

SCALINGS = ("raw", "standardized")
DEFAULT_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

CLAIM_COND = "Input normalization makes the loss better conditioned (a rounder loss surface)."
CLAIM_GD = "Input normalization speeds up gradient descent."
CLAIM_MLP = "Input normalization speeds up the training of a neural network (an MLP)."


@dataclass
class Config:
    """Full grid (``quick()`` is the small profile used by ``normlab demo``).

    Attributes:
        seeds: replicates; seed ``s`` draws the data set (and the MLP's init and batch order).
        samples: samples drawn per data set (80% train, 20% validation).
        x1_range, x2_range: feature ranges (the article's ±200 and ±10).
        tolerance: GD stops at ``L - L* ≤ tolerance · (L0 - L*)``.
        step_fractions: step sizes tried, as fractions of ``2/λmax``.
        max_iters: GD iteration cap (a run that needs more counts as not converged).
        diverge_factor / diverge_steps: the divergence check runs ``diverge_factor · 2/λmax``.
        lrs: MLP learning rates (SGD, momentum 0.9) tried for each arm.
        hidden: MLP hidden sizes; batch_size, max_steps: its training budget.
        eval_every_steps: validation accuracy measured every this many steps.
        target_acc: accuracy whose first crossing defines "steps to target".
    """

    seeds: tuple[int, ...] = tuple(range(8))
    samples: int = 1000
    x1_range: tuple[float, float] = (-200.0, 200.0)
    x2_range: tuple[float, float] = (-10.0, 10.0)
    tolerance: float = 1e-6
    step_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    max_iters: int = 200_000
    diverge_factor: float = 1.1
    diverge_steps: int = 50
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    hidden: tuple[int, ...] = (32, 32)
    batch_size: int = 32
    max_steps: int = 1000
    eval_every_steps: int = 5
    target_acc: float = 0.93

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=(0, 1, 2), lrs=(1e-3, 1e-1), max_steps=300)


def validate(cfg: Config) -> None:
    """Reject settings the runners cannot handle."""
    if not cfg.seeds:
        raise ValueError("seeds: at least one seed is needed")
    if not 0 < cfg.tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {cfg.tolerance}")
    if not cfg.step_fractions or not all(0 < f < 1 for f in cfg.step_fractions):
        raise ValueError(f"step_fractions must be in (0, 1) (stable steps), got {cfg.step_fractions}")
    if cfg.diverge_factor <= 1:
        raise ValueError(f"diverge_factor must be > 1, got {cfg.diverge_factor}")
    if not cfg.lrs or not all(lr > 0 for lr in cfg.lrs):
        raise ValueError(f"lrs must be positive, got {cfg.lrs}")
    if not 0 < cfg.target_acc < 1:
        raise ValueError(f"target_acc must be in (0, 1), got {cfg.target_acc}")
    if cfg.samples < 20:
        raise ValueError(f"samples must be >= 20, got {cfg.samples}")
    for name in ("max_iters", "diverge_steps", "batch_size", "max_steps", "eval_every_steps"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def _data_options(cfg: Config) -> dict[str, Any]:
    return {
        "n": int(cfg.samples),
        "x1_range": [float(v) for v in cfg.x1_range],
        "x2_range": [float(v) for v in cfg.x2_range],
    }


def runs(cfg: Config) -> list[dict[str, Any]]:
    """GD runs (one per seed and scaling) and MLP runs (seed × scaling × learning rate)."""
    out: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for scaling in SCALINGS:
            out.append(
                {
                    "runner": "input-scaling-gd",
                    "part": "gd",
                    "scaling": scaling,
                    "data_seed": int(seed),
                    "data_options": _data_options(cfg),
                    "tolerance": float(cfg.tolerance),
                    "step_fractions": [float(f) for f in cfg.step_fractions],
                    "max_iters": int(cfg.max_iters),
                    "diverge_factor": float(cfg.diverge_factor),
                    "diverge_steps": int(cfg.diverge_steps),
                }
            )
    for seed in cfg.seeds:
        for scaling in SCALINGS:
            for lr in cfg.lrs:
                out.append(
                    {
                        "runner": "input-scaling-mlp",
                        "part": "mlp",
                        "scaling": scaling,
                        "seed": int(seed),
                        "data_seed": int(seed),
                        "data_options": _data_options(cfg),
                        "lr": float(lr),
                        "hidden": [int(h) for h in cfg.hidden],
                        "batch_size": int(cfg.batch_size),
                        "max_steps": int(cfg.max_steps),
                        "eval_every_steps": int(cfg.eval_every_steps),
                        "target_acc": float(cfg.target_acc),
                    }
                )
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: gradient descent on the exact quadratic
# ---------------------------------------------------------------------------------------------
def standardize(x: np.ndarray) -> tuple[np.ndarray, str]:
    """Standardize the columns of ``x`` with normlab's :class:`~normlab.nn.Standardizer`.

    Returns the standardized array (float64) and the name of the tool used.
    """
    x = np.asarray(x, dtype=np.float64)
    t = torch.from_numpy(x)
    std = Standardizer(x.shape[1]).fit(t)
    with torch.no_grad():
        return std(t).numpy().astype(np.float64), "normlab.nn.Standardizer"


def quadratic(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The least-squares quadratic of a bias-free linear model: Hessian, minimizer, minimum.

    ``L(w) = ||xw - y||² / (2n) = L* + ½ (w - w*)ᵀ H (w - w*)`` with ``H = xᵀx/n``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    h = x.T @ x / n
    b = x.T @ y / n
    w_star = np.linalg.solve(h, b)
    l_star = float(np.sum((x @ w_star - y) ** 2) / (2 * n))
    eig = np.linalg.eigvalsh(h)
    return {"h": h, "b": b, "w_star": w_star, "l_star": l_star, "lmin": float(eig[0]),
            "lmax": float(eig[-1]), "condition": float(eig[-1] / eig[0])}


def excess_loss(w: np.ndarray, h: np.ndarray, w_star: np.ndarray) -> np.ndarray:
    """``L(w) - L* = ½ (w - w*)ᵀ H (w - w*)`` for one ``w`` or a stack of them (rows)."""
    d = np.atleast_2d(w) - w_star
    return 0.5 * np.einsum("ij,jk,ik->i", d, h, d)


def gd_iterations(
    h: np.ndarray,
    b: np.ndarray,
    steps: np.ndarray,
    *,
    tolerance: float,
    max_iters: int,
    w0: np.ndarray | None = None,
) -> list[int | None]:
    """Iterations of ``w ← w - η (Hw - b)`` until ``L - L* ≤ tolerance · (L0 - L*)``, per step ``η``.

    All step sizes run at once (one row of ``w`` each). ``None``: not reached in ``max_iters``
    (too slow, or diverging).
    """
    steps = np.asarray(steps, dtype=np.float64)
    w_star = np.linalg.solve(h, b)
    w = np.zeros((len(steps), len(b))) if w0 is None else np.tile(np.asarray(w0, float), (len(steps), 1))
    target = tolerance * excess_loss(w[0], h, w_star)[0]
    found: list[int | None] = [None] * len(steps)
    active = np.ones(len(steps), dtype=bool)
    eta = steps[:, None]
    for it in range(1, max_iters + 1):
        w = w - eta * (w @ h - b)
        exc = excess_loss(w, h, w_star)
        hit = active & (exc <= target)
        for i in np.flatnonzero(hit):
            found[i] = it
        active &= ~hit
        # A non-finite or exploding iterate will never come back: stop tracking it.
        active &= np.isfinite(exc) & (exc < 1e30)
        if not active.any():
            break
    return found


def gd_trajectory(h: np.ndarray, b: np.ndarray, step: float, iters: int, w0: np.ndarray | None = None) -> np.ndarray:
    """The iterates ``w_0 … w_iters`` of gradient descent with step ``step`` (rows)."""
    w = np.zeros(len(b)) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    out = [w.copy()]
    for _ in range(iters):
        w = w - step * (h @ w - b)
        out.append(w.copy())
        if not np.all(np.isfinite(w)):
            break
    return np.array(out)


def _thin(n: int, keep: int) -> np.ndarray:
    """Indices ``0..n-1`` thinned to about ``keep`` (all early ones, then log-spaced)."""
    if n <= keep:
        return np.arange(n)
    head = np.arange(min(keep // 2, n))
    tail = np.unique(np.geomspace(max(len(head), 1), n - 1, keep - len(head)).astype(int))
    return np.unique(np.concatenate([head, tail, [n - 1]]))


def _synthetic_train(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset("synthetic2d", seed=int(config["data_seed"]), **config["data_options"])
    x, y = data.train.tensors
    return x.numpy().astype(np.float64), y.numpy().astype(np.float64)


@register_runner("input-scaling-gd")
def gd_runner(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Gradient descent on the exact least-squares quadratic of raw or standardized features."""
    x, y = _synthetic_train(config)
    tool = "none"
    if config["scaling"] == "standardized":
        x, tool = standardize(x)
    q = quadratic(x, y)
    h, b, w_star, lmax = q["h"], q["b"], q["w_star"], q["lmax"]
    fractions = np.asarray(config["step_fractions"], dtype=np.float64)
    steps = fractions * 2.0 / lmax
    iters = gd_iterations(h, b, steps, tolerance=float(config["tolerance"]), max_iters=int(config["max_iters"]))
    for i, (f, n_it) in enumerate(zip(fractions, iters)):
        log(i + 1, {"step_fraction": float(f), "step": float(steps[i]), "iterations": n_it})
    ok = [(n_it, i) for i, n_it in enumerate(iters) if n_it is not None]
    best_i = min(ok)[1] if ok else None
    best_iters = iters[best_i] if best_i is not None else None

    loss0 = float(excess_loss(np.zeros(len(b)), h, w_star)[0])
    traj_len = min(int(best_iters or config["max_iters"]), int(config["max_iters"]))
    traj = gd_trajectory(h, b, float(steps[best_i]) if best_i is not None else float(steps[0]), traj_len)
    exc = excess_loss(traj, h, w_star) / loss0
    keep = _thin(len(traj), 160)

    div_step = float(config["diverge_factor"]) * 2.0 / lmax
    dtraj = gd_trajectory(h, b, div_step, int(config["diverge_steps"]))
    dexc = excess_loss(dtraj, h, w_star) / loss0
    diverge_ratio = float(dexc[-1])  # (L_T - L*) / (L_0 - L*)
    return {
        "scaling": config["scaling"],
        "standardizer": tool,
        "condition": q["condition"],
        "log10_condition": math.log10(q["condition"]),
        "lambda_max": lmax,
        "lambda_min": q["lmin"],
        "feature_mean": [float(v) for v in x.mean(axis=0)],
        "feature_std": [float(v) for v in x.std(axis=0)],
        "hessian": h.tolist(),
        "w_star": w_star.tolist(),
        "l_star": q["l_star"],
        "best_fraction": float(fractions[best_i]) if best_i is not None else None,
        "best_step": float(steps[best_i]) if best_i is not None else None,
        "iterations": best_iters,
        "log10_iterations": math.log10(best_iters) if best_iters else None,
        "iterations_by_fraction": iters,
        "step_fractions": fractions.tolist(),
        "trajectory": traj[keep].tolist(),
        "trajectory_iter": keep.tolist(),
        "excess_curve": exc[keep].tolist(),
        "diverge_step": div_step,
        "diverge_ratio": diverge_ratio,
        "diverged": bool(not math.isfinite(diverge_ratio) or diverge_ratio > 1.0),
        "diverge_curve": dexc.tolist(),
        "diverge_trajectory": dtraj[: min(len(dtraj), 12)].tolist(),
        "theory_iterations": _theory_iterations(q["condition"], float(config["tolerance"])),
    }


def _theory_iterations(kappa: float, tolerance: float) -> float:
    """Iterations predicted at the optimal step ``2/(λmax+λmin)`` for the slowest direction."""
    rho = (kappa - 1.0) / (kappa + 1.0)
    if rho <= 0:
        return 1.0
    return math.log(1.0 / tolerance) / (2.0 * math.log(1.0 / rho))


# ---------------------------------------------------------------------------------------------
# Part 2: an MLP on raw vs standardized inputs
# ---------------------------------------------------------------------------------------------
def standardized_mlp(*, norm: str, input_shape: Any, num_classes: int, fit_data: dict[str, Any], **options: Any) -> Any:
    """The lab's MLP with a :class:`~normlab.nn.Standardizer` in front, fitted on training inputs.

    ``fit_data`` = ``{"spec", "seed", "options"}`` names the data set whose training inputs give
    the statistics (the same the trainer loads). The standardizer has no parameters, so the MLP
    draws exactly the same initial weights as without it.
    """
    data = load_dataset(fit_data["spec"], seed=int(fit_data["seed"]), **fit_data.get("options", {}))
    x = data.train.tensors[0]
    std = Standardizer(x.shape[-1]).fit(x)
    mlp = build_model("mlp", norm=norm, input_shape=input_shape, num_classes=num_classes, **options)
    return nn.Sequential(std, mlp)


@register_runner("input-scaling-mlp")
def mlp_runner(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train the MLP on raw or standardized ``synthetic2d-cls`` inputs, timing the target crossing."""
    spec = "synthetic2d-cls"
    model_options: dict[str, Any] = {"hidden": list(config["hidden"]), "activation": "relu"}
    model = "mlp"
    if config["scaling"] == "standardized":
        model = f"{__name__}:standardized_mlp"
        model_options["fit_data"] = {"spec": spec, "seed": int(config["data_seed"]), "options": dict(config["data_options"])}
    max_steps = int(config["max_steps"])
    tcfg = {
        "data": spec,
        "model": model,
        "norm": "none",
        "batch_size": int(config["batch_size"]),
        "epochs": max_steps,  # the step budget ends the run
        "max_steps": max_steps,
        "lr": float(config["lr"]),
        "lr_scaling": "none",
        "seed": int(config["seed"]),
        "data_seed": int(config["data_seed"]),
        "data_options": dict(config["data_options"]),
        "model_options": model_options,
    }
    hook = AccuracyEvery(int(config["eval_every_steps"]), float(config["target_acc"]))
    result = train(tcfg, log, hooks=[hook])
    curve = hook.curve
    keep = _thin(len(curve), 120)
    result.update(
        steps_to_target=hook.hit,
        reached=hook.hit is not None,
        # Censored at the budget when never reached: a lower bound of the true value.
        steps_to_target_censored=hook.hit if hook.hit is not None else max_steps,
        acc_curve=[list(curve[i]) for i in keep],
    )
    return result


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------
def _fmt_ratio(iv: Interval) -> str:
    """A log10 interval shown as a ratio ``10^mean [10^lo, 10^hi]``."""
    def p(v: float) -> str:
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "0"
        return f"{10 ** v:.3g}"

    return f"{p(iv.mean)}× [{p(iv.lo)}, {p(iv.hi)}]"


def _card_condition(results: list[RunResult], cfg: Config) -> Card:
    raw_k = by_seed(results, "log10_condition", seed_key="data_seed", part="gd", scaling="raw")
    std_k = by_seed(results, "log10_condition", seed_key="data_seed", part="gd", scaling="standardized")
    seeds = sorted(set(raw_k) & set(std_k))
    if not seeds:
        return Card(study=NAME, claim=CLAIM_COND, measurement="no finished gradient-descent runs", verdict="inconclusive")
    a = [raw_k[s] for s in seeds]
    b = [std_k[s] for s in seeds]
    effect = paired_diff_ci(a, b)
    kr = mean_ci([10**v for v in a])
    ks = mean_ci([10**v for v in b])
    return Card(
        study=NAME,
        claim=CLAIM_COND,
        measurement=(
            f"condition number κ = λmax/λmin of the Hessian XᵀX/n (linear model, no bias): "
            f"raw {format_interval(kr)}, standardized {format_interval(ks)}; "
            f"κ_raw/κ_std = {_fmt_ratio(effect)} (paired over {len(seeds)} data sets)"
        ),
        verdict=verdict(effect, "greater"),
        effect=ratio_interval(effect),
        effect_label="κ_raw / κ_std (×)",
        details=(
            "Effect = κ_raw/κ_std, geometric mean over data seeds with its 95% interval (a "
            "t-interval of log10(κ_raw) − log10(κ_std), paired by data seed); supported when "
            "the whole interval is above 1. "
            "For x1 uniform in ±200 and x2 in ±10 the Hessian is ≈ diag(200²/3, 10²/3), "
            "κ ≈ 400; standardized, it is the features' correlation matrix, κ ≈ 1. "
            "A bias column would make the raw κ ≈ 13 000 (its eigenvalue is ≈ 1)."
        ),
    )


def _card_gd(results: list[RunResult], cfg: Config) -> Card:
    raw_i = by_seed(results, "iterations", seed_key="data_seed", part="gd", scaling="raw")
    std_i = by_seed(results, "iterations", seed_key="data_seed", part="gd", scaling="standardized")
    seeds = sorted(s for s in set(raw_i) & set(std_i))
    if not seeds:
        return Card(study=NAME, claim=CLAIM_GD, measurement="no finished gradient-descent runs", verdict="inconclusive")
    # A run that never reached the tolerance is censored at max_iters (a lower bound).
    cap = float(cfg.max_iters)
    ra = [float(raw_i[s]) if raw_i[s] is not None else cap for s in seeds]
    sa = [float(std_i[s]) if std_i[s] is not None else cap for s in seeds]
    effect = paired_diff_ci(np.log10(ra), np.log10(sa))
    v = verdict(effect, "greater")
    censored_std = sum(std_i[s] is None for s in seeds)
    if censored_std and v == "supported":
        v = "inconclusive"
    fr = [r.metric("best_fraction") for r in select(results, part="gd", scaling="raw")]
    fs = [r.metric("best_fraction") for r in select(results, part="gd", scaling="standardized")]
    step_r = [r.metric("best_step") for r in select(results, part="gd", scaling="raw") if r.metric("best_step")]
    step_s = [r.metric("best_step") for r in select(results, part="gd", scaling="standardized") if r.metric("best_step")]
    div_r = [r.metric("diverge_ratio") for r in select(results, part="gd", scaling="raw")]
    div_s = [r.metric("diverge_ratio") for r in select(results, part="gd", scaling="standardized")]
    n_div = sum(bool(r.metric("diverged")) for r in select(results, part="gd"))
    n_gd = len(select(results, part="gd"))
    theory = [r.metric("theory_iterations") for r in select(results, part="gd", scaling="raw")]
    return Card(
        study=NAME,
        claim=CLAIM_GD,
        measurement=(
            f"iterations to L − L* ≤ {cfg.tolerance:g}·(L0 − L*) at each one's best step: "
            f"raw {format_interval(mean_ci(ra))}, standardized {format_interval(mean_ci(sa))}; "
            f"ratio raw/standardized {_fmt_ratio(effect)} (paired over {len(seeds)} data sets). "
            f"Best step: raw {np.mean(step_r):.3g} (f = {_mode(fr)} of 2/λmax), "
            f"standardized {np.mean(step_s):.3g} (f = {_mode(fs)}). "
            f"At {cfg.diverge_factor:g}·2/λmax the loss grew in {n_div}/{n_gd} runs "
            f"(×{_gmean(div_r):.3g} raw, ×{_gmean(div_s):.3g} standardized after "
            f"{cfg.diverge_steps} steps)."
        ),
        verdict=v,
        effect=ratio_interval(effect),
        effect_label="gradient-descent iterations to tolerance, raw / standardized (×)",
        details=(
            "Effect = iterations raw / iterations standardized, geometric mean with the 95% "
            "interval of the paired log10 difference (by data seed); supported when above 1. "
            "Step sizes tried: "
            + ", ".join(f"{f:g}" for f in cfg.step_fractions)
            + " × 2/λmax; the best (fewest iterations) is kept for each. Theory at the optimal "
            f"step 2/(λmax+λmin): ≈ {np.mean(theory):.0f} iterations for the raw features. "
            "Steps above 2/λmax diverge, and λmax of the raw features is ≈ 400× that of the "
            "standardized ones, so the raw problem must take tiny steps that crawl along the "
            "flat direction (x2's weight) — the oscillation the article describes. Runs that "
            f"never converge count as {cfg.max_iters} iterations (a lower bound); a verdict "
            "that would rest on a censored standardized run is downgraded to inconclusive."
        ),
    )


def _mode(values: list[Any]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "none"
    uniq, counts = np.unique(vals, return_counts=True)
    return f"{uniq[int(np.argmax(counts))]:g}"


def _gmean(values: list[Any]) -> float:
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return math.nan
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.exp(np.mean(np.log(vals))))


def best_lr(results: list[RunResult], scaling: str) -> float | None:
    """The learning rate with the fewest mean (censored) steps to target for one arm.

    Ties (e.g. every rate censored) go to the higher mean final accuracy.
    """
    by_lr: dict[float, list[RunResult]] = {}
    for r in select(results, part="mlp", scaling=scaling):
        by_lr.setdefault(float(r.config["lr"]), []).append(r)
    if not by_lr:
        return None

    def key(lr: float) -> tuple[float, float]:
        rs = by_lr[lr]
        steps = np.mean([float(r.metric("steps_to_target_censored")) for r in rs])
        acc = np.mean([float(r.metric("final_val_acc") or 0.0) for r in rs])
        return (steps, -acc)

    return min(by_lr, key=key)


def _card_mlp(results: list[RunResult], cfg: Config) -> Card:
    lr_raw, lr_std = best_lr(results, "raw"), best_lr(results, "standardized")
    if lr_raw is None or lr_std is None:
        return Card(study=NAME, claim=CLAIM_MLP, measurement="needs finished MLP runs of both arms", verdict="inconclusive")
    raw = select(results, part="mlp", scaling="raw", lr=lr_raw)
    std = select(results, part="mlp", scaling="standardized", lr=lr_std)
    sr = [float(r.metric("steps_to_target_censored")) for r in raw]
    ss = [float(r.metric("steps_to_target_censored")) for r in std]
    effect, v = compare(np.log10(sr), np.log10(ss), "greater")
    cens_r = sum(not r.metric("reached") for r in raw)
    cens_s = sum(not r.metric("reached") for r in std)
    note = ""
    if cens_s and v == "supported":
        v = "inconclusive"
        note = " Downgraded to inconclusive: some standardized runs never reached the target."
    nv = n_val(raw + std)
    acc_r = [100 * float(r.metric("final_val_acc") or 0) for r in raw]
    acc_s = [100 * float(r.metric("final_val_acc") or 0) for r in std]
    lrs_txt = ", ".join(f"{lr:g}" for lr in cfg.lrs)
    return Card(
        study=NAME,
        claim=CLAIM_MLP,
        measurement=(
            f"steps to {100 * cfg.target_acc:g}% validation accuracy at each arm's best learning rate "
            f"(raw lr {lr_raw:g}, standardized lr {lr_std:g}): raw {format_interval(mean_ci(sr))} "
            f"({len(sr) - cens_r}/{len(sr)} reached), standardized {format_interval(mean_ci(ss))} "
            f"({len(ss) - cens_s}/{len(ss)} reached); ratio raw/standardized {_fmt_ratio(effect)}. "
            f"Final accuracy: raw {format_interval(rate_ci(acc_r, nv))}%, standardized "
            f"{format_interval(rate_ci(acc_s, nv))}% (difference {format_interval(diff_ci(acc_s, acc_r))} points)."
        ),
        verdict=v,
        effect=ratio_interval(effect),
        effect_label=f"MLP steps to {100 * cfg.target_acc:g}% accuracy, raw / standardized (×)",
        details=(
            "MLP (hidden " + "-".join(map(str, cfg.hidden)) + ", ReLU, SGD momentum 0.9, batch "
            f"{cfg.batch_size}, {cfg.max_steps} steps) on synthetic2d-cls; learning rates tried for each "
            f"arm: {lrs_txt}; each arm at the rate with the fewest mean steps (chosen on the same seeds, "
            "which favours both arms alike). Effect = steps raw / steps standardized: "
            f"geometric-mean ratio with the Welch 95% interval of log10(steps raw) − log10(steps "
            f"standardized) over seeds; supported when above 1. Accuracy measured every {cfg.eval_every_steps} steps. Runs "
            f"that never reach the target count as {cfg.max_steps} steps (a lower bound, which can only "
            "understate a speed-up of the standardized arm)." + note
        ),
    )


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """Three cards: conditioning, gradient-descent speed, MLP training speed."""
    return [_card_condition(results, cfg), _card_gd(results, cfg), _card_mlp(results, cfg)]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
#: Colours of the two arms (scalings of the inputs, not norms).
_SCALING_COLORS = {"raw": "tab:red", "standardized": "tab:blue"}


def _contour_panel(ax: Any, r: RunResult, title: str) -> None:
    h = np.array(r.metric("hessian"))
    w_star = np.array(r.metric("w_star"))
    traj = np.array(r.metric("trajectory"))
    pts = np.vstack([traj, [[0.0, 0.0]], [w_star]])
    span = np.ptp(pts, axis=0).max()
    center = (pts.max(axis=0) + pts.min(axis=0)) / 2
    half = 0.6 * span if span > 0 else 1.0
    g1 = np.linspace(center[0] - half, center[0] + half, 241)
    g2 = np.linspace(center[1] - half, center[1] + half, 241)
    a, b = np.meshgrid(g1, g2)
    grid = np.stack([a.ravel(), b.ravel()], axis=1)
    z = excess_loss(grid, h, w_star).reshape(a.shape)
    loss0 = float(excess_loss(np.zeros(2), h, w_star)[0])
    levels = loss0 * np.geomspace(1e-4, 4.0, 14)
    ax.contour(a, b, z, levels=levels, cmap="viridis", linewidths=0.8)
    ax.plot(traj[:, 0], traj[:, 1], "-o", color="tab:red", ms=2.5, lw=0.9, label="GD iterates")
    ax.plot(*w_star, "k*", ms=10, label="minimum w*")
    ax.plot(0, 0, "ks", ms=5, label="start w = 0")
    ax.set_aspect("equal")
    ax.set_xlim(g1[0], g1[-1])
    ax.set_ylim(g2[0], g2[-1])
    ax.set_xlabel("w1 (weight of x1)")
    ax.set_ylabel("w2 (weight of x2)")
    n = r.metric("iterations")
    ax.set_title(f"{title}\nκ = {r.metric('condition'):.3g}, step {r.metric('best_step'):.3g}, {n} iterations", fontsize=9)


def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    """Contours with GD paths, GD convergence, iterations vs step size, MLP accuracy curves."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    figs: list[Figure | None] = []
    gd = {s: [r for r in select(results, part="gd", scaling=s) if r.metric("trajectory")] for s in SCALINGS}
    if gd["raw"] and gd["standardized"]:
        figs += [_fig_contours(gd, outdir), _fig_gd(gd, cfg, outdir)]
    figs.append(_fig_mlp(results, cfg, outdir))
    return [f for f in figs if f is not None]


def _fig_contours(gd: dict[str, list[RunResult]], outdir: Path) -> Figure | None:
    seed = min(set(int(r.config["data_seed"]) for r in gd["raw"]) & set(int(r.config["data_seed"]) for r in gd["standardized"]), default=None)
    if seed is None:
        return None
    rr = next(r for r in gd["raw"] if int(r.config["data_seed"]) == seed)
    rs = next(r for r in gd["standardized"] if int(r.config["data_seed"]) == seed)
    fig, axes = plotting.plt().subplots(1, 2, figsize=(9.5, 4.6), dpi=100)
    _contour_panel(axes[0], rr, "raw features (x1 in ±200, x2 in ±10)")
    _contour_panel(axes[1], rs, "standardized features")
    axes[0].legend(fontsize=7, loc="lower right")
    return plotting.finish(fig, outdir / "input_scaling_contours.png",
        title="Loss contours and gradient-descent paths",
        caption=(
            f"Squared loss of a linear model (data seed {seed}), equal axes. Raw features: long "
            "narrow valley, GD at its best stable step zig-zags across the steep direction "
            "and crawls along the flat one. Standardized: round contours, GD goes straight "
            "to the minimum."
        ),
    )


def _fig_gd(gd: dict[str, list[RunResult]], cfg: Config, outdir: Path) -> Figure:
    fig, axes = plotting.plt().subplots(1, 2, figsize=(10, 3.8), dpi=100)
    colors = _SCALING_COLORS
    for s in SCALINGS:
        r = gd[s][0]
        it = np.array(r.metric("trajectory_iter")) + 1
        axes[0].loglog(it, np.maximum(r.metric("excess_curve"), 1e-16), color=colors[s], label=f"{s}, best step")
        dc = np.array(r.metric("diverge_curve"), dtype=float)
        axes[0].loglog(np.arange(1, len(dc) + 1), np.maximum(dc, 1e-16), "--", color=colors[s], label=f"{s}, {cfg.diverge_factor:g}·2/λmax")
    axes[0].axhline(cfg.tolerance, color="gray", lw=0.7, ls=":")
    axes[0].set_xlabel("iteration + 1")
    axes[0].set_ylabel("(L − L*) / (L0 − L*)")
    axes[0].set_title("convergence (first data seed)", fontsize=9)
    axes[0].legend(fontsize=7)
    for s in SCALINGS:
        per_f: dict[float, list[float]] = {}
        for r in gd[s]:
            for f, n_it in zip(r.metric("step_fractions"), r.metric("iterations_by_fraction")):
                per_f.setdefault(float(f), []).append(math.inf if n_it is None else float(n_it))
        fs = sorted(per_f)
        med = [float(np.median(per_f[f])) for f in fs]
        axes[1].semilogy(fs, med, "-o", color=colors[s], ms=3, label=s)
    axes[1].set_xlabel("step size / (2/λmax)")
    axes[1].set_ylabel("iterations to tolerance (median over seeds)")
    axes[1].set_title("iterations vs step size (above 1: divergence)", fontsize=9)
    axes[1].legend(fontsize=7)
    return plotting.finish(fig, outdir / "input_scaling_gd.png",
        title="Gradient descent: convergence and step size",
        caption=(
            "Left: relative excess loss per iteration at each one's best step (solid) and at "
            f"{cfg.diverge_factor:g}·2/λmax (dashed: the loss grows). Right: iterations to "
            f"reach {cfg.tolerance:g} for each step size, in units of the stability limit 2/λmax."
        ),
    )


def _fig_mlp(results: list[RunResult], cfg: Config, outdir: Path) -> Figure | None:
    lr_raw, lr_std = best_lr(results, "raw"), best_lr(results, "standardized")
    if lr_raw is None and lr_std is None:
        return None
    fig, ax = plotting.plt().subplots(figsize=(5.5, 3.6), dpi=100)
    for s, lr in (("raw", lr_raw), ("standardized", lr_std)):
        if lr is None:
            continue
        curves = [np.array(r.metric("acc_curve"), dtype=float) for r in select(results, part="mlp", scaling=s, lr=lr)]
        curves = [cv for cv in curves if cv.size]
        for k, cv in enumerate(curves):
            ax.plot(cv[:, 0], 100 * cv[:, 1], color=_SCALING_COLORS[s], lw=0.8, alpha=0.6,
                    label=f"{s} (lr {lr:g})" if k == 0 else None)
    ax.axhline(100 * cfg.target_acc, color="gray", lw=0.7, ls=":", label="target")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(40, 100)
    ax.legend(fontsize=7)
    return plotting.finish(fig, outdir / "input_scaling_mlp.png",
        title="MLP on raw vs standardized inputs",
        caption="Validation accuracy during training, one line per seed, each arm at its best learning rate.",
    )
