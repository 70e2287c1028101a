r"""Functional forms of every normalization in normlab.

Each function validates its arguments, picks a backend (:mod:`normlab.core.dispatch`) and, for the
methods with running statistics, updates them in place the way :mod:`torch.nn.functional` does::

    running_mean ← (1 − momentum) · running_mean + momentum · μ_B
    running_var  ← (1 − momentum) · running_var  + momentum · σ²_B · m / (m − 1)

where m is the number of values behind each statistic (the biased variance normalizes, the
unbiased one is tracked). NaN and Inf in the input propagate to the outputs of the affected
groups; they never raise. An empty input (any dimension 0) gives an empty output and leaves
running statistics untouched, as in torch.

Every function computes through the ``normlab::`` operators (:mod:`normlab.core.ops`), so
torch.compile sees one node per normalization. When the call is being *traced into a portable
graph* — ``torch.export`` (and so the ONNX exporter), ``torch.jit.trace`` or
``torch.fx.symbolic_trace`` — the function instead emits torch's own operator with the same
semantics (``aten.native_batch_norm``, ``aten.native_layer_norm``, ...), so the exported graph
holds standard operators that ONNX, TorchScript and other runtimes already know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

import torch.nn.functional as TF

# The public check_* stay importable from here (they were defined here before _checks.py).
from normlab._checks import check_channels, check_eps, check_input, check_momentum  # noqa: F401 (check_channels: re-exported)
from normlab._checks import check_divisor, check_positive_int
from normlab._checks import check_limit as _check_limit
from normlab._checks import check_normalized_shape as _normalized_shape
from normlab._checks import check_param as _check_param
from normlab._checks import check_scalar as _check_scalar
from normlab._checks import check_trailing as _check_trailing
from normlab.core import dispatch, masked, ops, reference
from normlab.core.reference import compute_dtype

__all__ = [
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm_2d",
    "mean_only_batch_norm",
    "rms_norm",
]


# ----------------------------------------------------------------------------- validation


def traced(x) -> bool:
    """True while ``x`` flows through torch.export, torch.jit.trace or torch.fx.symbolic_trace."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_exporting()


def _eager_cpu():
    """The CPU backend if it is loaded and this is a plain eager call (not compiling, no functorch
    transform, no dispatch mode): what may update running statistics in place directly."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack()):
        return None
    return dispatch.loaded("cpu")


def _update_running(running: Tensor, batch: Tensor, momentum: float, scale: float = 1.0) -> None:
    """running ← (1 − momentum)·running + momentum·(scale·batch), in place, in running's dtype.

    Eager CPU float tensors take the CPU backend's one-call update (once that backend is loaded):
    the tensor ops below cost ~60 µs of dispatch per BatchNorm step, more than normalizing a
    small activation; same roundings.
    """
    cpu = _eager_cpu()
    if cpu is not None and cpu.running_takes(running, batch):
        cpu.update_running(running, batch, momentum, scale)
        return
    with torch.no_grad():
        if scale != 1.0:
            batch = batch * scale
        if torch._C._are_functorch_transforms_active():
            # torch's kernels update running statistics with plain values, so torch.func.grad/jvp
            # of a training InstanceNorm with running statistics work. Here the update is torch
            # ops, which a grad/jvp transform wraps, and writing a wrapped value into the buffer is
            # refused: write the unwrapped (primal) value. Batched (vmap) values stay batched, and
            # fail as torch's do.
            _assign_running(running, torch.add(running * (1.0 - momentum), batch.to(running.dtype), alpha=momentum))
            return
        running.mul_(1.0 - momentum).add_(batch.to(running.dtype), alpha=momentum)


def _assign_running(running: Tensor, new: Tensor) -> None:
    """running ← new under functorch transforms: the unwrapped (primal) value (see _update_running)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(new) and not f.is_batchedtensor(new):
        new = f.get_unwrapped(new)
    if f.is_batchedtensor(new):
        running.copy_(new)  # refused by vmap, as torch's
    else:
        with torch._C._DisableFuncTorch():
            running.copy_(new)


@torch.no_grad()
def _update_running_where(running: Tensor, batch: Tensor, momentum: float, valid: Tensor) -> None:
    """The running average of :func:`_update_running` where ``valid``; elsewhere ``running`` keeps
    its value exactly (masked statistics: a channel without enough valid values is not updated)."""
    batch = torch.where(valid, batch, 0.0).to(running.dtype)
    new = torch.where(valid, torch.add(running * (1.0 - momentum), batch, alpha=momentum), running)
    if torch._C._are_functorch_transforms_active():
        _assign_running(running, new)
    else:
        running.copy_(new)


# ----------------------------------------------------------------------------- batch norm


def _check_bn_args(input: Tensor, running_mean, running_var, weight, bias, eps: float, momentum) -> int:
    """The arguments of the batch-norm family (BN, Ghost BN, BN + ReLU), checked; returns C."""
    check_input(input, min_dim=2)
    check_eps(eps)
    check_momentum(momentum)
    c = input.shape[1]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        _check_param(t, (c,), name)
    return c


