"""Reference backend: every normalization as one pure-torch routine with a hand-derived backward.

All methods are the same operation with a different choice of axes::

    x̂ = (x − μ) · rstd,   rstd = 1 / sqrt(σ² + ε),   y = γ · x̂ + β

with μ, σ² the biased mean and variance over a set of reduced dimensions ``dims``. Each op below
only reshapes ``x`` so that its statistics live on ``dims`` and its affine parameters broadcast,
then calls :func:`normalize`. This backend runs on any device and dtype and is the oracle the
fused kernels are tested against.

Numerics:

* statistics accumulate in float32 for 16-bit inputs and in the input dtype otherwise;
* the mean is kept as a (shift, correction) pair: ``shift = mean(x)`` is rounded to the compute
  dtype, ``d = x − shift`` is then (almost always) exact, and ``c = mean(d)`` recovers the rounding
  error. The variance is the corrected two-pass estimate ``mean(d²) − c²`` (Chan, Golub & LeVeque
  1983), so an offset of 1e6 with a spread of 0.1 keeps full float32 precision; x̂ is computed as
  ``(d − c) · rstd`` instead of ``(x − mean) · rstd``, which would round the mean to 0.06 at 1e6;
* if ``d²`` overflows (|x| near 1e30 in float32), the centred values are rescaled by their
  per-group maximum before squaring, so the output stays finite and exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["normalize", "batch_norm", "batch_norm_eval", "group_norm", "layer_norm", "compute_dtype", "supports"]

# Modes of the one normalize routine.
STANDARD = "standard"  # subtract the mean, divide by the standard deviation
RMS = "rms"  # divide by the root mean square, no centring
CENTER = "center"  # subtract the mean only (mean-only batch norm)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit floats, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _moments(x: Tensor, dims: tuple[int, ...], mode: str, eps: float):
    """Statistics of ``x`` (already in the compute dtype) over ``dims``, kept dims of size 1.

    Returns ``(shift, corr, var, rstd)`` such that ``x̂ = (x − shift − corr) · rstd``; ``var`` is
    the biased variance for STANDARD, the mean square for RMS and ``None`` for CENTER. Every step
    is a differentiable torch op, so the double-backward path can call this on a graph.
    """
    if mode == RMS:
        shift = corr = None
        d = x
    else:
        shift = x.mean(dims, keepdim=True)
        d = x - shift
        corr = d.mean(dims, keepdim=True)
    if mode == CENTER:
        return shift, corr, None, None
    sq = (d * d).mean(dims, keepdim=True)
    var = sq if mode == RMS else (sq - corr * corr).clamp_min(0)
    if not torch.isfinite(var).all():
        # d² overflowed somewhere (or the input holds NaN/Inf): redo the second moment on
        # d / max|d| (s >= 1 so that eps / s² cannot overflow). Finite rows get the same value up
        # to rounding; NaN/Inf rows stay NaN, as they must.
        s = d.abs().amax(dims, keepdim=True).clamp_min(1.0)
        ds = d / s
        sq_s = (ds * ds).mean(dims, keepdim=True)
        var_s = sq_s if mode == RMS else (sq_s - (corr / s) ** 2).clamp_min(0)
        rstd = 1.0 / (s * torch.sqrt(var_s + eps / (s * s)))
        return shift, corr, var_s * s * s, rstd
    return shift, corr, var, torch.rsqrt(var + eps)


def _xhat(x: Tensor, shift, corr, rstd, mode: str) -> Tensor:
    if mode == RMS:
        return x * rstd
    d = (x - shift) - corr
    return d if mode == CENTER else d * rstd


def _input_grad(g: Tensor, xhat: Tensor, rstd, dims: tuple[int, ...], mode: str) -> Tensor:
    """∂L/∂x given g = ∂L/∂x̂: the projection that removes the directions the statistics absorb.

    STANDARD: rstd · (g − mean(g) − x̂ · mean(g · x̂)); RMS: rstd · (g − x̂ · mean(g · x̂));
    CENTER: g − mean(g). Means are over ``dims``.
    """
    if mode == CENTER:
        return g - g.mean(dims, keepdim=True)
    proj = g - xhat * (g * xhat).mean(dims, keepdim=True)
    if mode == STANDARD:
        proj = proj - g.mean(dims, keepdim=True)
    return proj * rstd


class _Normalize(torch.autograd.Function):
    """y = γ · x̂ + β with statistics over ``dims``; saves x, the statistics and γ only."""

    @staticmethod
    def forward(ctx, x, weight, bias, dims, eps, mode):
        acc = compute_dtype(x.dtype)
        xc = x.to(acc)
        shift, corr, var, rstd = _moments(xc, dims, mode, eps)
        xhat = _xhat(xc, shift, corr, rstd, mode)
        y = xhat
        if weight is not None:
            y = y * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        ctx.save_for_backward(x, weight, shift, corr, rstd)
        ctx.dims, ctx.eps, ctx.mode = dims, eps, mode
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        mean = None if mode == RMS else shift + corr
        if mean is not None:
            ctx.mark_non_differentiable(mean)
        if var is not None:
            ctx.mark_non_differentiable(var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, shift, corr, rstd = ctx.saved_tensors
        dims, mode = ctx.dims, ctx.mode
        acc = compute_dtype(x.dtype)
        xc = x.to(acc)
        if torch.is_grad_enabled():
            # create_graph=True: rebuild the statistics as a graph of x so that this backward is
            # itself differentiable (gradient penalties, Hessian-vector products).
            shift, corr, _, rstd = _moments(xc, dims, mode, ctx.eps)
        xhat = _xhat(xc, shift, corr, rstd, mode)
        dy = dy.to(acc)
        g = dy if weight is None else dy * weight.to(acc)
        dx = _input_grad(g, xhat, rstd, dims, mode).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (dy * xhat).sum_to_size(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.bias_meta
            db = dy.sum_to_size(shape).to(dtype)
        return dx, dw, db, None, None, None


def normalize(
    x: Tensor,
    dims: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    mode: str = STANDARD,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Normalize ``x`` over ``dims`` and apply the affine map.

    ``weight`` and ``bias`` must broadcast against ``x``. Returns ``(y, mean, var)`` where mean
    and var keep the reduced dims (size 1) and are in the compute dtype; ``mean`` is None for
    RMS, ``var`` is None for CENTER and holds mean(x²) for RMS.
    """
    dims = tuple(d % x.dim() for d in dims)
    return _Normalize.apply(x, weight, bias, dims, eps, mode)


