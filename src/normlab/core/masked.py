r"""Masked statistics: every normalization with a boolean ``mask`` of valid positions.

``mask`` is a boolean tensor broadcastable to the input, True = a valid position. Over each set
of reduced positions (a batch-norm channel, a group-norm (sample, group), a layer-norm row) with
m = mask and n = Σ m the valid count, the statistics are count-weighted::

    μ  = Σ m·x / n          σ² = Σ m·(x − μ)² / n   (biased; RMS: ν² = Σ m·x² / n)
    y  = m · (γ · (x − μ) / sqrt(σ² + ε) + β)

so the output at a masked position is **zero**, padding values (even Inf/NaN) reach no output,
and the gradient at a masked position is exactly zero. A set with no valid position (n = 0) has
μ = σ² = 0 and every output in it is masked, so zero: no NaN anywhere, forward or backward.
Batch-norm's running variance takes the unbiased σ² · n/(n − 1) (as torch); the callers in
:mod:`normlab.functional` update a running statistic only where it has enough valid values.

One pure-torch composite for all of them (:func:`normalize`), with no data-dependent Python
branch, so torch.compile(fullgraph=True), torch.export, vmap and double backward work as for any
torch code; no fused kernel. Reductions accumulate in ``reference.stat_dtype(x)`` (float64 for
float64 inputs and for float32 on the CPU, float32 otherwise) with the corrected two-pass
variance of the reference backend (shift = the mean in the statistics dtype, then the mean of
the centred values recovers its rounding); outputs have x's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normlab.core.reference import _spatial, compute_dtype, stat_dtype

__all__ = [
    "batch_norm",
    "batch_norm_eval",
    "check_mask",
    "group_norm",
    "layer_mask",
    "layer_norm",
    "layer_norm_channels",
    "normalize",
]


def check_mask(mask, input: Tensor) -> None:
    """One-line errors naming ``mask``: a bool tensor on the input's device, broadcastable to it."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a boolean torch.Tensor (True = valid position), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True = valid position), got {mask.dtype}; use mask.bool()")
    if mask.device != input.device:
        raise ValueError(f"mask: expected a tensor on the input's device {input.device}, got {mask.device}")
    shape = tuple(input.shape)
    try:
        ok = mask.dim() <= input.dim() and tuple(torch.broadcast_shapes(mask.shape, input.shape)) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask: expected a shape broadcastable to the input's {shape}, got {tuple(mask.shape)}")


def layer_mask(mask, layer):
    """``mask`` as a layer's ``forward(input, mask=None)`` received it (called only when not None).

    ``torch.fx.symbolic_trace`` of the layer itself binds the unused ``mask=None`` argument to a
    placeholder Proxy: that is None, so fx traces the layer's unmasked forward as before masks
    existed. A mask that really flows through an fx trace is refused: the masked composite needs
    shapes a Proxy does not have (torch.export and torch.compile trace it).
    """
    if isinstance(mask, torch.fx.Proxy):
        node = mask.node
        if node.op == "placeholder" and node.args == (None,) and getattr(mask.tracer, "root", None) is layer:
            return None
        raise TypeError(
            "mask: torch.fx.symbolic_trace cannot trace a masked normalization; use torch.export or "
            "torch.compile, or trace with concrete_args={'mask': None}"
        )
    return mask


