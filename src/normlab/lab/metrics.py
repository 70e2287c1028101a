"""Measurements the studies take on a model during or after training, as reusable functions.

Loss landscape (Santurkar et al. 2018, "How does batch normalization help optimization?", §3):

* :func:`probe_gradient_direction` — from a point ``θ`` with gradient ``g``, step to
  ``θ − s·η·g`` for a few multiples ``s`` of the learning rate ``η`` and record the loss and the
  gradient there. Three numbers summarize it: the **loss range** (max − min of the losses along
  the way: how much the loss varies in the direction the optimizer moves), the **gradient
  change** (``max_s ‖g_s − g‖``: "gradient predictiveness", small when the gradient stays a good
  guide), and the **effective β-smoothness** (``max_s ‖g_s − g‖ / ‖s·η·g‖``: a local Lipschitz
  constant of the gradient along the step). For a quadratic ``½ xᵀAx`` the last one equals
  ``‖Ag‖/‖g‖``: at most the largest eigenvalue of ``A``, and equal to it when ``g`` is its
  eigenvector.
* :func:`internal_covariate_shift` — Santurkar et al.'s gradient definition (§2.2): for layer
  ``i``, ``G`` is the gradient of its weight at the current parameters and ``G'`` the gradient of
  the same weight, on the same batch, after the layers *before* it were updated (layers ``i`` and
  after keep their old values). ``‖G − G'‖`` and ``cos(G, G')`` say how much the change of the
  earlier layers changes the optimization problem the layer faces.

Activation distributions: :func:`capture_preactivations` (the inputs of every ReLU, i.e. what a
norm layer hands to the non-linearity), :func:`capture_normalized_outputs` (each conv/linear
layer's output after the norm layer it feeds), :func:`unit_stats`, :func:`standardization_deviation`
(how far from zero mean / unit variance — weight norm's data-dependent init promises both) and
:func:`distribution_instability` (how much the per-unit mean and std move between measurements).

Cost: :func:`interleaved_times` (median of repeated timed calls, several functions timed in
turns so that a change of machine load affects them alike), :func:`median_ratio`,
:func:`training_step_memory` (bytes of parameters, gradients and the activations saved for the
backward pass), :func:`pareto_front`.

Verdict helpers (``shift_interval``, ``combine_verdicts``) live in :mod:`normlab.lab.stats`.

All functions that run the model leave its parameters and buffers (BatchNorm running statistics
included) as they found them: see :func:`preserve_state`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.nn.utils import is_norm_layer


__all__ = [
    "DEFAULT_SCALES",
    "GradientProbe",
    "LayerShift",
    "capture_normalized_outputs",
    "capture_preactivations",
    "distribution_instability",
    "flat_grad",
    "interleaved_times",
    "internal_covariate_shift",
    "loss_grad_fn",
    "median_ratio",
    "pareto_front",
    "preserve_state",
    "probe_gradient_direction",
    "standardization_deviation",
    "training_step_memory",
    "unit_stats",
]

#: Multiples of the learning-rate step probed along the gradient (Santurkar et al. use a range of
#: step sizes around the one used for training).
DEFAULT_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

LossGradFn = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Model state helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserve_state(model: nn.Module) -> Iterator[None]:
    """Restore every parameter, buffer and the train/eval mode of ``model`` on exit.

    Probing a model in train mode runs BatchNorm forward passes, which update its running
    statistics (and ``num_batches_tracked``); probing at other parameter values overwrites the
    parameters. Inside this block both may happen freely: the training that follows sees the
    model exactly as it was.
    """
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
            for n, b in model.named_buffers():
                if b is not None and n in buffers:
                    b.copy_(buffers[n])
        for n, m in model.named_modules():
            m.training = modes.get(n, m.training)


def _params(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    named = dict(model.named_parameters())
    if names is None:
        return list(named.items())
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"params: {missing} are not parameters of the model; it has {list(named)}")
    return [(n, named[n]) for n in names]


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients of ``params`` as one float64 vector (a missing gradient counts as zeros)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
            for p in params
        ]
    )


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def _set_flat_(params: Sequence[torch.Tensor], vec: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vec[offset : offset + n].reshape(p.shape).to(p.dtype))
            offset += n
    if offset != vec.numel():
        raise ValueError(f"vector has {vec.numel()} values, the parameters {offset}")


def loss_grad_fn(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    params: Sequence[str] | None = None,
) -> LossGradFn:
    """``f(θ) -> (loss, gradient)`` of ``loss_fn(model(x), y)`` as a function of a flat vector.

    ``θ`` is the concatenation of ``params`` (names; default: every parameter, in
    ``named_parameters`` order). ``f`` writes ``θ`` into the model (call it inside
    :func:`preserve_state`), runs the model in its current mode and returns the loss and the
    float64 gradient vector. The model's ``.grad`` fields are overwritten.
    """
    chosen = [p for _, p in _params(model, params)]
    x, y = batch

    def f(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        _set_flat_(chosen, theta)
        for p in model.parameters():
            p.grad = None
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            loss.backward()
        return float(loss.detach()), flat_grad(chosen)

    return f


# --------------------------------------------------------------------------------------------
# Loss landscape along the gradient
# --------------------------------------------------------------------------------------------
@dataclass
class GradientProbe:
    """What :func:`probe_gradient_direction` measured (lists are per scale ``s``)."""

    scales: list[float]
    losses: list[float]
    grad_changes: list[float]
    distances: list[float]
    loss0: float
    grad_norm: float
    loss_range: float
    max_grad_change: float
    beta_smoothness: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss_range": self.loss_range,
            "grad_change": self.max_grad_change,
            "beta_smoothness": self.beta_smoothness,
            "grad_norm": self.grad_norm,
            "rel_grad_change": self.max_grad_change / self.grad_norm if self.grad_norm > 0 else math.nan,
        }


def probe_gradient_direction(
    f: LossGradFn,
    theta: torch.Tensor,
    step: float,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    loss_and_grad: tuple[float, torch.Tensor] | None = None,
) -> GradientProbe:
    """Loss and gradient at ``θ − s·step·g`` for each ``s`` in ``scales`` (``g`` = gradient at θ).

    Args:
        f: ``f(θ) -> (loss, gradient)``, e.g. from :func:`loss_grad_fn`.
        theta: the point (flat vector).
        step: the learning rate ``η``.
        scales: multiples ``s`` of ``η`` (positive).
        loss_and_grad: ``f(θ)`` if already computed.

    Returns:
        A :class:`GradientProbe`: ``loss_range = max_s L_s − min_s L_s`` over the probed points,
        ``max_grad_change = max_s ‖g_s − g‖``, ``beta_smoothness = max_s ‖g_s − g‖ / ‖s·η·g‖``
        (NaN when ``g = 0``: no direction to move in).
    """
    if not scales or any(not (s > 0) for s in scales):
        raise ValueError(f"scales: expected positive numbers, got {list(scales)}")
    if not step > 0:
        raise ValueError(f"step: expected a positive learning rate, got {step!r}")
    theta = theta.detach().double()
    loss0, g = loss_and_grad if loss_and_grad is not None else f(theta)
    g = g.double()
    g_norm = float(torch.linalg.vector_norm(g))
    losses, changes, dists = [], [], []
    for s in scales:
        delta = s * step * g
        loss_s, g_s = f(theta - delta)
        losses.append(float(loss_s))
        changes.append(float(torch.linalg.vector_norm(g_s.double() - g)))
        dists.append(float(torch.linalg.vector_norm(delta)))
    ratios = [c / d for c, d in zip(changes, dists) if d > 0]
    return GradientProbe(
        scales=[float(s) for s in scales],
        losses=losses,
        grad_changes=changes,
        distances=dists,
        loss0=float(loss0),
        grad_norm=g_norm,
        loss_range=max(losses) - min(losses),
        max_grad_change=max(changes),
        beta_smoothness=max(ratios) if ratios else math.nan,
    )


# --------------------------------------------------------------------------------------------
# Internal covariate shift (gradient definition)
# --------------------------------------------------------------------------------------------
@dataclass
class LayerShift:
    """ICS of one layer: ``l2 = ‖G − G'‖``, ``cosine = cos(G, G')``, ``rel_l2 = l2 / ‖G‖``."""

    name: str
    l2: float
    cosine: float
    rel_l2: float
    grad_norm: float


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(torch.dot(a, b)) / (na * nb)


def internal_covariate_shift(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    layers: Sequence[str],
    order: Sequence[str] | None = None,
) -> list[LayerShift]:
    """ICS of each layer in ``layers`` by the gradient definition of Santurkar et al. (2018, §2.2).

    For the weight ``W_i`` named ``layers[k]``: ``G`` is its gradient with every parameter at
    ``before``; ``G'`` its gradient with the parameters that come *before* it in ``order`` set to
    ``after`` (their updated values) and the others (``W_i`` included) still at ``before``. Same
    batch, same mode (train mode uses the batch statistics, as in training).

    Args:
        model: the network; its parameters and buffers are restored on return.
        loss_fn: ``loss_fn(output, y)``.
        batch: ``(x, y)``.
        before, after: parameter values by name (every parameter named in ``order``).
        layers: names of the weights to measure, e.g. each conv/linear ``weight``.
        order: parameter names in forward order (default: ``named_parameters`` order, which is
            the forward order of sequential models).

    Returns:
        One :class:`LayerShift` per entry of ``layers``. A layer none of whose predecessors
        changed has ``l2 == 0`` and ``cosine == 1`` (e.g. the first layer, always).
    """
    named = dict(model.named_parameters())
    order = list(order) if order is not None else list(named)
    for name in list(layers) + order:
        if name not in named:
            raise ValueError(f"{name!r} is not a parameter of the model")
    missing = [n for n in order if n not in before or n not in after]
    if missing:
        raise ValueError(f"before/after lack values for {missing}")
    x, y = batch

    def grad_of(target: str, updated: set[str]) -> torch.Tensor:
        with torch.no_grad():
            for n in order:
                named[n].copy_(after[n] if n in updated else before[n])
        for p in model.parameters():
            p.grad = None
        with torch.enable_grad():
            loss_fn(model(x), y).backward()
        g = named[target].grad
        return (g if g is not None else torch.zeros_like(named[target])).detach().reshape(-1).double()

    out: list[LayerShift] = []
    with preserve_state(model):
        for target in layers:
            earlier = set(order[: order.index(target)])
            g = grad_of(target, set())
            g2 = grad_of(target, earlier)
            l2 = float(torch.linalg.vector_norm(g - g2))
            gn = float(torch.linalg.vector_norm(g))
            out.append(
                LayerShift(
                    name=target,
                    l2=l2,
                    cosine=_cosine(g, g2),
                    rel_l2=l2 / gn if gn > 0 else (0.0 if l2 == 0 else math.inf),
                    grad_norm=gn,
                )
            )
        for p in model.parameters():
            p.grad = None
    return out


# --------------------------------------------------------------------------------------------
# Activation distributions
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_preactivations(
    model: nn.Module, x: torch.Tensor, module_type: type[nn.Module] | tuple[type, ...] = nn.ReLU
) -> list[torch.Tensor]:
    """The input of every call of a ``module_type`` module (ReLU: the pre-activations), in order.

    The model runs in its current mode; its parameters and buffers are left unchanged (a
    train-mode BatchNorm's running statistics are restored).
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach().clone())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, module_type)]
    if not handles:
        raise ValueError(f"model has no {module_type} module to capture the input of")
    _run_hooked(model, x, handles)
    return captured


