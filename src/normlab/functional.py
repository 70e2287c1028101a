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

from normlab.core import ops
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


def check_input(x: Tensor, name: str = "input", *, min_dim: int = 1) -> None:
    """Tensor of a floating dtype with at least ``min_dim`` dims (empty tensors are valid)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got dtype {x.dtype}; convert with .float()"
        )
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim}-D input, got {x.dim()}-D of shape {tuple(x.shape)}")


def check_eps(eps: float) -> None:
    """ε ≥ 0 (0 is allowed, as in torch: a constant group then gives NaN, not an error)."""
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def check_momentum(momentum: float | None, *, allow_none: bool = False) -> None:
    """Momentum of the running averages: a number in [0, 1] (None = cumulative, modules only)."""
    if momentum is None and allow_none:
        return
    if isinstance(momentum, bool) or not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        expected = "a number in [0, 1] or None" if allow_none else "a number in [0, 1]"
        raise ValueError(f"momentum: expected {expected}, got {momentum!r}")


def check_channels(x: Tensor, num_channels: int, name: str = "input") -> None:
    if x.dim() < 2:
        raise ValueError(f"{name}: expected (N, C, *) input with C = {num_channels}, got shape {tuple(x.shape)}")
    if x.shape[1] != num_channels:
        raise ValueError(
            f"{name}: expected {num_channels} channels (dim 1), got {x.shape[1]} in shape {tuple(x.shape)}"
        )


def _check_param(t: Tensor | None, shape: tuple[int, ...], name: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


@torch.no_grad()
def _update_running(running: Tensor, batch: Tensor, momentum: float) -> None:
    if torch._C._are_functorch_transforms_active():
        # torch's kernels update running statistics with plain values, so torch.func.grad/jvp of
        # a training InstanceNorm with running statistics work. Here the update is torch ops, which
        # a grad/jvp transform wraps, and writing a wrapped value into the buffer is refused: write
        # the unwrapped (primal) value. Batched (vmap) values stay batched, and fail as torch's do.
        new = torch.add(running * (1.0 - momentum), batch.to(running.dtype), alpha=momentum)
        f = torch._C._functorch
        while f.is_functorch_wrapped_tensor(new) and not f.is_batchedtensor(new):
            new = f.get_unwrapped(new)
        if f.is_batchedtensor(new):
            running.copy_(new)  # refused by vmap, as torch's
        else:
            with torch._C._DisableFuncTorch():
                running.copy_(new)
        return
    running.mul_(1.0 - momentum).add_(batch.to(running.dtype), alpha=momentum)


# ----------------------------------------------------------------------------- batch norm


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
    backend: str | None = None,
) -> Tensor:
    r"""Batch normalization (Ioffe & Szegedy 2015) of ``input`` of shape (N, C, \*).

    .. math:: y = \gamma \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta

    with μ_c, σ²_c over N and every spatial position of channel c (training, or no running
    statistics) or the running statistics (eval). Same signature as
    :func:`torch.nn.functional.batch_norm`.
    """
    if traced(input):
        return TF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_input(input, min_dim=2)
    check_eps(eps)
    check_momentum(momentum)
    c = input.shape[1]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        _check_param(t, (c,), name)
    use_batch_stats = training or running_mean is None or running_var is None
    if not use_batch_stats:
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
    y, mean, var, _ = ops.batch_norm(input, weight, bias, eps, backend=backend)
    if training and running_mean is not None and running_var is not None and m > 0:
        _update_running(running_mean, mean, momentum)
        _update_running(running_var, var * (m / (m - 1)), momentum)
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
    backend: str | None = None,
) -> Tensor:
    r"""Group normalization (Wu & He 2018) of ``input`` of shape (N, C, \*).

    The C channels are split into ``num_groups`` groups of C/G; μ and σ² are computed per
    (sample, group) over the group's channels and every spatial position; γ, β are per channel.
    G = 1 is LayerNorm over (C, \*), G = C is InstanceNorm.
    """
    if traced(input):
        return TF.group_norm(input, num_groups, weight, bias, eps)
    check_input(input, min_dim=2)
    check_eps(eps)
    c = input.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {c} channels, got {num_groups!r}")
    _check_param(weight, (c,), "weight")
    _check_param(bias, (c,), "bias")
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
    backend: str | None = None,
) -> Tensor:
    r"""Instance normalization (Ulyanov et al. 2016): statistics per (sample, channel) over space.

    Equal to :func:`group_norm` with one group per channel. With running statistics they are the
    average over the batch of the per-instance statistics (as in torch).
    """
    if traced(input):
        return TF.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    check_input(input, min_dim=3)
    check_eps(eps)
    check_momentum(momentum)
    n, c = input.shape[0], input.shape[1]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        _check_param(t, (c,), name)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean/running_var: expected tensors when use_input_stats=False, got None")
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps, backend=backend)
    m = math.prod(input.shape[2:])
    if m == 1:
        raise ValueError(
            f"input: instance norm needs more than 1 spatial value per channel, got shape "
            f"{tuple(input.shape)}: the per-instance variance is 0"
        )
    y, mean, var, _ = ops.group_norm(input, c, weight, bias, eps, backend=backend)
    if running_mean is not None and running_var is not None and input.numel() > 0:
        _update_running(running_mean, mean.mean(0), momentum)
        _update_running(running_var, (var * (m / (m - 1))).mean(0), momentum)
    return y


# ----------------------------------------------------------------------------- layer / RMS


def _normalized_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any((not isinstance(s, int)) or s <= 0 for s in shape):
        raise ValueError(f"normalized_shape: expected a non-empty sequence of positive ints, got {normalized_shape!r}")
    return shape


def _check_trailing(input: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"normalized_shape: expected the input's trailing dims to be {list(shape)}, "
            f"got input of shape {list(input.shape)}"
        )


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Layer normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape`` dims.

    .. math:: y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    μ, σ² per row (every leading index), γ and β of shape ``normalized_shape``.
    """
    if traced(input):
        return TF.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = _normalized_shape(normalized_shape)
    check_input(input)
    check_eps(eps)
    _check_trailing(input, shape)
    _check_param(weight, shape, "weight")
    _check_param(bias, shape, "bias")
    return ops.layer_norm(input, len(shape), weight, bias, eps, backend=backend)[0]


def layer_norm_2d(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Channels-first layer normalization of (N, C, \*) input: statistics over C per position.

    .. math:: y_{n,:,s} = \gamma \odot \frac{x_{n,:,s} - \mu_{ns}}{\sqrt{\sigma^2_{ns} + \epsilon}} + \beta

    (ConvNeXt's LayerNorm). γ, β of shape (C,).
    """
    if traced(input):
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
    return ops.layer_norm_channels(input, weight, bias, eps, backend=backend)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""RMS normalization (Zhang & Sennrich 2019): :math:`y = \gamma \odot x / \sqrt{\overline{x^2} + \epsilon}`.

    No centring and no bias. ``eps=None`` uses the machine epsilon of the compute dtype, as torch
    does: ``finfo(float32).eps`` for 16-bit inputs, ``finfo(input.dtype).eps`` otherwise.
    """
    if traced(input):
        return TF.rms_norm(input, normalized_shape, weight, eps)
    shape = _normalized_shape(normalized_shape)
    check_input(input)
    if eps is None:
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    check_eps(eps)
    _check_trailing(input, shape)
    _check_param(weight, shape, "weight")
    return ops.layer_norm(input, len(shape), weight, None, eps, rms=True, backend=backend)[0]