def normalize(
    x: Tensor,
    mask: Tensor,
    dims: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    rms: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Masked normalization of ``x`` over ``dims`` (see the module docstring).

    ``mask`` (bool) and ``weight``/``bias`` broadcast against ``x``. Returns ``(y, mean, var, n)``
    with the statistics (detached, in ``stat_dtype(x)``) keeping the reduced dims (size 1):
    ``mean`` None for RMS, ``var`` the biased variance (RMS: the mean square) and ``n`` the valid
    count per statistic (float).
    """
    dims = tuple(d % x.dim() for d in dims)
    sd = stat_dtype(x)
    xs = x.to(sd)
    n = mask.to(sd).expand(x.shape).sum(dims, keepdim=True)
    nz = n.clamp_min(1.0)  # a set with no valid position: statistics 0, outputs all masked
    xz = torch.where(mask, xs, 0.0)  # padding (even Inf/NaN) never enters a sum or a gradient
    if rms:
        shift = corr = None
        d = xz
        var = (d * d).sum(dims, keepdim=True) / nz
    else:
        shift = xz.sum(dims, keepdim=True) / nz
        d = torch.where(mask, xs - shift, 0.0)
        corr = d.sum(dims, keepdim=True) / nz
        var = ((d * d).sum(dims, keepdim=True) / nz - corr * corr).clamp_min(0.0)
    rstd = torch.rsqrt(torch.where(n > 0, var + eps, 1.0))
    xhat = d * rstd if rms else (d - corr) * rstd
    y = xhat
    if weight is not None:
        y = y * weight.to(sd)
    if bias is not None:
        y = y + bias.to(sd)
    y = torch.where(mask, y, 0.0).to(x.dtype)
    mean = None if rms else (shift + corr).detach()
    return y, mean, var.detach(), n


def _channel_view(t: Tensor | None, ndim: int) -> Tensor | None:
    return None if t is None else t.view((1, -1) + (1,) * (ndim - 2))


def _full(mask: Tensor, x: Tensor, shape) -> Tensor:
    """The mask broadcast to x and reshaped like x is for the reduction."""
    return mask.expand(x.shape).reshape(shape)


def batch_norm(x: Tensor, mask: Tensor, weight, bias, eps: float):
    """Training batch norm of (N, C, \\*): ``(y, mean, var, n)``, statistics (C,) over the valid
    positions of N and every spatial position of each channel."""
    shape = (x.shape[0], x.shape[1], _spatial(x))
    y, mean, var, n = normalize(x.reshape(shape), _full(mask, x, shape), (0, 2),
                                _channel_view(weight, 3), _channel_view(bias, 3), eps)
    return y.reshape(x.shape), mean.flatten(), var.flatten(), n.flatten()


def batch_norm_eval(x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> Tensor:
    """Batch norm with given (running) statistics, zero at masked positions."""
    acc = compute_dtype(x.dtype)
    scale = torch.rsqrt(var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    xz = torch.where(mask, x.to(acc), 0.0)
    y = xz * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())
    return torch.where(mask, y, 0.0).to(x.dtype)


def group_norm(x: Tensor, mask: Tensor, num_groups: int, weight, bias, eps: float):
    """Group norm of (N, C, \\*): ``(y, mean, var, n)``, statistics (N, G) over the valid positions
    of each (sample, group of C/G channels). G = C is instance norm."""
    nb, c = x.shape[0], x.shape[1]
    shape = (nb, num_groups, c // num_groups, _spatial(x))

    def groups(t):
        return None if t is None else t.reshape(1, num_groups, c // num_groups, 1)

    y, mean, var, n = normalize(x.reshape(shape), _full(mask, x, shape), (2, 3), groups(weight), groups(bias), eps)
    s = (nb, num_groups)
    return y.reshape(x.shape), mean.reshape(s), var.reshape(s), n.reshape(s)


def layer_norm(x: Tensor, mask: Tensor, normalized_ndim: int, weight, bias, eps: float, *, rms: bool = False):
    """Layer (or RMS) norm over the trailing ``normalized_ndim`` dims, statistics per row over its
    valid positions: ``(y, mean, var, n)`` with the statistics of the leading shape."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    y, mean, var, n = normalize(x, mask, dims, weight, bias, eps, rms=rms)
    lead = x.shape[: x.dim() - normalized_ndim]
    return y, None if mean is None else mean.reshape(lead), var.reshape(lead), n.reshape(lead)


def layer_norm_channels(x: Tensor, mask: Tensor, weight, bias, eps: float):
    """Channels-first layer norm of (N, C, \\*): statistics over the valid channels of each
    (sample, position), (N, \\*S)."""
    y, mean, var, n = normalize(x, mask, (1,), _channel_view(weight, x.dim()), _channel_view(bias, x.dim()), eps)
    return y, mean.squeeze(1), var.squeeze(1), n.squeeze(1)
