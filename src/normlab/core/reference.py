"""Reference backend: every normalization as one pure-torch, branch-free routine.

All methods are the same operation with a different choice of axes::

    x̂ = (x − μ) · rstd,   rstd = 1 / sqrt(σ² + ε),   y = γ · x̂ + β

with μ, σ² the biased mean and variance over a set of reduced dimensions ``dims``. Each op below
only reshapes ``x`` so that its statistics live on ``dims`` and its affine parameters broadcast,
then calls :func:`normalize`. The routines use plain differentiable torch ops and no data-dependent
branch, so they serve three roles:

* the **oracle** the fused kernels are tested against;
* the **fallback implementation** inside the ``normlab::`` operators for inputs no fused kernel
  takes (16-bit floats, devices without kernels, empty tensors);
* the **composite** that functorch (``vmap``, ``jvp``, ``grad``) and double backward differentiate.

Numerics:

* statistics accumulate in float32 for 16-bit inputs and in the input dtype otherwise;
* the mean is kept as a (shift, correction) pair: ``shift = mean(x)`` is rounded to the compute
  dtype, ``d = x − shift`` is then (almost always) exact, and ``c = mean(d)`` recovers the rounding
  error. The variance is the corrected two-pass estimate ``mean(d²) − c²`` (Chan, Golub & LeVeque
  1983), so an offset of 1e6 with a spread of 0.1 keeps full float32 precision; x̂ is computed as
  ``(d − c) · rstd`` instead of ``(x − mean) · rstd``, which would round the mean to 0.06 at 1e6;
* d² cannot overflow: where the largest |d| of a group exceeds 2⁶⁰ the centred values are divided
  by a power of two s ≥ max|d| (exact) before squaring, and ``rstd = 1 / (s · sqrt(σ²/s² + ε/s²))``.
  Elsewhere s = 1. This is a ``torch.where``, not a branch, so it traces and vmaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "moments",
    "normalize",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_eval",
    "group_norm",
    "group_norm_backward",
    "ghost_batch_norm",
    "ghost_batch_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_channels",
    "layer_norm_channels_backward",
    "compute_dtype",
    "supports",
]

# Modes of the one normalize routine.
STANDARD = "standard"  # subtract the mean, divide by the standard deviation
RMS = "rms"  # divide by the root mean square, no centring
CENTER = "center"  # subtract the mean only (mean-only batch norm)

_BIG = 2.0**60  # above this |d| is rescaled before squaring (float32 squares overflow at 1.8e19)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit floats, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def stat_dtype(x: Tensor) -> torch.dtype:
    """dtype of the statistics the ``normlab::`` operators return for ``x``: float64 for float64
    inputs and for float32 on the CPU (the fused kernels accumulate in float64), else float32."""
    if x.dtype == torch.float64 or (x.dtype == torch.float32 and x.device.type == "cpu"):
        return torch.float64
    return torch.float32


def _moments(x: Tensor, dims: tuple[int, ...], mode: str, eps: float):
    """Statistics of ``x`` (already in the compute dtype) over ``dims``, kept dims of size 1.

    Returns ``(shift, corr, var, rstd)`` such that ``x̂ = (x − shift − corr) · rstd``; ``var`` is
    the biased variance for STANDARD, the mean square for RMS and ``None`` for CENTER.
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
    if x.numel() == 0:
        s = torch.ones_like(d.sum(dims, keepdim=True))
    else:
        m = d.detach().abs().amax(dims, keepdim=True)
        # A power of two scales exactly; Inf/NaN groups keep s = 1 so they behave as unscaled
        # (torch's results: NaN rows, or 0 · x for an RMS row holding Inf).
        big = torch.isfinite(m) & (m > _BIG)
        s = torch.where(big, torch.exp2(torch.ceil(torch.log2(m.clamp_min(1.0)))), torch.ones_like(m))
    ds = d / s
    sq = (ds * ds).mean(dims, keepdim=True)
    var_s = sq if mode == RMS else (sq - (corr / s) ** 2).clamp_min(0)
    rstd = 1.0 / (s * torch.sqrt(var_s + eps / (s * s)))
    return shift, corr, var_s * (s * s), rstd


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


