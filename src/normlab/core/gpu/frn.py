"""Filter Response Normalization + TLU on the GPU: y = max(γ·x·rstd + β, τ), rstd per (n, c).

ν² = mean over positions of x² is the RMS statistics of instance norm's geometry (group norm with
G = C), computed by ``kernels.stats_partial``/``stats_finalize`` (so |x| ≈ 1e30 does not overflow
the squares). The TLU's gradient follows torch.maximum: dy goes to z = γ·x̂ + β where z > τ, to τ
where z < τ, half to each on a tie. Backward: per (n, c) B = mean(dx̂·x̂) with dx̂ = γ·dz, then
dx = rstd·(dx̂ − x̂·B); per channel Σdz·x̂ (dγ), Σdz (dβ), Σdy·(1 − k) (dτ), two-stage.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from normlab.core.gpu import geometry
from normlab.core.gpu import kernels as K
from normlab.core.gpu.kernels import _aux, _offsets
from normlab.core.gpu.norms import FINAL_BLOCK, _cdiv, _f32, _param, canonical, same_layout


@triton.jit
def _share(z, tau):
    """k = ∂max(z, τ)/∂z as torch.maximum: 1 above τ, ½ on a tie, 0 below."""
    return tl.where(z > tau, 1.0, tl.where(z == tau, 0.5, 0.0))


@triton.jit
def frn_apply(X, Y, RSTD, W, B, TAU, T, R, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TAU: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    t = tl.program_id(0) * BG + tl.arange(0, BG)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    tmask = t < T
    mask = tmask[:, None] & (r < R)[None, :]
    off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
    a = _aux(t, r, G2, R2, ag1, ag2, ar1, ar2)
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    z = x * tl.load(RSTD + t, mask=tmask, other=1.0)[:, None]
    if HAS_W:
        z = z * tl.load(W + a, mask=mask, other=1.0).to(tl.float32)
    if HAS_B:
        z = z + tl.load(B + a, mask=mask, other=0.0).to(tl.float32)
    if HAS_TAU:
        tau = tl.load(TAU + a, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(z != z, z, tl.where(z < tau, tau, z))  # max, NaN propagated as torch.maximum
    tl.store(Y + off, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dz(x, dy, rs, a, mask, W, B, TAU, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TAU: tl.constexpr):
    """(x̂, dz, k): x̂ = x·rstd, z = γ·x̂ + β, dz = k·dy."""
    xh = x * rs
    z = xh
    if HAS_W:
        z = z * tl.load(W + a, mask=mask, other=1.0).to(tl.float32)
    if HAS_B:
        z = z + tl.load(B + a, mask=mask, other=0.0).to(tl.float32)
    if HAS_TAU:
        k = _share(z, tl.load(TAU + a, mask=mask, other=0.0).to(tl.float32))
    else:
        k = tl.full(z.shape, 1.0, tl.float32)
    return xh, dy * k, k


@triton.jit
def frn_backward_partial(X, DY, RSTD, W, B, TAU, PGX, T, R, CH, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TAU: tl.constexpr,
                         BG: tl.constexpr, BR: tl.constexpr):
    """Per (n, c) and chunk: Σ dx̂·x̂ (dx̂ = γ·dz)."""
    t = tl.program_id(0) * BG + tl.arange(0, BG)
    j = tl.program_id(1)
    tmask = t < T
    lo = j * CH
    hi = tl.minimum(lo + CH, R)
    rs = tl.load(RSTD + t, mask=tmask, other=1.0)
    acc = tl.zeros([BG], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        mask = tmask[:, None] & (r < hi)[None, :]
        off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
        a = _aux(t, r, G2, R2, ag1, ag2, ar1, ar2)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        xh, dz, k = _dz(x, dy, rs[:, None], a, mask, W, B, TAU, HAS_W, HAS_B, HAS_TAU)
        if HAS_W:
            dz = dz * tl.load(W + a, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(mask, dz * xh, 0.0), axis=1)
    tl.store(PGX + j * T + t, acc, mask=tmask)


@triton.jit
def frn_input_grad(X, DY, DX, RSTD, CB, W, B, TAU, T, R, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TAU: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    """dx = rstd·(dx̂ − x̂·B), B = mean(dx̂·x̂) per (n, c)."""
    t = tl.program_id(0) * BG + tl.arange(0, BG)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    tmask = t < T
    mask = tmask[:, None] & (r < R)[None, :]
    off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
    a = _aux(t, r, G2, R2, ag1, ag2, ar1, ar2)
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    rs = tl.load(RSTD + t, mask=tmask, other=1.0)[:, None]
    xh, dz, k = _dz(x, dy, rs, a, mask, W, B, TAU, HAS_W, HAS_B, HAS_TAU)
    if HAS_W:
        dz = dz * tl.load(W + a, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(CB + t, mask=tmask, other=0.0)[:, None]
    tl.store(DX + off, (rs * (dz - xh * b)).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def frn_param_partial(X, DY, RSTD, W, B, TAU, PW, PB, PT, P, R, CH, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TAU: tl.constexpr,
                      BG: tl.constexpr, BR: tl.constexpr):
    """Per channel p and chunk: Σdz·x̂, Σdz, Σdy·(1 − k); the element's (n, c) is aux."""
    p = tl.program_id(0) * BG + tl.arange(0, BG)
    j = tl.program_id(1)
    pmask = p < P
    lo = j * CH
    hi = tl.minimum(lo + CH, R)
    sw = tl.zeros([BG], dtype=tl.float32)
    sb = tl.zeros([BG], dtype=tl.float32)
    st = tl.zeros([BG], dtype=tl.float32)
    pp = tl.broadcast_to(p[:, None], [BG, BR])
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        mask = pmask[:, None] & (r < hi)[None, :]
        off = _offsets(p, r, G2, sg1, sg2, R2, sr1, sr2)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        rs = tl.load(RSTD + _aux(p, r, G2, R2, ag1, ag2, ar1, ar2), mask=mask, other=1.0)
        xh, dz, k = _dz(x, dy, rs, pp, mask, W, B, TAU, HAS_W, HAS_B, HAS_TAU)
        sw += tl.sum(tl.where(mask, dz * xh, 0.0), axis=1)
        sb += tl.sum(tl.where(mask, dz, 0.0), axis=1)
        st += tl.sum(tl.where(mask, dy - dz, 0.0), axis=1)
    tl.store(PW + j * P + p, sw, mask=pmask)
    tl.store(PB + j * P + p, sb, mask=pmask)
    tl.store(PT + j * P + p, st, mask=pmask)