# --------------------------------------------------------------------------------------------
# The backend ops (see docs/CONTRACTS.md): each only chooses axes and broadcast shapes.
# --------------------------------------------------------------------------------------------


def _channel_view(t: Tensor | None, ndim: int) -> Tensor | None:
    """(C,) -> (1, C, 1, ..., 1) broadcasting against an ndim-dimensional (N, C, *) tensor."""
    return None if t is None else t.view((1, -1) + (1,) * (ndim - 2))


def batch_norm(x: Tensor, weight, bias, eps: float, *, center_only: bool = False):
    """Training-mode batch norm: statistics per channel over N and every spatial position."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    mode = CENTER if center_only else STANDARD
    y, mean, var = normalize(x3, (0, 2), _channel_view(weight, 3), _channel_view(bias, 3), eps, mode)
    return _restore(y, x), mean.flatten(), None if var is None else var.flatten()


def batch_norm_eval(x: Tensor, mean: Tensor, var, weight, bias, eps: float, *, center_only: bool = False):
    """Batch norm with given (running) statistics: one per-channel affine map y = a·x + b."""
    acc = compute_dtype(x.dtype)
    mean = mean.to(acc)
    if center_only:
        scale = torch.ones_like(mean)
    else:
        scale = torch.rsqrt(var.to(acc) + eps)
        if weight is not None:
            scale = scale * weight.to(acc)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    y = x.to(acc) * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())
    return y.to(x.dtype)


def group_norm(x: Tensor, num_groups: int, weight, bias, eps: float):
    """Statistics per (sample, group of C/G channels) over the group's channels and positions."""
    n, c = x.shape[0], x.shape[1]
    x4 = x.reshape(n, num_groups, c // num_groups, -1)
    w = None if weight is None else weight.view(1, num_groups, c // num_groups, 1)
    b = None if bias is None else bias.view(1, num_groups, c // num_groups, 1)
    y, mean, var = normalize(x4, (2, 3), w, b, eps, STANDARD)
    return _restore(y, x), mean.view(n, num_groups), var.view(n, num_groups)


def layer_norm(x: Tensor, normalized_ndim: int, weight, bias, eps: float, *, rms: bool = False):
    """Statistics per row over the trailing ``normalized_ndim`` dims; γ/β per element of them."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    y, mean, var = normalize(x, dims, weight, bias, eps, RMS if rms else STANDARD)
    lead = x.shape[: x.dim() - normalized_ndim]
    return y, None if mean is None else mean.view(lead), var.view(lead)


def _restore(y: Tensor, like: Tensor) -> Tensor:
    """Reshape y back to ``like``'s shape keeping channels_last when ``like`` had it."""
    y = y.reshape(like.shape)
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if like.dim() == (4 if fmt is torch.channels_last else 5):
            if like.is_contiguous(memory_format=fmt) and not like.is_contiguous():
                return y.contiguous(memory_format=fmt)
    return y


def supports(op: str, x: Tensor) -> bool:
    """The reference backend handles every op on every device and floating dtype."""
    return True