def normalize(
    x: Tensor,
    dims: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    mode: str = STANDARD,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Normalize ``x`` over ``dims`` and apply the affine map, with plain differentiable ops.

    ``weight`` and ``bias`` must broadcast against ``x``. Returns ``(y, mean, var, rstd)`` where
    the statistics keep the reduced dims (size 1) and are in the compute dtype; ``mean`` is None
    for RMS, ``var``/``rstd`` are None for CENTER and ``var`` holds mean(x²) for RMS.
    """
    dims = tuple(d % x.dim() for d in dims)
    acc = compute_dtype(x.dtype)
    xc = x.to(acc)
    shift, corr, var, rstd = _moments(xc, dims, mode, eps)
    y = _xhat(xc, shift, corr, rstd, mode)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    mean = None if mode == RMS else _mean(shift, corr, stat_dtype(x))
    return y.to(x.dtype), mean, var, rstd


def moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    r"""Biased mean and variance of ``x`` over ``dims`` (reduced dims dropped), as :func:`normalize`
    computes them: μ = shift + c, σ² = mean(d²) − c² with d = x − shift, c = mean(d).

    In the compute dtype (float32 for 16-bit inputs, the input dtype otherwise); no gradient.
    """
    dims = tuple(d % x.dim() for d in dims)
    with torch.no_grad():
        xc = x.to(compute_dtype(x.dtype))
        shift, corr, var, _ = _moments(xc, dims, STANDARD, 0.0)
        return (shift + corr).squeeze(dims), var.squeeze(dims)


def _mean(shift: Tensor, corr: Tensor, dtype: torch.dtype) -> Tensor:
    # The sum is formed in the statistics' dtype so that a float64 mean keeps the correction
    # (a fused backward may use it); shift + corr is NaN where the group holds ±Inf (Inf − Inf),
    # and torch reports the Inf itself.
    shift, corr = shift.detach().to(dtype), corr.detach().to(dtype)
    return torch.where(torch.isinf(shift), shift, shift + corr)


def _normalize_backward(dy, x, weight, dims, eps, mode, mask, wshape=None, add=None):
    """(dx, dγ, dβ) of :func:`normalize`, the statistics recomputed from x (exact, branch-free).

    ``add``: a gradient added to dx before its single rounding to x's dtype (the residual
    branch of add + layer norm)."""
    acc = compute_dtype(x.dtype)
    xc = x.to(acc)
    shift, corr, _, rstd = _moments(xc, dims, mode, eps)
    xhat = _xhat(xc, shift, corr, rstd, mode)
    dy = dy.to(acc)
    g = dy if weight is None else dy * weight.to(acc)
    dx = None
    if mask[0]:
        dx = _input_grad(g, xhat, rstd, dims, mode)
        dx = (dx if add is None else dx + add.to(acc)).to(x.dtype)
    dw = (dy * xhat).sum_to_size(wshape) if mask[1] else None
    db = dy.sum_to_size(wshape) if mask[2] else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# The backend ops (see docs/CONTRACTS.md): each only chooses axes and broadcast shapes.
# --------------------------------------------------------------------------------------------


def _spatial(x: Tensor) -> int:
    """Positions per channel of an (N, C, *) tensor (explicit: reshape(-1) fails when empty)."""
    return math.prod(x.shape[2:])


def _channel_view(t: Tensor | None, ndim: int) -> Tensor | None:
    """(C,) -> (1, C, 1, ..., 1) broadcasting against an ndim-dimensional (N, C, *) tensor."""
    return None if t is None else t.view((1, -1) + (1,) * (ndim - 2))


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.flatten()


def batch_norm(x: Tensor, weight, bias, eps: float, *, center_only: bool = False):
    """Training-mode batch norm: (y, mean, var, rstd), statistics (C,) over N and every position."""
    x3 = x.reshape(x.shape[0], x.shape[1], _spatial(x))
    mode = CENTER if center_only else STANDARD
    y, mean, var, rstd = normalize(x3, (0, 2), _channel_view(weight, 3), _channel_view(bias, 3), eps, mode)
    return _restore(y, x), mean.flatten(), _flat(var), _flat(rstd)


def batch_norm_backward(dy, x, weight, mean, rstd, eps: float, *, center_only: bool = False,
                        mask=(True, True, True)):
    """(dx, dγ (C,), dβ (C,)) of training batch norm; entries not in ``mask`` are None."""
    n, c = x.shape[0], x.shape[1]
    x3, dy3 = x.reshape(n, c, _spatial(x)), dy.reshape(n, c, _spatial(x))
    mode = CENTER if center_only else STANDARD
    dx, dw, db = _normalize_backward(dy3, x3, _channel_view(weight, 3), (0, 2), eps, mode, mask, (1, c, 1))
    return (None if dx is None else _restore(dx, x)), _flat(dw), _flat(db)


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


def _groups(x: Tensor, num_groups: int, t: Tensor | None) -> Tensor | None:
    c = x.shape[1]
    return None if t is None else t.reshape(1, num_groups, c // num_groups, 1)


def group_norm(x: Tensor, num_groups: int, weight, bias, eps: float):
    """Statistics per (sample, group of C/G channels): (y, mean, var, rstd), stats (N, G)."""
    n, c = x.shape[0], x.shape[1]
    x4 = x.reshape(n, num_groups, c // num_groups, _spatial(x))
    y, mean, var, rstd = normalize(x4, (2, 3), _groups(x, num_groups, weight), _groups(x, num_groups, bias), eps)
    return _restore(y, x), mean.view(n, num_groups), var.view(n, num_groups), rstd.view(n, num_groups)


def group_norm_backward(dy, x, weight, mean, rstd, num_groups: int, eps: float, *, mask=(True, True, True)):
    """(dx, dγ (C,), dβ (C,)) of group norm; entries not in ``mask`` are None."""
    n, c = x.shape[0], x.shape[1]
    shape = (n, num_groups, c // num_groups, _spatial(x))
    x4, dy4 = x.reshape(shape), dy.reshape(shape)
    dx, dw, db = _normalize_backward(dy4, x4, _groups(x, num_groups, weight), (2, 3), eps, STANDARD, mask,
                                     (1, num_groups, c // num_groups, 1))
    return (None if dx is None else _restore(dx, x)), _flat(dw), _flat(db)


def _ghost_shape(x: Tensor, virtual_batch_size: int) -> tuple[int, int, int, int]:
    """(k, g, C, S): x's (N, C, *) as k = N / g virtual batches of g samples."""
    n, c = x.shape[0], x.shape[1]
    return n // virtual_batch_size, virtual_batch_size, c, _spatial(x)