def _geo(x):
    x, cl = canonical(x)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    stat, param = geometry.group_norm(n, c, s, c, cl)
    return x, cl, stat, param


def _flags(weight, bias, tau):
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_TAU=tau is not None)


def forward(x, weight, bias, tau, eps):
    x, _, stat, _ = _geo(x)
    T, R = stat.T, stat.R
    bg, br = stat.tile()
    chunks, ch = stat.split(bg, br)
    f32 = dict(dtype=torch.float32, device=x.device)
    pm, ps, pl, pq = (torch.empty((chunks, T), **f32) for _ in range(4))
    K.stats_partial[(_cdiv(T, bg), chunks)](x, pm, ps, pl, pq, T, R, ch, *stat.addr, MODE=K.RMS, BG=bg, BR=br)
    shift, corr, mean, var, rstd = (torch.empty(T, **f32) for _ in range(5))
    K.stats_finalize[(_cdiv(T, FINAL_BLOCK),)](pm, ps, pl, pq, shift, corr, mean, var, rstd, T, R, ch, chunks,
                                               float(eps), MODE=K.RMS, BLOCK=FINAL_BLOCK)
    y = torch.empty_like(x)
    frn_apply[(_cdiv(T, bg), _cdiv(R, br))](x, y, rstd, _param(weight, x), _param(bias, x), _param(tau, x), T, R,
                                           *stat.addr, *stat.aux, **_flags(weight, bias, tau), BG=bg, BR=br)
    return y, rstd.view(x.shape[0], x.shape[1])


def backward(dy, x, weight, bias, tau, rstd, eps, mask):
    """(dx, dγ, dβ, dτ), None where not in ``mask`` (or the parameter is absent)."""
    x, cl, stat, param = _geo(x)
    dy = same_layout(dy, cl)
    T, R = stat.T, stat.R
    f32 = dict(dtype=torch.float32, device=x.device)
    rs = _f32(rstd, T, x, 1.0)
    w, b, t = _param(weight, x), _param(bias, x), _param(tau, x)
    flags = _flags(weight, bias, tau)
    dx = None
    if mask[0]:
        bg, br = stat.tile()
        chunks, ch = stat.split(bg, br)
        part = torch.empty((chunks, T), **f32)
        frn_backward_partial[(_cdiv(T, bg), chunks)](x, dy, rs, w, b, t, part, T, R, ch, *stat.addr, *stat.aux,
                                                     **flags, BG=bg, BR=br)
        cb = torch.empty(T, **f32)
        K.sum_partials[(_cdiv(T, FINAL_BLOCK),)](part, cb, T, chunks, BLOCK=FINAL_BLOCK)
        cb = cb / R  # B = mean over positions (a T-element tensor op)
        dx = torch.empty_like(x)
        frn_input_grad[(_cdiv(T, bg), _cdiv(R, br))](x, dy, dx, rs, cb, w, b, t, T, R, *stat.addr, *stat.aux,
                                                    **flags, BG=bg, BR=br)
    want = (bool(mask[1]) and weight is not None, bool(mask[2]) and bias is not None,
            bool(mask[3]) and tau is not None)
    sums = [None, None, None]
    if any(want):
        P = param.T
        pbg, pbr = param.tile()
        chunks, ch = param.split(pbg, pbr)
        parts = [torch.empty((chunks, P), **f32) for _ in range(3)]
        frn_param_partial[(_cdiv(P, pbg), chunks)](x, dy, rs, w, b, t, *parts, P, param.R, ch, *param.addr,
                                                   *param.aux, **flags, BG=pbg, BR=pbr)
        for i, (part, wanted) in enumerate(zip(parts, want)):
            if wanted:
                sums[i] = torch.empty(P, **f32)
                K.sum_partials[(_cdiv(P, FINAL_BLOCK),)](part, sums[i], P, chunks, BLOCK=FINAL_BLOCK)
    return (dx, *sums)