def _update_bn_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, m: int, momentum) -> None:
    """Running averages from the batch statistics of m values per channel (unbiased variance)."""
    cpu = _eager_cpu()
    if (cpu is not None and cpu.running_takes(running_mean, mean) and cpu.running_takes(running_var, var)
            and running_mean.dtype == running_var.dtype):
        cpu.update_bn_running(running_mean, running_var, mean, var, momentum, m / (m - 1))
        return
    _update_running(running_mean, mean, momentum)
    _update_running(running_var, var, momentum, m / (m - 1))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Batch normalization (Ioffe & Szegedy 2015) of ``input`` of shape (N, C, \*).

    .. math:: y = \gamma \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta

    with μ_c, σ²_c over N and every spatial position of channel c (training, or no running
    statistics) or the running statistics (eval). Same signature as
    :func:`torch.nn.functional.batch_norm`.

    ``mask`` (optional, keyword): a boolean tensor broadcastable to ``input``, True = valid
    position (e.g. (N, 1, L) for padded sequences). The statistics are count-weighted over the
    valid positions only, and the output is zero at the masked ones:

    .. math::

        n_c = \sum m,\quad \mu_c = \frac{\sum m\,x}{n_c},\quad
        \sigma_c^2 = \frac{\sum m\,(x - \mu_c)^2}{n_c},\quad
        y = m\Big(\gamma \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta\Big)

    (sums over N and every position of channel c), so masked BN over padded sequences is BN over
    the concatenation of the valid steps, padding values cannot change any output and the
    gradient at a masked position is exactly zero. In training the running statistics are
    updated from these (``running_var`` with the unbiased σ²_c · n_c / (n_c − 1)) with
    ``momentum`` as without a mask; a channel with n_c = 0 keeps its running mean and variance,
    one with n_c = 1 its running variance; a channel with no valid position outputs zeros (no
    NaN). In eval (running statistics) only the zeroing applies. With a mask the computation is
    the pure-torch composite of :mod:`normlab.core.masked` (``backend`` is not consulted).
    """
    if mask is None and traced(input):
        return TF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    c = _check_bn_args(input, running_mean, running_var, weight, bias, eps, momentum)
    if mask is not None:
        masked.check_mask(mask, input)
    use_batch_stats = training or running_mean is None or running_var is None
    if not use_batch_stats:
        if mask is not None:
            return masked.batch_norm_eval(input, mask, running_mean, running_var, weight, bias, eps)
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps, backend=backend)
    if eps == 0:
        raise ValueError("eps: expected a number > 0 for batch statistics (as torch.nn.functional.batch_norm), got 0")
    m = input.numel() // c if c else 0
    if m == 1:
        raise ValueError(
            f"input: batch norm in training needs more than 1 value per channel, got shape "
            f"{tuple(input.shape)} (1 value per channel): the batch variance is 0 and every output "
            "would equal the bias. Use a larger batch, eval mode (running statistics), or a "
            "batch-independent norm such as GroupNorm or LayerNorm"
        )
    if mask is not None:
        y, mean, var, n = masked.batch_norm(input, mask, weight, bias, eps)
        if training and running_mean is not None and running_var is not None:
            _update_running_where(running_mean, mean, momentum, n >= 1)
            _update_running_where(running_var, var * n / (n - 1).clamp_min(1), momentum, n >= 2)
        return y
    y, mean, var, _ = ops.batch_norm(input, weight, bias, eps, backend=backend)
    if training and running_mean is not None and running_var is not None and m > 0:
        _update_bn_running(running_mean, running_var, mean, var, m, momentum)
    return y


def mean_only_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Mean-only batch normalization (Salimans & Kingma 2016, §2.2): :math:`y = x - \mu_c + \beta`.

    No division by the standard deviation: the companion of weight normalization, which already
    fixes the scale of each unit. μ_c is the batch mean over N and spatial positions in training
    (or without running statistics) and the running mean in eval.
    """
    if traced(input):
        return _traced_mean_only(input, running_mean, bias, training, momentum)
    check_input(input, min_dim=2)
    check_momentum(momentum)
    c = input.shape[1]
    _check_param(running_mean, (c,), "running_mean")
    _check_param(bias, (c,), "bias")
    if not training and running_mean is not None:
        return ops.batch_norm_eval(input, running_mean, None, None, bias, 0.0, center_only=True, backend=backend)
    y, mean, _, _ = ops.batch_norm(input, None, bias, 0.0, center_only=True, backend=backend)
    if training and running_mean is not None and input.numel() > 0:
        _update_running(running_mean, mean, momentum)
    return y


def _traced_mean_only(input, running_mean, bias, training, momentum):
    """Mean-only batch norm in standard operators (torch has no twin to emit).

    Rank-free, so that a torch.fx Proxy (which has no rank) traces too: the statistics are taken
    over ``input.transpose(0, 1).flatten(1)`` and broadcast with the channels swapped to the last
    dim. The running mean is updated by one ``copy_`` of an expression in which the buffer is an
    operand, so every tracer records it (an in-place ``mul_`` on the buffer alone would run once
    at fx trace time instead of in the graph).
    """
    if training or running_mean is None:
        mean = input.transpose(0, 1).flatten(1).mean(1)
        if training and running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(torch.add(mean.detach() * momentum, running_mean, alpha=1.0 - momentum))
    else:
        mean = running_mean
    y = input.transpose(1, -1) - mean
    y = y if bias is None else y + bias
    return y.transpose(1, -1)