def ghost_batch_norm(x: Tensor, virtual_batch_size: int, weight, bias, eps: float):
    """Ghost batch norm: batch norm of each virtual batch of g consecutive samples, (y, mean,
    var, rstd) with statistics (N / g, C) over the virtual batch's samples and positions."""
    k, g, c, s = _ghost_shape(x, virtual_batch_size)
    view = (1, 1, c, 1)
    y, mean, var, rstd = normalize(x.reshape(k, g, c, s), (1, 3), None if weight is None else weight.view(view),
                                   None if bias is None else bias.view(view), eps)
    return _restore(y, x), mean.view(k, c), var.view(k, c), rstd.view(k, c)


def ghost_batch_norm_backward(dy, x, weight, mean, rstd, virtual_batch_size: int, eps: float, *,
                              mask=(True, True, True)):
    """(dx, dγ (C,), dβ (C,)) of ghost batch norm; entries not in ``mask`` are None."""
    shape = _ghost_shape(x, virtual_batch_size)
    c = shape[2]
    dx, dw, db = _normalize_backward(dy.reshape(shape), x.reshape(shape),
                                     None if weight is None else weight.view(1, 1, c, 1), (1, 3), eps,
                                     STANDARD, mask, (1, 1, c, 1))
    return (None if dx is None else _restore(dx, x)), _flat(dw), _flat(db)


def layer_norm(x: Tensor, normalized_ndim: int, weight, bias, eps: float, *, rms: bool = False):
    """Statistics per row over the trailing ``normalized_ndim`` dims: (y, mean, var, rstd)."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    y, mean, var, rstd = normalize(x, dims, weight, bias, eps, RMS if rms else STANDARD)
    lead = x.shape[: x.dim() - normalized_ndim]
    return y, None if mean is None else mean.view(lead), var.view(lead), rstd.view(lead)


def layer_norm_backward(dy, x, weight, mean, rstd, normalized_ndim: int, eps: float, *, rms: bool = False,
                        mask=(True, True, True)):
    """(dx, dγ, dβ) of layer norm (γ/β shaped like the normalized dims)."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    wshape = tuple(x.shape[x.dim() - normalized_ndim:])
    return _normalize_backward(dy, x, weight, dims, eps, RMS if rms else STANDARD, mask, wshape)


def layer_norm_channels(x: Tensor, weight, bias, eps: float):
    """Channels-first layer norm of (N, C, *): statistics over C per (sample, position), (N, *S)."""
    y, mean, var, rstd = normalize(x, (1,), _channel_view(weight, x.dim()), _channel_view(bias, x.dim()), eps)
    return y, mean.squeeze(1), var.squeeze(1), rstd.squeeze(1)