def _run_hooked(model: nn.Module, x: torch.Tensor, handles: list[Any]) -> None:
    """One forward of ``x`` with state preserved; the hooks' ``handles`` are removed after it."""
    try:
        with preserve_state(model):
            model(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_normalized_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The pre-activation of every conv/linear layer: its output after the norm layer fed by it.

    For each ``Linear``/``Conv1d``/``Conv2d`` call, in execution order: the output of the
    normalization layer that takes the layer's output directly as its input, or the layer's own
    output when no norm layer does (no normalization, weight norm alone, the head). This is what
    weight norm's data-dependent init standardizes, also in a ResNet, where the inputs of a
    block's final ReLU are sums of two branches. Parameters and buffers are left unchanged.
    """
    outputs: list[list[Any]] = []  # [name, tensor] per conv/linear call
    by_id: dict[int, int] = {}

    def layer_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            by_id[id(out)] = len(outputs)
            outputs.append([name, out.detach().clone(), out])

        return hook

    def norm_hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        k = by_id.get(id(args[0]))
        if k is not None and outputs[k][2] is args[0]:
            outputs[k][1] = out.detach().clone()

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            handles.append(m.register_forward_hook(layer_hook(name)))
        elif is_norm_layer(m):
            handles.append(m.register_forward_hook(norm_hook))
    if not any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules()):
        raise ValueError("model has no Linear/Conv1d/Conv2d layer")
    _run_hooked(model, x, handles)
    return [(name, t) for name, t, _ in outputs]


def unit_stats(t: torch.Tensor, unit_dim: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit mean and (biased) std of ``t``: one value per index of ``unit_dim``.

    For ``(N, C)`` features the units are the ``C`` columns; for ``(N, C, *)`` maps the ``C``
    channels, pooled over the batch and the positions (what BatchNorm normalizes).
    """
    if t.dim() < 2:
        raise ValueError(f"t: expected at least 2 dims (N, C, ...), got shape {tuple(t.shape)}")
    unit_dim %= t.dim()
    dims = [d for d in range(t.dim()) if d != unit_dim]
    var, mean = torch.var_mean(t.detach().double(), dim=dims, correction=0)
    return mean.numpy(), var.sqrt().numpy()


def standardization_deviation(acts: Sequence[torch.Tensor]) -> dict[str, float]:
    """How far the units of ``acts`` are from zero mean and unit std (per unit, over the batch).

    Returns ``max_abs_mean``, ``min_std``, ``max_std`` and ``max_deviation =
    max(max_abs_mean, max |std − 1|)`` over every unit of every tensor.
    """
    if not acts:
        raise ValueError("acts: expected at least one tensor")
    means, stds = zip(*(unit_stats(a) for a in acts))
    m, s = np.concatenate(means), np.concatenate(stds)
    max_abs_mean = float(np.abs(m).max())
    return {
        "max_abs_mean": max_abs_mean,
        "min_std": float(s.min()),
        "max_std": float(s.max()),
        "max_deviation": max(max_abs_mean, float(np.abs(s - 1.0).max())),
    }


def distribution_instability(means: np.ndarray | Sequence[Sequence[float]],
                             stds: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Mean step-to-step change of the per-unit mean and std: ``mean|Δμ| + mean|Δσ|``.

    ``means`` and ``stds`` are ``(T, U)`` arrays: the mean and std of ``U`` units measured at ``T``
    successive times (on the same inputs). Zero for a distribution that does not move; a unit
    whose mean alternates between ``a`` and ``b`` contributes ``|a − b|``.
    """
    mu, sd = np.asarray(means, dtype=float), np.asarray(stds, dtype=float)
    if mu.shape != sd.shape or mu.ndim != 2:
        raise ValueError(f"means/stds: expected two (T, U) arrays, got {mu.shape} and {sd.shape}")
    if mu.shape[0] < 2:
        return math.nan
    return float(np.abs(np.diff(mu, axis=0)).mean() + np.abs(np.diff(sd, axis=0)).mean())


# --------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------
def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Wall time of ``repeats`` calls of each function, called in turns (round robin).

    Each round calls every function once, in an order rotated by one each round, so slow
    periods of a shared machine hit all of them alike; compare them with :func:`median_ratio`.
    ``warmup`` untimed rounds come first (lazy initialization, JIT compilation, caches).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]`` (times from the same rounds of :func:`interleaved_times`)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be non-empty and of the same length, got {len(a)}, {len(b)}")
    return float(statistics.median(x / y for x, y in zip(a, b)))


def training_step_memory(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    optimizer_state_per_param: int = 1,
) -> dict[str, int]:
    """Bytes one training step holds: parameters, gradients, optimizer state, saved activations.

    ``saved_bytes`` counts the distinct storages autograd saves for the backward pass (the
    activation memory, which is what a normalization layer adds), parameters excluded. The total
    ``train_bytes = params + grads + optimizer state + saved``; ``optimizer_state_per_param`` is
    1 for SGD with momentum, 2 for Adam. Exact and independent of the process's history, unlike
    the peak RSS.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen[ptr] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            pass
        return t

    x, y = batch
    with preserve_state(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
        del loss
    saved = sum(seen.values())
    return {
        "param_bytes": int(param_bytes),
        "saved_bytes": int(saved),
        "train_bytes": int(param_bytes * (2 + optimizer_state_per_param) + saved),
    }


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Names of the points not dominated when minimizing cost and maximizing value.

    ``points`` maps a name to ``(cost, value)``. A point is dominated when another is at least
    as good on both and strictly better on one. Returned in order of increasing cost.
    """
    front = []
    for name, (c, v) in points.items():
        dominated = any(
            (c2 <= c and v2 >= v) and (c2 < c or v2 > v)
            for n2, (c2, v2) in points.items()
            if n2 != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: (points[n][0], -points[n][1]))


# --------------------------------------------------------------------------------------------
# Verdict helpers
# --------------------------------------------------------------------------------------------