# ----------------------------------------------------------------------------- group / instance


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Group normalization (Wu & He 2018) of ``input`` of shape (N, C, \*).

    The C channels are split into ``num_groups`` groups of C/G; μ and σ² are computed per
    (sample, group) over the group's channels and every spatial position; γ, β are per channel.
    G = 1 is LayerNorm over (C, \*), G = C is InstanceNorm.

    ``mask`` (optional, keyword): a boolean tensor broadcastable to ``input``, True = valid
    position (e.g. (N, 1, \*S) for padded images or sequences). Per (sample, group) g with
    n_g = Σ_g m valid values: μ_g = Σ_g m·x / n_g, σ²_g = Σ_g m·(x − μ_g)² / n_g and
    y = m·(γ (x − μ_g)/sqrt(σ²_g + ε) + β): zero at masked positions, so padding cannot change
    any output and its gradient is exactly zero; a group with n_g = 0 outputs zeros (no NaN).
    Computed by the pure-torch composite of :mod:`normlab.core.masked` (``backend`` unused).
    """
    if mask is None and traced(input):
        return TF.group_norm(input, num_groups, weight, bias, eps)
    check_input(input, min_dim=2)
    check_eps(eps)
    c = input.shape[1]
    check_divisor(num_groups, c, "num_groups", f"the {c} channels")
    _check_param(weight, (c,), "weight")
    _check_param(bias, (c,), "bias")
    if mask is not None:
        masked.check_mask(mask, input)
        return masked.group_norm(input, mask, num_groups, weight, bias, eps)[0]
    return ops.group_norm(input, num_groups, weight, bias, eps, backend=backend)[0]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Instance normalization (Ulyanov et al. 2016): statistics per (sample, channel) over space.

    Equal to :func:`group_norm` with one group per channel. With running statistics they are the
    average over the batch of the per-instance statistics (as in torch).

    ``mask`` (optional, keyword): a boolean tensor broadcastable to ``input``, True = valid
    position. Per (sample, channel) with n = Σ m valid positions: μ = Σ m·x / n,
    σ² = Σ m·(x − μ)² / n, y = m·(γ (x − μ)/sqrt(σ² + ε) + β) — zero at masked positions
    (padding cannot change any output; its gradient is exactly zero), zeros for an instance
    with n = 0 (no NaN). Running statistics, when tracked: the average over the instances with
    n ≥ 1 of μ and over those with n ≥ 2 of the unbiased σ² · n/(n − 1), with ``momentum``; a
    channel with no such instance keeps its value. ``use_input_stats=False``: the running
    statistics, masked positions zeroed. Pure-torch composite (:mod:`normlab.core.masked`).
    """
    if mask is None and traced(input):
        return TF.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    check_input(input, min_dim=3)
    check_eps(eps)
    check_momentum(momentum)
    n, c = input.shape[0], input.shape[1]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        _check_param(t, (c,), name)
    if mask is not None:
        masked.check_mask(mask, input)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean/running_var: expected tensors when use_input_stats=False, got None")
        if mask is not None:
            return masked.batch_norm_eval(input, mask, running_mean, running_var, weight, bias, eps)
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps, backend=backend)
    m = math.prod(input.shape[2:])
    if m == 1:
        raise ValueError(
            f"input: instance norm needs more than 1 spatial value per channel, got shape "
            f"{tuple(input.shape)}: the per-instance variance is 0"
        )
    if mask is not None:
        y, mean, var, n = masked.group_norm(input, mask, c, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # batch averages over the instances with enough valid values
                v1, v2 = n >= 1, n >= 2
                k1, k2 = v1.sum(0), v2.sum(0)
                mean_b = torch.where(v1, mean, 0.0).sum(0) / k1.clamp_min(1)
                var_b = torch.where(v2, var * n / (n - 1).clamp_min(1), 0.0).sum(0) / k2.clamp_min(1)
            _update_running_where(running_mean, mean_b, momentum, k1 > 0)
            _update_running_where(running_var, var_b, momentum, k2 > 0)
        return y
    y, mean, var, _ = ops.group_norm(input, c, weight, bias, eps, backend=backend)
    if running_mean is not None and running_var is not None and input.numel() > 0:
        _update_running(running_mean, mean.mean(0), momentum)
        _update_running(running_var, (var * (m / (m - 1))).mean(0), momentum)
    return y


# ----------------------------------------------------------------------------- layer / RMS


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Layer normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape`` dims.

    .. math:: y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    μ, σ² per row (every leading index), γ and β of shape ``normalized_shape``.

    ``mask`` (optional, keyword): a boolean tensor broadcastable to ``input``, True = valid
    position ((B, T, 1) for padded tokens, (…, D) for padded features). Per row with n = Σ m
    valid values:

    .. math::

        \mu = \frac{\sum m\,x}{n},\quad \sigma^2 = \frac{\sum m\,(x - \mu)^2}{n},\quad
        y = m\Big(\gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta\Big)

    zero at masked positions (padding cannot change any output; its gradient is exactly zero);
    a row with n = 0 outputs zeros (no NaN). Pure-torch composite of :mod:`normlab.core.masked`
    (``backend`` unused).
    """
    if mask is None and traced(input):
        return TF.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = _normalized_shape(normalized_shape)
    check_input(input)
    check_eps(eps)
    _check_trailing(input, shape)
    _check_param(weight, shape, "weight")
    _check_param(bias, shape, "bias")
    if mask is not None:
        masked.check_mask(mask, input)
        return masked.layer_norm(input, mask, len(shape), weight, bias, eps)[0]
    return ops.layer_norm(input, len(shape), weight, bias, eps, backend=backend)[0]


def layer_norm_2d(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Channels-first layer normalization of (N, C, \*) input: statistics over C per position.

    .. math:: y_{n,:,s} = \gamma \odot \frac{x_{n,:,s} - \mu_{ns}}{\sqrt{\sigma^2_{ns} + \epsilon}} + \beta

    (ConvNeXt's LayerNorm). γ, β of shape (C,).

    ``mask`` (optional, keyword): a boolean tensor broadcastable to ``input``, True = valid.
    Per (sample, position) with n = Σ_c m valid channels: μ = Σ_c m·x / n,
    σ² = Σ_c m·(x − μ)² / n, y = m·(γ (x − μ)/sqrt(σ² + ε) + β) — zero at masked positions
    (gradient exactly zero there), zeros where n = 0. Pure-torch composite
    (:mod:`normlab.core.masked`).
    """
    if mask is None and traced(input):
        view = (1, -1) + (1,) * (input.dim() - 2)
        mean = input.mean(1, keepdim=True)
        var = (input - mean).pow(2).mean(1, keepdim=True)
        y = (input - mean) * torch.rsqrt(var + eps)
        y = y if weight is None else y * weight.view(view)
        return y if bias is None else y + bias.view(view)
    check_input(input, min_dim=2)
    check_eps(eps)
    c = input.shape[1]
    _check_param(weight, (c,), "weight")
    _check_param(bias, (c,), "bias")
    if mask is not None:
        masked.check_mask(mask, input)
        return masked.layer_norm_channels(input, mask, weight, bias, eps)[0]
    return ops.layer_norm_channels(input, weight, bias, eps, backend=backend)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""RMS normalization (Zhang & Sennrich 2019): :math:`y = \gamma \odot x / \sqrt{\overline{x^2} + \epsilon}`.

    No centring and no bias. ``eps=None`` uses the machine epsilon of the compute dtype, as torch
    does: ``finfo(float32).eps`` for 16-bit inputs, ``finfo(input.dtype).eps`` otherwise.

    ``mask`` (optional, keyword): a boolean tensor broadcastable to ``input``, True = valid.
    Per row with n = Σ m valid values: ν² = Σ m·x² / n and y = m·γ ⊙ x / sqrt(ν² + ε) — zero
    at masked positions (gradient exactly zero there), zeros for a row with n = 0 (no NaN).
    Pure-torch composite (:mod:`normlab.core.masked`).
    """
    if mask is None and traced(input):
        return TF.rms_norm(input, normalized_shape, weight, eps)
    shape = _normalized_shape(normalized_shape)
    check_input(input)
    if eps is None:
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    check_eps(eps)
    _check_trailing(input, shape)
    _check_param(weight, shape, "weight")
    if mask is not None:
        masked.check_mask(mask, input)
        return masked.layer_norm(input, mask, len(shape), weight, None, eps, rms=True)[0]
    return ops.layer_norm(input, len(shape), weight, None, eps, rms=True, backend=backend)[0]


# ============================================================================================
# Methods beyond the classic five (issue 10): Batch Renormalization, Ghost BatchNorm, Weight
# Standardization, Filter Response Normalization, EvoNorm-S0/B0, Dynamic Tanh, Dynamic erf.
# The batch-statistics methods compute through the normlab:: operators (BN's fused kernel);
# EvoNorm needs *differentiable* group/batch standard deviations inside a non-linear formula and
# is written in plain torch ops, as are the point-wise DyT/Derf. Every function is free of
# data-dependent Python branching (no .item()), so torch.compile(fullgraph=True) and
# torch.export trace them.
# ============================================================================================

__all__ += [
    "batch_renorm",
    "dynamic_erf",
    "dynamic_tanh",
    "evonorm_b0",
    "evonorm_s0",
    "filter_response_norm",
    "ghost_batch_norm",
    "weight_standardize",
]


def _chan_view(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def _needs_running(running_mean, running_var, what: str) -> None:
    if running_mean is None or running_var is None:
        raise ValueError(f"running_mean/running_var: {what} needs running statistics, got None")


def _check_batch_stats(input: Tensor, m: int, eps: float, what: str) -> None:
    if eps == 0:
        raise ValueError(f"eps: expected a number > 0 for batch statistics ({what}), got 0")
    if m == 1:
        raise ValueError(
            f"input: {what} in training needs more than 1 value per channel, got shape {tuple(input.shape)}"
        )


def _update_batch_running(running_mean, running_var, mean, var, m: int, momentum) -> None:
    """BN's running-average update; ``momentum`` may be a float or a 0-d tensor (not inspected)."""
    with torch.no_grad():
        for run, new in ((running_mean, mean), (running_var, var * (m / (m - 1)))):
            run.mul_(1.0 - momentum).add_(new.to(run.dtype) * momentum)


def _bn_batch(input: Tensor, weight, bias, eps: float, backend):
    """(y, mean, var) of training batch norm: the fused operator, or standard ops when traced."""
    if traced(input):
        red = [0] + list(range(2, input.dim()))
        var, mean = torch.var_mean(input.to(compute_dtype(input.dtype)), red, correction=0)
        y = TF.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
        return y, mean.detach(), var.detach()
    y, mean, var, _ = ops.batch_norm(input, weight, bias, eps, backend=backend)
    return y, mean, var


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Batch Renormalization (Ioffe 2017) of (N, C, \*) input.

    Training, with μ_B, σ_B = sqrt(σ²_B + ε) the batch statistics of channel c and μ, σ =
    sqrt(running_var + ε) the running ones *before* this batch's update:

    .. math::

        r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
        y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

    r and d are constants for the gradient (stop-gradient); the gradient flows through μ_B, σ_B
    as in batch norm. r_max = 1, d_max = 0 is batch norm; eval (``training=False``) is batch norm
    with the running statistics. The running statistics are updated as batch norm's (momentum,
    unbiased variance). ``r_max``/``d_max`` may be 0-d tensors (a warm-up schedule's value).

    Computation: y = x̂·(γ r) + (γ d + β) is batch norm with the per-channel scale γ·r and shift
    γ·d + β, so one statistics pass (``torch.var_mean``, no output) gives r and d, then one
    ``normlab::batch_norm`` call (the fused kernel, and its fused backward) with that scale and
    shift; autograd carries dγ = r·Σ dy·x̂ + d·Σ dy through the C-sized products.
    """
    check_input(input, min_dim=2)
    check_eps(eps)
    check_momentum(momentum)
    _check_limit(r_max, "r_max", 1.0)
    _check_limit(d_max, "d_max", 0.0)
    _needs_running(running_mean, running_var, "batch renormalization")
    c = input.shape[1]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        _check_param(t, (c,), name)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, backend=backend)
    m = input.numel() // c if c else 0
    _check_batch_stats(input, m, eps, "batch renormalization")
    with torch.no_grad():
        red = [0] + list(range(2, input.dim()))
        var_b, mean_b = torch.var_mean(input.detach().to(compute_dtype(input.dtype)), red, correction=0)
        sd = var_b.dtype
        sigma = torch.sqrt(running_var.to(sd) + eps)
        r_max_t = torch.as_tensor(r_max, dtype=sd, device=input.device)
        d_max_t = torch.as_tensor(d_max, dtype=sd, device=input.device)
        r = torch.minimum(torch.maximum(torch.sqrt(var_b + eps) / sigma, 1.0 / r_max_t), r_max_t)
        d = torch.minimum(torch.maximum((mean_b - running_mean.to(sd)) / sigma, -d_max_t), d_max_t)
    pdt = input.dtype if weight is None else weight.dtype
    scale, shift = r.to(pdt), d.to(pdt)
    if weight is not None:
        scale, shift = weight * scale, weight * shift
    if bias is not None:
        shift = shift + bias
    y, mean, var = _bn_batch(input, scale, shift, eps, backend)
    if running_mean is not None and m > 0:
        _update_batch_running(running_mean, running_var, mean, var, m, momentum)
    return y


def ghost_batch_norm(
    input: Tensor,
    virtual_batch_size: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017) of (N, C, \*) input.

    The batch is split into k = N / g consecutive *virtual batches* of g = ``virtual_batch_size``
    samples and each is batch-normalized on its own: for virtual batch j and channel c

    .. math:: y = \gamma_c \frac{x - \mu_{jc}}{\sqrt{\sigma^2_{jc} + \epsilon}} + \beta_c

    with μ_jc, σ²_jc over the g samples and every position. g must divide N (an error otherwise;
    no remainder rule). g = N is batch norm. Running statistics (updated once per call):
    running_mean ← average of the k virtual-batch means (= the batch mean), running_var ← average
    of the k unbiased virtual-batch variances, each with ``momentum``. Eval with running
    statistics is batch norm with them (independent of how the eval batch is split).

    Computed by the ``normlab::ghost_batch_norm`` operator (on the CPU backend the batch-norm
    kernels on each virtual batch's memory, no rearranging copy); traced for export: batch norm
    of the (g, k·C, \*) rearrangement, standard operators only.
    """
    c = _check_bn_args(input, running_mean, running_var, weight, bias, eps, momentum)
    check_positive_int(virtual_batch_size, "virtual_batch_size")
    use_batch_stats = training or running_mean is None or running_var is None
    if not use_batch_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, backend=backend)
    n, g = input.shape[0], virtual_batch_size
    if n % g:
        raise ValueError(
            f"virtual_batch_size: expected a divisor of the batch size {n}, got {g} "
            f"(ghost batch norm has no remainder rule: use a batch size that is a multiple of {g})"
        )
    k = n // g
    spatial = tuple(input.shape[2:])
    m = g * math.prod(spatial)
    _check_batch_stats(input, m, eps, "ghost batch norm")
    if n == 0:
        return input.clone()
    if traced(input):
        xs = input.reshape((k, g, c) + spatial).transpose(0, 1).reshape((g, k * c) + spatial)
        w = None if weight is None else weight.repeat(k)
        b = None if bias is None else bias.repeat(k)
        y, mean, var = _bn_batch(xs, w, b, eps, backend)
        y = y.reshape((g, k, c) + spatial).transpose(0, 1).reshape(input.shape)
    else:
        y, mean, var, _ = ops.ghost_batch_norm(input, weight, bias, g, eps, backend=backend)
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            _update_running(running_mean, mean.view(k, c).mean(0), momentum)
            _update_running(running_var, (var.view(k, c) * (m / (m - 1))).mean(0), momentum)
    return y