def layer_norm_channels_backward(dy, x, weight, mean, rstd, eps: float, *, mask=(True, True, True)):
    """(dx, dγ (C,), dβ (C,)) of channels-first layer norm."""
    wshape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    dx, dw, db = _normalize_backward(dy, x, _channel_view(weight, x.dim()), (1,), eps, STANDARD, mask, wshape)
    return dx, _flat(dw), _flat(db)


def _restore(y: Tensor, like: Tensor) -> Tensor:
    """Reshape y back to ``like``'s shape keeping channels_last when ``like`` had it."""
    y = y.reshape(like.shape)
    if torch._C._are_functorch_transforms_active():
        # vmap cannot query memory formats ("NYI: querying is_contiguous inside of vmap"); under a
        # functorch transform (the composite path of the operators) the layout is not kept.
        return y
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if like.dim() == (4 if fmt is torch.channels_last else 5):
            if like.is_contiguous(memory_format=fmt) and not like.is_contiguous():
                return y.contiguous(memory_format=fmt)
    return y


def supports(op: str, x: Tensor) -> bool:
    """The reference backend handles every op on every device and floating dtype."""
    return True


# --------------------------------------------------------------------------------------------
# point-wise methods: Dynamic Tanh (DyT) and Dynamic erf (Derf)
# --------------------------------------------------------------------------------------------
# y = γ·f(α·x + s) + β with f = tanh (s = 0) or erf; γ, β of the trailing dims
# (``channels_last=True``) or (C,) on dim 1 (``channels_last=False``). Computed in
# compute_dtype(x) and cast back to x's dtype, as the fused kernels do.

__all__ += ["dynamic_tanh", "dynamic_tanh_backward", "dynamic_erf", "dynamic_erf_backward"]


def _pw_view(t: Tensor | None, x: Tensor, channels_last: bool, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    t = t.to(dtype)
    return t if channels_last else t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _pw_forward(x: Tensor, alpha: Tensor, shift: Tensor | None, weight, bias, channels_last: bool) -> Tensor:
    acc = compute_dtype(x.dtype)
    u = alpha.reshape(()).to(acc) * x.to(acc)
    if shift is None:
        y = torch.tanh(u)
    else:
        y = torch.erf(u + shift.reshape(()).to(acc))
    w = _pw_view(weight, x, channels_last, acc)
    b = _pw_view(bias, x, channels_last, acc)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.to(x.dtype)


def _pw_feature_dims(x: Tensor, weight, bias, channels_last: bool) -> list[int]:
    """The dims dγ and dβ are summed over (all but the parameters' own)."""
    if not channels_last:
        return [0] + list(range(2, x.dim()))
    p = weight if weight is not None else bias
    k = 0 if p is None else p.dim()
    return list(range(x.dim() - k))


def _pw_backward(dy, x, alpha, shift, weight, bias, channels_last: bool, mask):
    """(dx, dα, ds, dγ, dβ) in compute_dtype(x) (dx in x's dtype); None where not in ``mask``
    (mask order: x, α, s, γ, β)."""
    acc = compute_dtype(x.dtype)
    xc, dyc = x.to(acc), dy.to(acc)
    a = alpha.reshape(()).to(acc)
    u = a * xc
    if shift is None:
        act = torch.tanh(u)
        fprime = 1 - act * act
    else:
        u = u + shift.reshape(()).to(acc)
        act = torch.erf(u)
        fprime = (2 / math.sqrt(math.pi)) * torch.exp(-u * u)
    w = _pw_view(weight, x, channels_last, acc)
    g = dyc * fprime if w is None else dyc * w * fprime
    red = _pw_feature_dims(x, weight, bias, channels_last)
    dx = (a * g).to(x.dtype) if mask[0] else None
    dalpha = (g * xc).sum() if mask[1] else None
    dshift = g.sum() if mask[2] else None
    dw = (dyc * act).sum(red) if mask[3] else None
    db = dyc.sum(red) if mask[4] else None
    return dx, dalpha, dshift, dw, db


def dynamic_tanh(x: Tensor, alpha: Tensor, weight, bias, *, channels_last: bool = True) -> Tensor:
    """y = γ·tanh(α·x) + β (plain differentiable torch ops)."""
    return _pw_forward(x, alpha, None, weight, bias, channels_last)


def dynamic_tanh_backward(dy, x, alpha, weight, bias, *, channels_last: bool = True, mask=(True,) * 4):
    """(dx, dα, dγ, dβ) of :func:`dynamic_tanh` (``bias`` only gives dβ's shape)."""
    dx, da, _, dw, db = _pw_backward(dy, x, alpha, None, weight, bias, channels_last,
                                     (mask[0], mask[1], False, mask[2], mask[3]))
    return dx, da, dw, db


def dynamic_erf(x: Tensor, alpha: Tensor, shift: Tensor, weight, bias, *, channels_last: bool = True) -> Tensor:
    """y = γ·erf(α·x + s) + β (plain differentiable torch ops)."""
    return _pw_forward(x, alpha, shift, weight, bias, channels_last)


def dynamic_erf_backward(dy, x, alpha, shift, weight, bias, *, channels_last: bool = True, mask=(True,) * 5):
    """(dx, dα, ds, dγ, dβ) of :func:`dynamic_erf`."""
    return _pw_backward(dy, x, alpha, shift, weight, bias, channels_last, tuple(mask))


# --------------------------------------------------------------------------------------------
# Filter Response Normalization + TLU
# --------------------------------------------------------------------------------------------

__all__ += ["filter_response_norm", "filter_response_norm_backward"]


def filter_response_norm(x: Tensor, weight, bias, tau, eps: float):
    """(y, rstd): ν² = mean_*(x²) per (n, c), rstd = 1/sqrt(ν² + ε), y = max(γ·x·rstd + β, τ)."""
    acc = compute_dtype(x.dtype)
    xc = x.to(acc)
    dims = tuple(range(2, x.dim()))
    rstd = torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps)
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = xc * rstd
    if weight is not None:
        y = y * weight.to(acc).view(view)
    if bias is not None:
        y = y + bias.to(acc).view(view)
    if tau is not None:
        y = torch.maximum(y, tau.to(acc).view(view))
    return y.to(x.dtype), rstd.reshape(x.shape[:2])


