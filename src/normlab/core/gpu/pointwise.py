"""Dynamic Tanh and Dynamic erf on the GPU: y = γ·f(α·x + s) + β, f = tanh (s = 0) or erf.

The tensor is seen through a geometry (see ``geometry``) whose groups are the entries of γ/β:
for ``channels_last=True`` (γ, β of the trailing dims) the (rows, P) view of contiguous x, for
``channels_last=False`` (γ, β of dim 1) batch norm's per-channel geometry over NCHW or NHWC
memory. The forward is one point-wise pass; the backward is one pass that writes dx = α·g
(g = dy·γ·f'(u)) and per (chunk, parameter) partials of Σg·x (dα), Σg (ds), Σdy·f(u) (dγ),
Σdy (dβ), merged in a fixed order by ``kernels.sum_partials``. float32 arithmetic throughout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from normlab.core import reference
from normlab.core.gpu import geometry
from normlab.core.gpu.geometry import Coord, Geo
from normlab.core.gpu.kernels import _offsets, sum_partials
from normlab.core.gpu.norms import FINAL_BLOCK, _cdiv, _param, canonical


@triton.jit
def _tanh(u):
    """tanh in float32 without cancellation: a Taylor polynomial below |u| = 1/8 (truncation
    < 1e-11 relative), (1 − e^{−2|u|}) / (1 + e^{−2|u|}) above (e^{−2|u|} ≤ 0.78 there, so the
    subtraction loses < 2 bits); measured in the interpreter over [−10, 10]: ≤ 6.5 ulp, 5.7e-7
    relative, worst just above the switch. NaN and ±Inf as torch. (libdevice.tanh would be
    exact to 1-2 ulp on the GPU but does not run in Triton's interpreter.)"""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    u2 = u * u
    near = a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
    r = tl.where(a < 0.125, near, far)
    return tl.where(u < 0.0, -r, r)


@triton.jit
def pw_forward(X, Y, ALPHA, SHIFT, W, B, T, R, G2, sg1, sg2, R2, sr1, sr2, ERF: tl.constexpr,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    t = tl.program_id(0) * BG + tl.arange(0, BG)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    tmask = t < T
    mask = tmask[:, None] & (r < R)[None, :]
    off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(ALPHA).to(tl.float32) * x
    if ERF:
        y = tl.erf(u + tl.load(SHIFT).to(tl.float32))
    else:
        y = _tanh(u)
    if HAS_W:
        y = y * tl.load(W + t, mask=tmask, other=1.0).to(tl.float32)[:, None]
    if HAS_B:
        y = y + tl.load(B + t, mask=tmask, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def pw_backward(X, DY, DX, ALPHA, SHIFT, W, PA, PS, PW, PB, T, R, CH, G2, sg1, sg2, R2, sr1, sr2,
                ERF: tl.constexpr, HAS_W: tl.constexpr, NEED_DX: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.program_id(1)
    t = pid * BG + tl.arange(0, BG)
    tmask = t < T
    lo = j * CH
    hi = tl.minimum(lo + CH, R)
    a = tl.load(ALPHA).to(tl.float32)
    if HAS_W:
        w = tl.load(W + t, mask=tmask, other=0.0).to(tl.float32)
    sa = tl.zeros([BG], dtype=tl.float32)
    ss = tl.zeros([BG], dtype=tl.float32)
    sw = tl.zeros([BG], dtype=tl.float32)
    sb = tl.zeros([BG], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        mask = tmask[:, None] & (r < hi)[None, :]
        off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        u = a * x
        if ERF:
            u = u + tl.load(SHIFT).to(tl.float32)
            act = tl.erf(u)
            fp = 1.1283791670955126 * tl.exp(-u * u)  # 2/sqrt(pi)·e^{−u²}
        else:
            act = _tanh(u)
            fp = 1.0 - act * act
        g = dy * fp
        if HAS_W:
            g = g * w[:, None]
        g = tl.where(mask, g, 0.0)
        if NEED_DX:
            tl.store(DX + off, (a * g).to(DX.dtype.element_ty), mask=mask)
        sa += tl.sum(g * x, axis=1)
        ss += tl.sum(g, axis=1)
        sw += tl.sum(tl.where(mask, dy * act, 0.0), axis=1)
        sb += tl.sum(dy, axis=1)
    out = j * T + t
    tl.store(PA + out, sa, mask=tmask)
    tl.store(PS + out, ss, mask=tmask)
    tl.store(PW + out, sw, mask=tmask)
    tl.store(PB + out, sb, mask=tmask)


def _geometry(x, weight, bias, channels_last: bool):
    """(x in the memory the geometry describes, the geometry)."""
    p = weight if weight is not None else bias
    if channels_last:
        x = x.contiguous()
        k = 1 if p is None else p.numel()
        return x, Geo.of(Coord(k, 1), Coord(1, 0), Coord(x.numel() // k, k), Coord(1, 0))
    x, cl = canonical(x)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if p is None:  # no parameters: one group of every element, in memory order
        return x, Geo.of(Coord(1, 0), Coord(1, 0), Coord(x.numel(), 1), Coord(1, 0))
    return x, geometry.batch_norm(n, c, s, cl)[0]


def forward(x, alpha, shift, weight, bias, channels_last: bool):
    if not channels_last and x.dim() < 2:
        return reference._pw_forward(x, alpha, shift, weight, bias, channels_last)
    x, geo = _geometry(x, weight, bias, channels_last)
    bg, br = geo.tile()
    y = torch.empty_like(x)
    erf = shift is not None
    pw_forward[(_cdiv(geo.T, bg), _cdiv(geo.R, br))](
        x, y, alpha.detach().reshape(1), (shift if erf else alpha).detach().reshape(1), _param(weight, x),
        _param(bias, x), geo.T, geo.R, *geo.addr, ERF=erf, HAS_W=weight is not None, HAS_B=bias is not None,
        BG=bg, BR=br)
    return y


def backward(dy, x, alpha, shift, weight, bias, channels_last: bool, mask):
    """(dx, dα, ds, dγ, dβ), mask over the same five (ds ignored for tanh)."""
    if not channels_last and x.dim() < 2:
        return reference._pw_backward(dy, x, alpha, shift, weight, bias, channels_last, mask)
    x, geo = _geometry(x, weight, bias, channels_last)
    if channels_last:
        dy = dy.contiguous()
    elif dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    T, R = geo.T, geo.R
    bg, br = geo.tile()
    chunks, ch = geo.split(bg, br)
    f32 = dict(dtype=torch.float32, device=x.device)
    parts = [torch.empty((chunks, T), **f32) for _ in range(4)]
    dx = torch.empty_like(x) if mask[0] else x
    erf = shift is not None
    pw_backward[(_cdiv(T, bg), chunks)](
        x, dy, dx, alpha.detach().reshape(1), (shift if erf else alpha).detach().reshape(1), _param(weight, x),
        *parts, T, R, ch, *geo.addr, ERF=erf, HAS_W=weight is not None, NEED_DX=bool(mask[0]), BG=bg, BR=br)

    def total(part, n, count):
        out = torch.empty(n, **f32)
        sum_partials[(_cdiv(n, FINAL_BLOCK),)](part, out, n, count, BLOCK=FINAL_BLOCK)
        return out

    da = total(parts[0], 1, chunks * T).reshape(()) if mask[1] else None
    ds = total(parts[1], 1, chunks * T).reshape(()) if (mask[2] and erf) else None
    dw = total(parts[2], T, chunks) if (mask[3] and weight is not None) else None
    db = total(parts[3], T, chunks) if (mask[4] and bias is not None) else None
    return (dx if mask[0] else None), da, ds, dw, db