def weight_standardize(weight: Tensor, eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    r"""Weight Standardization (Qiao et al. 2019): standardize each output filter of ``weight``.

    .. math:: \hat W_{o} = \frac{W_{o} - \mu_{o}}{\sqrt{\sigma^2_{o} + \epsilon}}

    μ_o, σ²_o (biased) over every element of filter o = ``weight[o]`` (input channels × kernel).
    Computed as a layer norm without affine of the (out, in·k) matrix (``normlab::layer_norm``).
    """
    check_input(weight, "weight", min_dim=2)
    check_eps(eps)
    w2 = weight.reshape(weight.shape[0], -1)
    return layer_norm(w2, (w2.shape[1],), None, None, eps, backend=backend).view(weight.shape)


def filter_response_norm(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    tau: Tensor | None = None,
    eps: float = 1e-6,
    *,
    learned_eps: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020).

    For (N, C, \*) input, per (sample, channel) over the positions:

    .. math::

        \nu^2 = \operatorname{mean}_{\ast}(x^2),\quad
        \hat x = \frac{x}{\sqrt{\nu^2 + \epsilon}},\quad
        z = \max(\gamma \hat x + \beta,\ \tau)

    No centring. ``tau=None`` leaves out the TLU. ``learned_eps`` (a 1-element tensor) makes ε
    learnable as in the paper: ε_total = ``eps`` + |learned_eps|. With a fixed ε the whole layer
    is the ``normlab::filter_response_norm`` operator (on the CPU backend one fused pass forward,
    one backward); a learned ε is a tensor, so that path (and tracing for export) is plain torch
    ops.
    """
    check_input(input, min_dim=3)
    check_eps(eps)
    c = input.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias"), (tau, "tau")):
        _check_param(t, (c,), name)
    if learned_eps is not None and learned_eps.numel() != 1:
        raise ValueError(f"learned_eps: expected a 1-element tensor, got shape {tuple(learned_eps.shape)}")
    if learned_eps is None and not traced(input):
        # one operator for the whole layer (the CPU backend: one fused pass each way)
        return ops.filter_response_norm(input, weight, bias, tau, eps, backend=backend)[0]
    else:
        xc = input.to(compute_dtype(input.dtype))
        nu2 = xc.pow(2).mean(tuple(range(2, input.dim())), keepdim=True)
        e = eps if learned_eps is None else eps + learned_eps.abs().reshape(()).to(xc.dtype)
        xhat = (xc * torch.rsqrt(nu2 + e)).to(input.dtype)
    view = _chan_view(input)
    y = xhat
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    if tau is not None:
        y = torch.maximum(y, tau.view(view).to(y.dtype))
    return y.to(input.dtype)


def _group_std(x: Tensor, groups: int, eps: float) -> Tensor:
    """sqrt(biased variance + ε) per (sample, group), broadcast back to x's shape."""
    n, c = x.shape[0], x.shape[1]
    var = x.reshape(n, groups, -1).var(-1, correction=0)
    std = torch.sqrt(var + eps).view((n, groups, 1) + (1,) * (x.dim() - 2))
    return std.expand((n, groups, c // groups) + tuple(x.shape[2:])).reshape(x.shape)


def evonorm_s0(
    input: Tensor,
    groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020), batch-independent, of (N, C, \*) input.

    .. math:: y = \frac{x \cdot \operatorname{sigmoid}(v x)}{\sqrt{s^2_{g}(x) + \epsilon}}\,\gamma + \beta

    with s²_g the biased variance per (sample, group) over the group's C/G channels and every
    position (GroupNorm's grouping); v, γ, β per channel. ``v=None`` drops the sigmoid gate
    (y = x / s_g · γ + β). Computed by the ``normlab::evonorm_s0`` operator (on the CPU backend
    one fused kernel forward, statistics then output, and one backward); traced for export,
    plain torch ops.
    """
    check_input(input, min_dim=2)
    check_eps(eps)
    c = input.shape[1]
    check_divisor(groups, c, "groups", f"the {c} channels")
    for t, name in ((weight, "weight"), (bias, "bias"), (v, "v")):
        _check_param(t, (c,), name)
    if not traced(input):
        return ops.evonorm_s0(input, weight, bias, v, groups, eps, backend=backend)[0]
    xc = input.to(compute_dtype(input.dtype))
    view = _chan_view(input)
    num = xc if v is None else xc * torch.sigmoid(v.view(view) * xc)
    y = num / _group_std(xc, groups, eps)
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y.to(input.dtype)


def evonorm_b0(
    input: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""EvoNorm-B0 (Liu, Brock, Simonyan & Le 2020), batch-dependent, of (N, C, \*S) input.

    .. math::

        y = \frac{x}{\max\big(\sqrt{s^2_{b}(x) + \epsilon},\ v x + \sqrt{s^2_{i}(x) + \epsilon}\big)}\,\gamma + \beta

    s²_b: the biased batch variance per channel over (N, \*S) in training (or without running
    statistics), ``running_var`` in eval; s²_i: the biased variance per (sample, channel) over
    the positions. Training updates ``running_var`` with the unbiased batch variance and
    ``momentum``. Computed by the ``normlab::evonorm_b0`` operator (on the CPU backend fused
    kernels: statistics, output; backward: reductions, dx; the gradient of the max goes to the
    larger argument, split on a tie as torch.maximum's); traced for export, plain torch ops.
    """
    check_input(input, min_dim=3)
    check_eps(eps)
    check_momentum(momentum)
    c = input.shape[1]
    for t, name in ((running_var, "running_var"), (weight, "weight"), (bias, "bias"), (v, "v")):
        _check_param(t, (c,), name)
    batch_stats = training or running_var is None
    if not traced(input):
        m = input.numel() // c if c else 0
        if batch_stats:
            _check_batch_stats(input, m, eps, "EvoNorm-B0")
        y, _, var_b, _, _ = ops.evonorm_b0(input, weight, bias, v, None if batch_stats else running_var, eps,
                                           backend=backend)
        if training and running_var is not None and m > 0:
            _update_running(running_var, var_b * (m / (m - 1)), momentum)
        return y
    xc = input.to(compute_dtype(input.dtype))
    view = _chan_view(input)
    if training or running_var is None:
        m = input.numel() // c if c else 0
        _check_batch_stats(input, m, eps, "EvoNorm-B0")
        var_b = xc.var([0] + list(range(2, input.dim())), correction=0)
        if training and running_var is not None and m > 0:
            with torch.no_grad():
                _update_running(running_var, var_b.detach() * (m / (m - 1)), momentum)
    else:
        var_b = running_var.to(xc.dtype)
    left = torch.sqrt(var_b + eps).view(view)
    inst = torch.sqrt(xc.var(tuple(range(2, input.dim())), correction=0, keepdim=True) + eps)
    right = inst if v is None else v.view(view) * xc + inst
    y = xc / torch.maximum(left, right)
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y.to(input.dtype)


def _check_pointwise_affine(input: Tensor, weight, bias, channels_last: bool) -> None:
    if channels_last:
        p = weight if weight is not None else bias
        shape = tuple(input.shape[input.dim() - p.dim():]) if p is not None and input.dim() >= p.dim() else None
        for t, name in ((weight, "weight"), (bias, "bias")):
            if t is not None and (input.dim() < t.dim() or tuple(t.shape) != shape):
                raise ValueError(
                    f"{name}: expected the input's trailing dims {list(t.shape)}, got input of shape {list(input.shape)}"
                )
    else:
        if input.dim() < 2:
            raise ValueError(f"input: expected (N, C, *) input for channels_last=False, got shape {tuple(input.shape)}")
        for t, name in ((weight, "weight"), (bias, "bias")):
            _check_param(t, (input.shape[1],), name)


def _scalar_tensor(t, like: Tensor) -> Tensor:
    """α or s as the 1-element tensor the operators take (a number becomes a constant)."""
    if isinstance(t, Tensor):
        return t
    return torch.tensor(float(t), dtype=compute_dtype(like.dtype), device=like.device)


def dynamic_tanh(
    input: Tensor,
    alpha: Tensor | float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channels_last: bool = True,
    backend: str | None = None,
) -> Tensor:
    r"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu 2025): :math:`y = \gamma \odot \tanh(\alpha x) + \beta`.

    α is a scalar; γ, β have the shape of the input's trailing dims (``channels_last=True``, as
    LayerNorm) or shape (C,) on dim 1 of (N, C, \*) input (``channels_last=False``). Point-wise:
    no statistics. Computed by the ``normlab::dynamic_tanh`` operator: on the CPU backend one fused
    pass forward and one backward (dx, dα, dγ, dβ together); traced for export, plain torch ops.
    """
    check_input(input)
    _check_scalar(alpha, "alpha")
    _check_pointwise_affine(input, weight, bias, channels_last)
    a = _scalar_tensor(alpha, input)
    if traced(input):
        return reference.dynamic_tanh(input, a, weight, bias, channels_last=channels_last)
    return ops.dynamic_tanh(input, a, weight, bias, channels_last, backend)


def dynamic_erf(
    input: Tensor,
    alpha: Tensor | float,
    shift: Tensor | float = 0.0,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channels_last: bool = True,
    backend: str | None = None,
) -> Tensor:
    r"""Dynamic erf, Derf (Chen, Lu, Zhu, Sun & Liu 2025): :math:`y = \gamma \odot \operatorname{erf}(\alpha x + s) + \beta`.

    α and s are scalars; γ, β as in :func:`dynamic_tanh`. Point-wise: no statistics. Computed by
    the ``normlab::dynamic_erf`` operator (fused passes on the CPU backend, as :func:`dynamic_tanh`).
    """
    check_input(input)
    _check_scalar(alpha, "alpha")
    _check_scalar(shift, "shift")
    _check_pointwise_affine(input, weight, bias, channels_last)
    a, s = _scalar_tensor(alpha, input), _scalar_tensor(shift, input)
    if traced(input):
        return reference.dynamic_erf(input, a, s, weight, bias, channels_last=channels_last)
    return ops.dynamic_erf(input, a, s, weight, bias, channels_last, backend)


# ============================================================================================
# Fused variants (issue 13 §1): residual-add + layer/RMS norm, group norm + SiLU, batch norm +
# ReLU, each one ``normlab::`` operator (see core/ops.py). Traced for export: the torch
# composition (standard operators).
# ============================================================================================

__all__ += ["add_layer_norm", "add_rms_norm", "batch_norm_relu", "group_norm_silu"]


def _check_residual(residual, input: Tensor) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual: expected a torch.Tensor, got {type(residual).__name__}")
    for what, got, want in (("shape", tuple(residual.shape), tuple(input.shape)), ("dtype", residual.dtype, input.dtype),
                            ("device", residual.device, input.device)):
        if got != want:
            raise ValueError(f"residual: expected the input's {what} {want}, got {got}")


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Residual add + layer normalization: ``(y, s)`` with

    .. math:: s = x + r,\qquad y = \gamma \odot \frac{s - \mu(s)}{\sqrt{\sigma^2(s) + \epsilon}} + \beta

    (statistics per row over the trailing ``normalized_shape`` dims). ``s`` is returned — the
    residual stream of a pre-norm transformer block, the next block's ``residual`` — and both
    outputs are differentiable: x and the residual get ∂L/∂s through y plus ∂L/∂s. ``input`` and
    ``residual`` must have the same shape, dtype and device; s is rounded to their dtype (as
    ``x + r`` in torch) before it is normalized.
    """
    if traced(input):
        s = input + residual
        return TF.layer_norm(s, normalized_shape, weight, bias, eps), s
    shape = _normalized_shape(normalized_shape)
    check_input(input)
    _check_residual(residual, input)
    check_eps(eps)
    _check_trailing(input, shape)
    _check_param(weight, shape, "weight")
    _check_param(bias, shape, "bias")
    y, s, *_ = ops.add_layer_norm(input, residual, len(shape), weight, bias, eps, backend=backend)
    return y, s


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Residual add + RMS normalization: ``(y, s)``, s = x + r, :math:`y = \gamma \odot s / \sqrt{\overline{s^2} + \epsilon}`.

    As :func:`add_layer_norm` without centring or bias; ``eps=None`` is the machine epsilon of
    the compute dtype, as :func:`rms_norm`.
    """
    if traced(input):
        s = input + residual
        return TF.rms_norm(s, normalized_shape, weight, eps), s
    shape = _normalized_shape(normalized_shape)
    check_input(input)
    _check_residual(residual, input)
    if eps is None:
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    check_eps(eps)
    _check_trailing(input, shape)
    _check_param(weight, shape, "weight")
    y, s, *_ = ops.add_layer_norm(input, residual, len(shape), weight, None, eps, rms=True, backend=backend)
    return y, s


def group_norm_silu(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Group normalization followed by SiLU (the diffusion-UNet block), one operator:

    .. math:: z = \gamma_c \frac{x - \mu_{ng}}{\sqrt{\sigma^2_{ng} + \epsilon}} + \beta_c,\qquad y = z \cdot \operatorname{sigmoid}(z)

    Same arguments as :func:`group_norm` (no mask). z is not rounded to the input's dtype before
    the SiLU (torch's ``F.silu(F.group_norm(x))`` rounds it once more in 16 bits).
    """
    if traced(input):
        return TF.silu(TF.group_norm(input, num_groups, weight, bias, eps))
    check_input(input, min_dim=2)
    check_eps(eps)
    c = input.shape[1]
    check_divisor(num_groups, c, "num_groups", f"the {c} channels")
    _check_param(weight, (c,), "weight")
    _check_param(bias, (c,), "bias")
    return ops.group_norm_silu(input, num_groups, weight, bias, eps, backend=backend)[0]


def batch_norm_relu(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Batch normalization followed by ReLU, one operator: :math:`y = \max(0, \mathrm{BN}(x))`.

    Same signature and statistics as :func:`batch_norm` (no mask): batch statistics in training
    (or without running statistics), with the running averages updated exactly as batch_norm
    does; the running statistics otherwise. The ReLU's gradient is taken from the output, as
    torch's ``threshold_backward`` (0 where y ≤ 0).
    """
    if traced(input):
        return TF.relu(TF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
    c = _check_bn_args(input, running_mean, running_var, weight, bias, eps, momentum)
    if not (training or running_mean is None or running_var is None):
        return ops.batch_norm_relu_eval(input, running_mean, running_var, weight, bias, eps, backend=backend)
    m = input.numel() // c if c else 0
    _check_batch_stats(input, m, eps, "batch norm + ReLU")
    y, mean, var, _ = ops.batch_norm_relu(input, weight, bias, eps, backend=backend)
    if training and running_mean is not None and running_var is not None and m > 0:
        _update_bn_running(running_mean, running_var, mean, var, m, momentum)
    return y