def filter_response_norm_backward(dy, x, weight, bias, tau, rstd, eps: float, *, mask=(True,) * 4):
    """(dx, dγ, dβ, dτ) of :func:`filter_response_norm`, hand-derived: torch.maximum's gradient
    (dy to z unless z < τ, to τ unless z > τ, half to each on a tie), dz = dy·k_z,
    dγ = Σ dz·x̂, dβ = Σ dz, dτ = Σ dy·k_τ, dx = r·(dx̂ − x̂·mean_*(dx̂·x̂)) with dx̂ = γ·dz."""
    acc = compute_dtype(x.dtype)
    xc, dyc = x.to(acc), dy.to(acc)
    dims = tuple(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    r = rstd.to(acc).reshape(x.shape[:2] + (1,) * (x.dim() - 2))
    xh = xc * r
    w = None if weight is None else weight.to(acc).view(view)
    z = xh if w is None else xh * w
    if bias is not None:
        z = z + bias.to(acc).view(view)
    if tau is None:
        dz, dt = dyc, None
    else:
        t = tau.to(acc).view(view)
        half = torch.where(z == t, 0.5, 1.0).to(acc)
        dz = (dyc * half).masked_fill(z < t, 0)
        dt = (dyc * half).masked_fill(z > t, 0)
    red = [0, *dims]
    dxh = dz if w is None else dz * w
    dx = (r * (dxh - xh * (dxh * xh).mean(dims, keepdim=True))).to(x.dtype) if mask[0] else None
    dw = (dz * xh).sum(red) if mask[1] else None
    db = dz.sum(red) if mask[2] else None
    dtau = dt.sum(red) if (mask[3] and dt is not None) else None
    return dx, dw, db, dtau


# --------------------------------------------------------------------------------------------
# EvoNorm-S0
# --------------------------------------------------------------------------------------------

__all__ += ["evonorm_s0", "evonorm_s0_backward"]


def _s0_group_stats(xc: Tensor, groups: int, eps: float):
    """(mean, rstd) per (sample, group), each broadcast back to xc's shape, and the (N, G) ones.
    The moments are the core's (shifted two-pass, rescaled against overflow); rstd is
    differentiable, the mean is not (the composite differentiates through rstd only)."""
    n, c = xc.shape[0], xc.shape[1]
    m = (c // groups) * _spatial(xc)
    shift, corr, _, rstd = _moments(xc.reshape(n, groups, m), (2,), STANDARD, eps)
    mean = _mean(shift, corr, xc.dtype)

    def back(t: Tensor) -> Tensor:
        return t.expand(n, groups, m).reshape(xc.shape)

    return back(mean), back(rstd), mean.reshape(n, groups), rstd.reshape(n, groups)


def evonorm_s0(x: Tensor, weight, bias, v, groups: int, eps: float):
    """(y, mean, rstd): y = γ·x·σ(v·x)·rstd + β, rstd = 1/sqrt(σ²_ng + ε) per (sample, group)
    of ``groups`` consecutive-channel groups; ``v=None``: no gate. Plain differentiable torch ops."""
    acc = compute_dtype(x.dtype)
    xc = x.to(acc)
    _, r, mean, rstd = _s0_group_stats(xc, groups, eps)
    z = xc if v is None else xc * torch.sigmoid(_channel_view(v.to(acc), x.dim()) * xc)
    y = z * r
    if weight is not None:
        y = y * _channel_view(weight.to(acc), x.dim())
    if bias is not None:
        y = y + _channel_view(bias.to(acc), x.dim())
    return y.to(x.dtype), mean, rstd


def evonorm_s0_backward(dy, x, weight, bias, v, mean, rstd, groups: int, eps: float, *, mask=(True,) * 4):
    """(dx, dγ, dβ, dv) of :func:`evonorm_s0`, hand-derived (``mean``/``rstd`` recomputed from x):
    with z = x·σ, h = γ·dy and A = Σ_group h·z, dx = h·r·(σ + v·x·σ(1 − σ)) − A·r³/M·(x − μ),
    dγ = Σ dy·z·r, dβ = Σ dy, dv = Σ h·r·x²·σ(1 − σ) (M values per group)."""
    acc = compute_dtype(x.dtype)
    xc, dyc = x.to(acc), dy.to(acc)
    n, c = x.shape[0], x.shape[1]
    m = (c // groups) * _spatial(x)
    with torch.no_grad():
        mu, r, _, _ = _s0_group_stats(xc, groups, eps)
    red = [0] + list(range(2, x.dim()))
    h = dyc if weight is None else dyc * _channel_view(weight.to(acc), x.dim())
    if v is None:
        z, dzdx, ds = xc, torch.ones_like(xc), None
    else:
        vv = _channel_view(v.to(acc), x.dim())
        sg = torch.sigmoid(vv * xc)
        ds = sg * (1 - sg)
        z, dzdx = xc * sg, sg + vv * xc * ds
    dx = None
    if mask[0]:
        a = (h * z).reshape(n, groups, m).sum(-1, keepdim=True).expand(n, groups, m).reshape(x.shape)
        dx = (h * r * dzdx - a * r.pow(3) / max(m, 1) * (xc - mu)).to(x.dtype)
    dw = (dyc * z * r).sum(red) if mask[1] else None
    db = dyc.sum(red) if mask[2] else None
    dv = (h * r * xc * xc * ds).sum(red) if (mask[3] and ds is not None) else None
    return dx, dw, db, dv


# --------------------------------------------------------------------------------------------
# EvoNorm-B0
# --------------------------------------------------------------------------------------------

__all__ += ["evonorm_b0", "evonorm_b0_backward"]


def _b0_parts(xc: Tensor, running_var, eps: float):
    """(σ_b broadcastable, σ_i keepdim, mean_b, var_b, mean_i, var_i): the core's moments;
    σ_b from ``running_var`` when given (then mean_b is empty)."""
    n, c = xc.shape[0], xc.shape[1]
    sp = tuple(range(2, xc.dim()))
    shift, corr, var_i, _ = _moments(xc, sp, STANDARD, 0.0)
    mean_i = _mean(shift, corr, xc.dtype)
    if running_var is None:
        bshift, bcorr, var_b, _ = _moments(xc, (0,) + sp, STANDARD, 0.0)
        mean_b = _mean(bshift, bcorr, xc.dtype).reshape(c)
    else:
        var_b = running_var.to(xc.dtype).reshape((1, c) + (1,) * len(sp))
        mean_b = xc.new_zeros((0,))
    sigma_b = torch.sqrt(var_b + eps)
    sigma_i = torch.sqrt(var_i + eps)
    return sigma_b, sigma_i, mean_b, var_b.reshape(c), mean_i.reshape(n, c), var_i.reshape(n, c)


def evonorm_b0(x: Tensor, weight, bias, v, running_var, eps: float):
    """(y, mean_b, var_b, mean_i, var_i): y = γ·x / max(sqrt(σ²_b + ε), v·x + sqrt(σ²_i + ε)) + β,
    σ²_b the biased batch variance per channel (``running_var`` when given), σ²_i per (sample,
    channel). Plain differentiable torch ops."""
    acc = compute_dtype(x.dtype)
    xc = x.to(acc)
    sigma_b, sigma_i, mean_b, var_b, mean_i, var_i = _b0_parts(xc, running_var, eps)
    right = sigma_i if v is None else _channel_view(v.to(acc), x.dim()) * xc + sigma_i
    y = xc / torch.maximum(sigma_b, right)
    if weight is not None:
        y = y * _channel_view(weight.to(acc), x.dim())
    if bias is not None:
        y = y + _channel_view(bias.to(acc), x.dim())
    return y.to(x.dtype), mean_b.detach(), var_b.detach(), mean_i, var_i.detach()


def evonorm_b0_backward(dy, x, weight, bias, v, mean_b, var_b, mean_i, var_i, batch: bool, eps: float, *,
                        mask=(True,) * 4):
    """(dx, dγ, dβ, dv) of :func:`evonorm_b0`, hand-derived (statistics recomputed from x;
    ``batch=False``: σ²_b = ``var_b`` is a constant). With D = max(L, R), L = σ_b,
    R = v·x + σ_i, h = γ·dy, torch.maximum's gradient k_R, k_L (½ each on a tie),
    g = −h·x/D²: dx = h/D + v·k_R·g + Σ_s k_R·g/(σ_i·S)·(x − μ_i) [+ Σ_{n,s} k_L·g/(σ_b·N·S)·(x − μ_b)],
    dv = Σ k_R·g·x, dγ = Σ dy·x/D, dβ = Σ dy."""
    acc = compute_dtype(x.dtype)
    xc, dyc = x.to(acc), dy.to(acc)
    n, c = x.shape[0], x.shape[1]
    s = _spatial(x)
    sp = tuple(range(2, x.dim()))
    red = [0, *sp]
    sigma_b, sigma_i, _, _, _, _ = _b0_parts(xc, None if batch else var_b, eps)
    mu_i = xc.mean(sp, keepdim=True)
    right = sigma_i if v is None else _channel_view(v.to(acc), x.dim()) * xc + sigma_i
    left = sigma_b.expand_as(xc)
    den = torch.maximum(left, right)
    half = torch.where(left == right, 0.5, 1.0).to(acc)
    kr = half.masked_fill(left > right, 0)
    kl = half.masked_fill(left < right, 0)
    h = dyc if weight is None else dyc * _channel_view(weight.to(acc), x.dim())
    gd = -h * xc / (den * den)
    dx = None
    if mask[0]:
        dx = h / den + (xc - mu_i) * (gd * kr).sum(sp, keepdim=True) / (sigma_i * max(s, 1))
        if v is not None:
            dx = dx + _channel_view(v.to(acc), x.dim()) * kr * gd
        if batch:
            mu_b = xc.mean(red, keepdim=True)
            dx = dx + (xc - mu_b) * (gd * kl).sum(red, keepdim=True) / (sigma_b * max(n * s, 1))
        dx = dx.to(x.dtype)
    dw = (dyc * xc / den).sum(red) if mask[1] else None
    db = dyc.sum(red) if mask[2] else None
    dv = (gd * kr * xc).sum(red) if (mask[3] and v is not None) else None
    return dx, dw, db, dv

# Fused variants: residual-add + layer/RMS norm, group norm + SiLU, batch norm + ReLU
# --------------------------------------------------------------------------------------------
# Each is the composition of the routines above, the activation applied in the compute dtype
# before the single rounding to x's dtype (what a fused kernel does; torch's two-op composition
# rounds the normalized value once more in 16 bits).

__all__ += ["add_layer_norm", "add_layer_norm_backward", "group_norm_silu", "group_norm_silu_backward",
            "batch_norm_relu", "batch_norm_relu_backward", "batch_norm_relu_eval", "silu_backward"]


def add_layer_norm(x: Tensor, residual: Tensor, normalized_ndim: int, weight, bias, eps: float, *,
                   rms: bool = False):
    """s = x + residual (in x's dtype, as torch's ``x + residual``), y = LN or RMS norm of s.

    Returns (y, s, mean, var, rstd) with the statistics of :func:`layer_norm` on s."""
    s = x + residual
    y, mean, var, rstd = layer_norm(s, normalized_ndim, weight, bias, eps, rms=rms)
    return y, s, mean, var, rstd


def add_layer_norm_backward(dy, ds, s, weight, mean, rstd, normalized_ndim: int, eps: float, *,
                            rms: bool = False, mask=(True, True, True)):
    """(dsum, dγ, dβ): dsum = ∂L/∂s through y plus ``ds`` (None: s unused), the gradient of both
    x and the residual."""
    dims = tuple(range(s.dim() - normalized_ndim, s.dim()))
    wshape = tuple(s.shape[s.dim() - normalized_ndim:])
    return _normalize_backward(dy, s, weight, dims, eps, RMS if rms else STANDARD, mask, wshape, add=ds)


def silu_backward(dy: Tensor, z: Tensor) -> Tensor:
    """∂L/∂z of y = silu(z) = z·σ(z): dy · σ(z) · (1 + z · (1 − σ(z)))."""
    sig = torch.sigmoid(z)
    return dy * sig * (1 + z * (1 - sig))


def _gn_pre(x: Tensor, num_groups: int, weight, bias, eps: float):
    """z = GN(x) in the compute dtype, shaped (N, G, C/G, S), and the statistics."""
    n, c = x.shape[0], x.shape[1]
    x4 = x.reshape(n, num_groups, c // num_groups, _spatial(x)).to(compute_dtype(x.dtype))
    return normalize(x4, (2, 3), _groups(x, num_groups, weight), _groups(x, num_groups, bias), eps)


def group_norm_silu(x: Tensor, num_groups: int, weight, bias, eps: float):
    """y = silu(group_norm(x)): (y, mean, var, rstd), statistics (N, G) as :func:`group_norm`."""
    n = x.shape[0]
    z, mean, var, rstd = _gn_pre(x, num_groups, weight, bias, eps)
    y = torch.nn.functional.silu(z).to(x.dtype)
    return _restore(y, x), mean.view(n, num_groups), var.view(n, num_groups), rstd.view(n, num_groups)


def group_norm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups: int, eps: float, *,
                             mask=(True, True, True)):
    """(dx, dγ, dβ): dz = silu'(z)·dy with z = GN(x) recomputed (β is needed for z), then
    group norm's backward of dz."""
    n, c = x.shape[0], x.shape[1]
    shape = (n, num_groups, c // num_groups, _spatial(x))
    acc = compute_dtype(x.dtype)
    z = _gn_pre(x, num_groups, weight, bias, eps)[0]
    dz = silu_backward(dy.reshape(shape).to(acc), z)
    x4 = x.reshape(shape).to(acc)
    dx, dw, db = _normalize_backward(dz, x4, _groups(x, num_groups, weight), (2, 3), eps, STANDARD, mask,
                                     (1, num_groups, c // num_groups, 1))
    return (None if dx is None else _restore(dx.to(x.dtype), x)), _flat(dw), _flat(db)


def _bn_pre(x: Tensor, weight, bias, eps: float):
    x3 = x.reshape(x.shape[0], x.shape[1], _spatial(x)).to(compute_dtype(x.dtype))
    return normalize(x3, (0, 2), _channel_view(weight, 3), _channel_view(bias, 3), eps, STANDARD)


def batch_norm_relu(x: Tensor, weight, bias, eps: float):
    """y = relu(batch_norm(x)) in training: (y, mean, var, rstd), statistics (C,)."""
    z, mean, var, rstd = _bn_pre(x, weight, bias, eps)
    return _restore(torch.relu(z).to(x.dtype), x), mean.flatten(), _flat(var), _flat(rstd)


def relu_mask(dy: Tensor, y: Tensor) -> Tensor:
    """∂L/∂z of y = relu(z) from the output, as torch's threshold_backward: 0 where y ≤ 0."""
    return torch.where(y <= 0, torch.zeros((), dtype=dy.dtype, device=dy.device), dy)


def batch_norm_relu_backward(dy, y, x, weight, mean, rstd, eps: float, *, mask=(True, True, True)):
    """(dx, dγ, dβ): dz = dy where y > 0 (else 0), then batch norm's backward of dz."""
    return batch_norm_backward(relu_mask(dy, y), x, weight, mean, rstd, eps, mask=mask)


def batch_norm_relu_eval(x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float):
    """y = relu(γ·(x − μ)/sqrt(σ² + ε) + β) with given statistics."""
    acc = compute_dtype(x.dtype)
    return torch.relu(batch_norm_eval(x.to(acc), mean, var, weight, bias, eps)).to(x.dtype)
