r"""Fused EvoNorm-S0 kernels (Liu, Brock, Simonyan & Le 2020): per-(sample, group) statistics
plus a point-wise gate, one kernel forward and one backward.

.. math::

    y = \gamma_c\, r_{ng}\, z + \beta_c,\qquad z = x\,\sigma(v_c x),\qquad
    r_{ng} = 1/\sqrt{s^2_{ng} + \epsilon}

with s²_ng the biased variance over the C/G channels of group g of sample n and every position
(``gate=False``: z = x, no v). Backward, with M = (C/G)·positions, A_ng = Σ_{group} dy·γ_c·z:

.. math::

    dx = \gamma_c r\, dy\,\big(\sigma + v x \sigma(1-\sigma)\big) - \frac{A r^3}{M}(x - \mu_{ng}),\quad
    d\gamma_c = \textstyle\sum r\, dy\, z,\quad d\beta_c = \sum dy,\quad
    dv_c = \sum \gamma_c r\, dy\, x^2 \sigma(1-\sigma)

Work items and passes over memory (each item's second pass reads it from cache):

* contiguous (N, C, \*S): one item per (n, g), a contiguous run of (C/G)·S values: forward =
  shifted statistics (``shared.shifted_sums``) then y; backward = the per-channel sums and A,
  then dx;
* channels-last (N, S, C): one item per sample n (as FRN's ``frn_*_cl``): per-channel float64
  shifted sums over the S rows (shift = the sample's first row), merged per group with Chan's
  formula; the output pass runs along the contiguous channels.

dγ, dβ, dv: per-chunk float64 partial rows (``prange`` chunks), added once by the launcher: no
atomics, the result depends only on the number of chunks. Statistics are float64; the mean is
split as m_hi + lo (``shared``) where the backward subtracts it.

σ: in float32, σ(u) = ½ + ½·tanh(u/2) with the vectorizable rational tanh of ``pointwise``
(numba has no vector math library here, and a libm ``exp`` per element costs more than the
whole pass; ≤ 2e-7 absolute); float64: 1/(1 + exp(−u)) with libm (exact, for gradcheck). NaN
propagates; a float64 input whose squares overflow (|x| ≳ 1e154) is recomputed by the reference.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from numba import njit, prange
from numba.extending import overload
from torch import Tensor

from normlab.core.cpu.jit import CACHE, FASTMATH, _cache_dir_override, _stamp_with_common
from normlab.core.cpu.params import NP_DTYPE as NP_DT
from normlab.core.cpu.params import f64, param
from normlab.core.cpu.plan import is_channels_last
from normlab.core.cpu.pointwise import _is_f32, tanh_f
from normlab.core.cpu.pool import pool
from normlab.core.cpu.shared import mean_var, overflow_bound, shifted_sums, split_mean
from normlab.core.cpu.threads import launch, threads

__all__ = ["EVONORM_OPS", "b0_dx", "b0_dx_cl", "b0_fwd", "b0_fwd_cl", "b0_red", "b0_red_cl", "b0_stats",
           "b0_stats_cl", "evonorm_b0", "evonorm_b0_backward", "evonorm_s0", "evonorm_s0_backward", "s0_bwd", "s0_bwd_cl", "s0_fwd",
           "s0_fwd_cl", "sigmoid_f", "warmup"]

#: the backend ops this family implements
EVONORM_OPS = ("evonorm_s0", "evonorm_b0")

# The numpy error model (x/0 is IEEE, no ZeroDivisionError check) lets LLVM vectorize the
# rational tanh inside σ, as in ``pointwise``.
_JIT = {"fastmath": FASTMATH, "error_model": "numpy"}

# σ in float32 inlines ``pointwise.tanh_f``: the cache must also depend on that file.
_POINTWISE_STAMP = hashlib.sha256(
    open(os.path.join(os.path.dirname(__file__), "pointwise.py"), "rb").read()).hexdigest()


def kernel(fn):
    """A parallel kernel with the numpy error model; cache stamped with jit, shared, pointwise."""
    with _cache_dir_override():
        disp = njit(parallel=True, cache=CACHE, nogil=True, **_JIT)(fn)
    _stamp_with_common(disp)
    try:
        cache_file = disp._cache._cache_file
        cache_file._source_stamp = (cache_file._source_stamp, _POINTWISE_STAMP)
    except AttributeError:  # pragma: no cover - caching disabled or numba internals moved
        pass
    return disp


def sigmoid_f(u):
    """σ(u) = 1/(1 + e^{−u}) in the kernels' precision (see the module docstring)."""
    return 1.0 / (1.0 + np.exp(-u))


@overload(sigmoid_f, jit_options=_JIT)
def _sigmoid_ov(u):
    if not _is_f32(u):
        return lambda u: 1.0 / (1.0 + np.exp(-u))
    half = np.float32(0.5)

    def impl(u):
        return half + half * tanh_f(half * u)

    return impl


# --------------------------------------------------------------------------------------------
# contiguous (N, C, *S): items (n, g), x as (N·G, C/G·S) runs and (N·G, C/G, S) planes
# --------------------------------------------------------------------------------------------


@kernel
def s0_fwd(x2, x3, w, b, v, gate, eps, nchunks, y3, mean, rstd):
    U, Cg, S = x3.shape
    C = w.shape[0]
    G = C // Cg
    big = overflow_bound(x2)
    T = x2.dtype.type
    for t in prange(nchunks):
        for u in range(t * U // nchunks, (t + 1) * U // nchunks):
            g = u % G
            xs = x2[u]
            sh = xs[0]
            s1, s2 = shifted_sums(xs, sh, big, 0.0, 0.0)
            mu, var = mean_var(s1, s2, Cg * S, sh)
            r = 1.0 / np.sqrt(var + eps)
            mean[u] = mu
            rstd[u] = r
            for j in range(Cg):
                c = g * Cg + j
                a = T(w[c] * r)
                bc = b[c]
                vc = v[c]
                xp = x3[u, j]
                yp = y3[u, j]
                if gate:
                    for s in range(S):
                        xv = xp[s]
                        yp[s] = a * (xv * sigmoid_f(vc * xv)) + bc
                else:
                    for s in range(S):
                        yp[s] = a * xp[s] + bc


@kernel
def s0_bwd(x3, dy3, w, v, gate, mean, rstd, nchunks, dx3, pw, pb, pv):
    U, Cg, S = x3.shape
    C = w.shape[0]
    G = C // Cg
    T = x3.dtype.type
    one = T(1)
    for t in prange(nchunks):
        for u in range(t * U // nchunks, (t + 1) * U // nchunks):
            g = u % G
            r = rstd[u]
            acc = 0.0
            for j in range(Cg):
                c = g * Cg + j
                xp = x3[u, j]
                gp = dy3[u, j]
                vc = v[c]
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                if gate:
                    for s in range(S):
                        xv = xp[s]
                        d = gp[s]
                        sg = sigmoid_f(vc * xv)
                        s1 += np.float64(d * (xv * sg))
                        s2 += np.float64(d)
                        s3 += np.float64(d * (xv * xv) * (sg * (one - sg)))
                else:
                    for s in range(S):
                        s1 += np.float64(gp[s] * xp[s])
                        s2 += np.float64(gp[s])
                acc += w[c] * s1
                pw[t, c] += r * s1
                pb[t, c] += s2
                pv[t, c] += w[c] * r * s3
            k2 = acc * r * r * r / (Cg * S)
            mhi, lo = split_mean(mean[u], x3)
            k2T = T(k2)
            k0 = T(k2 * lo)
            for j in range(Cg):
                c = g * Cg + j
                xp = x3[u, j]
                gp = dy3[u, j]
                dxp = dx3[u, j]
                a1 = T(w[c] * r)
                vc = v[c]
                if gate:
                    for s in range(S):
                        xv = xp[s]
                        sg = sigmoid_f(vc * xv)
                        dxp[s] = a1 * gp[s] * (sg + vc * xv * (sg * (one - sg))) - k2T * (xv - mhi) + k0
                else:
                    for s in range(S):
                        dxp[s] = a1 * gp[s] - k2T * (xp[s] - mhi) + k0


# --------------------------------------------------------------------------------------------
# channels-last (N, S, C): one item per sample
# --------------------------------------------------------------------------------------------


@kernel
def s0_fwd_cl(x, w, b, v, gate, G, eps, nchunks, y, mean, rstd):
    N, S, C = x.shape
    Cg = C // G
    T = x.dtype.type
    for t in prange(nchunks):
        q1 = np.empty(C)
        q2 = np.empty(C)
        a = np.empty(C, x.dtype)
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn, yn = x[n], y[n]
            sh = xn[0]
            q1[:] = 0.0
            q2[:] = 0.0
            for s in range(S):
                xs = xn[s]
                for c in range(C):
                    d = np.float64(xs[c] - sh[c])
                    q1[c] += d
                    q2[c] += d * d
            for g in range(G):
                # Chan's merge of the channels' (mean, M2), every channel S values
                mg = 0.0
                for c in range(g * Cg, (g + 1) * Cg):
                    mg += np.float64(sh[c]) + q1[c] / S
                mg /= Cg
                m2 = 0.0
                for c in range(g * Cg, (g + 1) * Cg):
                    mc = q1[c] / S
                    dc = np.float64(sh[c]) + mc - mg
                    m2 += (q2[c] - q1[c] * mc) + S * dc * dc
                var = m2 / (Cg * S)
                if var < 0.0:
                    var = 0.0
                r = 1.0 / np.sqrt(var + eps)
                mean[n, g] = mg
                rstd[n, g] = r
                for c in range(g * Cg, (g + 1) * Cg):
                    a[c] = T(w[c] * r)
            for s in range(S):
                xs, ys = xn[s], yn[s]
                if gate:
                    for c in range(C):
                        xv = xs[c]
                        ys[c] = a[c] * (xv * sigmoid_f(v[c] * xv)) + b[c]
                else:
                    for c in range(C):
                        ys[c] = a[c] * xs[c] + b[c]


@kernel
def s0_bwd_cl(x, dy, w, v, gate, mean, rstd, nchunks, dx, pw, pb, pv):
    N, S, C = x.shape
    G = mean.shape[1]
    Cg = C // G
    T = x.dtype.type
    one = T(1)
    for t in prange(nchunks):
        q1 = np.empty(C)
        q2 = np.empty(C)
        q3 = np.empty(C)
        a1 = np.empty(C, x.dtype)
        k2 = np.empty(C, x.dtype)
        mh = np.empty(C, x.dtype)
        k0 = np.empty(C, x.dtype)
        pwt, pbt, pvt = pw[t], pb[t], pv[t]
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn, gn, dxn = x[n], dy[n], dx[n]
            q1[:] = 0.0
            q2[:] = 0.0
            q3[:] = 0.0
            for s in range(S):
                xs, gs = xn[s], gn[s]
                if gate:
                    for c in range(C):
                        xv = xs[c]
                        d = gs[c]
                        sg = sigmoid_f(v[c] * xv)
                        q1[c] += np.float64(d * (xv * sg))
                        q2[c] += np.float64(d)
                        q3[c] += np.float64(d * (xv * xv) * (sg * (one - sg)))
                else:
                    for c in range(C):
                        q1[c] += np.float64(gs[c] * xs[c])
                        q2[c] += np.float64(gs[c])
            for g in range(G):
                r = rstd[n, g]
                acc = 0.0
                for c in range(g * Cg, (g + 1) * Cg):
                    acc += w[c] * q1[c]
                    pwt[c] += r * q1[c]
                    pbt[c] += q2[c]
                    pvt[c] += w[c] * r * q3[c]
                kk = acc * r * r * r / (Cg * S)
                hi, lo = split_mean(mean[n, g], x)
                for c in range(g * Cg, (g + 1) * Cg):
                    a1[c] = T(w[c] * r)
                    k2[c] = T(kk)
                    mh[c] = hi
                    k0[c] = T(kk * lo)
            for s in range(S):
                xs, gs, dxs = xn[s], gn[s], dxn[s]
                if gate:
                    for c in range(C):
                        xv = xs[c]
                        sg = sigmoid_f(v[c] * xv)
                        dxs[c] = (a1[c] * gs[c] * (sg + v[c] * xv * (sg * (one - sg)))
                                  - k2[c] * (xv - mh[c]) + k0[c])
                else:
                    for c in range(C):
                        dxs[c] = a1[c] * gs[c] - k2[c] * (xs[c] - mh[c]) + k0[c]


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _layout(x: Tensor) -> tuple[Tensor, bool, int]:
    """(x, channels-last?, positions S): contiguous or channels-last memory; any other strides
    are copied once to contiguous."""
    x = x.detach()
    s = x.numel() // max(x.shape[0] * x.shape[1], 1)
    if is_channels_last(x):
        return x, True, s
    if not x.is_contiguous():
        x = x.contiguous()
    return x, False, s


def _phys(t: Tensor, cl: bool, n: int, c: int, s: int, groups: int):
    """The kernel's arrays over t's memory: channels-last (N, S, C); contiguous the (N·G, C/G·S)
    runs and the (N·G, C/G, S) planes."""
    if cl:
        return (t.movedim(1, -1).numpy().reshape(n, s, c),)
    a = t.numpy()
    return a.reshape(n * groups, (c // groups) * s), a.reshape(n * groups, c // groups, s)


def _chunks(x: Tensor, units: int) -> int:
    return max(1, min(threads(x.numel()), units))


def evonorm_s0(x: Tensor, weight, bias, v, groups: int, eps: float):
    """(y, mean, rstd): y in x's layout (contiguous or channels-last) and dtype; mean and rstd
    float64 of shape (N, G). ``v=None``: no gate (z = x). None when float64 squares overflowed."""
    x, cl, s = _layout(x)
    n, c = x.shape[0], x.shape[1]
    y = pool.empty(tuple(x.shape), x.stride(), x.dtype)
    mean, rstd = np.empty((n, groups)), np.empty((n, groups))
    w, b = param(weight, c, x.dtype, 1.0), param(bias, c, x.dtype, 0.0)
    vv = param(v, c, x.dtype, 1.0)
    if cl:
        launch(s0_fwd_cl, *_phys(x, cl, n, c, s, groups), w, b, vv, v is not None, groups, float(eps),
               _chunks(x, n), *_phys(y, cl, n, c, s, groups), mean, rstd)
    else:
        launch(s0_fwd, *_phys(x, cl, n, c, s, groups), w, b, vv, v is not None, float(eps),
               _chunks(x, n * groups), _phys(y, cl, n, c, s, groups)[1], mean.reshape(-1), rstd.reshape(-1))
    if x.dtype == torch.float64 and (np.isfinite(mean) & ~(rstd > 0)).any():
        return None  # Σd² overflowed float64: rstd 0 (σ² = inf) or NaN (inf − inf), the mean finite
    return y, torch.from_numpy(mean), torch.from_numpy(rstd)


def evonorm_s0_backward(dy, x, weight, bias, v, mean, rstd, groups: int, eps: float, *, mask=(True,) * 4):
    """(dx, dγ, dβ, dv): dx in x's layout and dtype, the rest float64 (C,); None where not in
    ``mask``. ``bias`` is not used (the gradient does not depend on β)."""
    x, cl, s = _layout(x)
    n, c = x.shape[0], x.shape[1]
    dy = dy.detach()
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype).copy_(dy)
    dx = pool.empty(tuple(x.shape), x.stride(), x.dtype)
    units = n if cl else n * groups
    nchunks = _chunks(x, units)
    pw, pb, pv = (np.zeros((nchunks, c)) for _ in range(3))
    w, vv = param(weight, c, x.dtype, 1.0), param(v, c, x.dtype, 1.0)
    m64, r64 = f64(mean), f64(rstd)
    if cl:
        launch(s0_bwd_cl, *_phys(x, cl, n, c, s, groups), *_phys(dy, cl, n, c, s, groups), w, vv, v is not None,
               m64.reshape(n, groups), r64.reshape(n, groups), nchunks, *_phys(dx, cl, n, c, s, groups), pw, pb, pv)
    else:
        launch(s0_bwd, _phys(x, cl, n, c, s, groups)[1], _phys(dy, cl, n, c, s, groups)[1], w, vv, v is not None,
               m64, r64, nchunks, _phys(dx, cl, n, c, s, groups)[1], pw, pb, pv)
    out = (dx, torch.from_numpy(pw.sum(0)), torch.from_numpy(pb.sum(0)),
           torch.from_numpy(pv.sum(0)) if v is not None else None)
    return tuple(o if m else None for o, m in zip(out, mask))


def warmup(dt: torch.dtype) -> None:
    """Compile (or load) every EvoNorm kernel for ``dt``."""
    x = torch.randn(2, 4, 3, 3, dtype=dt)
    w = torch.ones(4, dtype=dt)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        for v in (w, None):
            y, mean, rstd = evonorm_s0(xi, w, w, v, 2, 1e-5)
            evonorm_s0_backward(y, xi, w, w, v, mean, rstd, 2, 1e-5)
    _warmup_b0(dt)


# --------------------------------------------------------------------------------------------
# EvoNorm-B0: y = γ_c·x / max(σ_b, v_c·x + σ_i) + β_c
# --------------------------------------------------------------------------------------------
# σ_b = sqrt(s²_b,c + ε) (batch variance per channel, or the running one), σ_i = sqrt(s²_i,nc + ε)
# (instance variance per (sample, channel)). Passes: instance statistics (shifted sums per
# (n, c)), then y; backward: per-(n, c) sums, then dx. Contiguous input: one item per (n, c)
# plane; channels-last: one item per sample, inner loops along the channels. Every per-(n, c)
# coefficient (σ_i, the dx constants) is computed by the launcher in float64 and cast once, so
# the forward and the backward form max(σ_b, v·x + σ_i) from the same values (same ties).
#
# Backward, with D = max(L, R), L = σ_b, R = v·x + σ_i, h = γ·dy, torch.maximum's gradient
# (k_R = 0 if L > R, ½ on a tie, else 1; k_L likewise), g_R = −h·x·k_R/D², g_L = −h·x·k_L/D²:
#     dx = h/D + v·g_R + Σ_s g_R/(σ_i·S)·(x − μ_i) + [batch] Σ_{n,s} g_L/(σ_b·N·S)·(x − μ_b)
#     dv = Σ g_R·x,  dγ = Σ dy·x/D,  dβ = Σ dy.


@kernel
def b0_stats(x, mean, var):
    P, S = x.shape
    big = overflow_bound(x)
    for p in prange(P):
        xs = x[p]
        s1, s2 = shifted_sums(xs, xs[0], big, 0.0, 0.0)
        mean[p], var[p] = mean_var(s1, s2, S, xs[0])


@kernel
def b0_stats_cl(x, nchunks, mean, var):
    N, S, C = x.shape
    for t in prange(nchunks):
        q1 = np.empty(C)
        q2 = np.empty(C)
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn = x[n]
            sh = xn[0]
            q1[:] = 0.0
            q2[:] = 0.0
            for s in range(S):
                xs = xn[s]
                for c in range(C):
                    d = np.float64(xs[c] - sh[c])
                    q1[c] += d
                    q2[c] += d * d
            for c in range(C):
                mean[n, c], var[n, c] = mean_var(q1[c], q2[c], S, sh[c])


@kernel
def b0_fwd(x, w, b, v, sb, si, y):
    P, S = x.shape
    C = w.shape[0]
    for p in prange(P):
        c = p % C
        xs, ys = x[p], y[p]
        lc, rc, wc, bc, vc = sb[c], si[p], w[c], b[c], v[c]
        for s in range(S):
            xv = xs[s]
            r = vc * xv + rc
            den = lc if (lc > r or lc != lc) else r  # torch.maximum: NaN in either gives NaN
            ys[s] = wc * (xv / den) + bc


@kernel
def b0_fwd_cl(x, w, b, v, sb, si, nchunks, y):
    N, S, C = x.shape
    for t in prange(nchunks):
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn, yn, rn = x[n], y[n], si[n]
            for s in range(S):
                xs, ys = xn[s], yn[s]
                for c in range(C):
                    xv = xs[c]
                    r = v[c] * xv + rn[c]
                    den = sb[c] if (sb[c] > r or sb[c] != sb[c]) else r
                    ys[c] = w[c] * (xv / den) + b[c]


@kernel
def b0_red(x, dy, w, v, sb, si, qr, qrx, ql, qw, qb):
    P, S = x.shape
    C = w.shape[0]
    T = x.dtype.type
    half, one, zero = T(0.5), T(1), T(0)
    for p in prange(P):
        c = p % C
        xs, gs = x[p], dy[p]
        lc, rc, wc, vc = sb[c], si[p], w[c], v[c]
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        a4 = 0.0
        a5 = 0.0
        for s in range(S):
            xv = xs[s]
            d = gs[s]
            r = vc * xv + rc
            den = lc if (lc > r or lc != lc) else r
            kr = zero if lc > r else (half if lc == r else one)
            kl = zero if lc < r else (half if lc == r else one)
            q = xv / den
            gd = -(d * wc) * q / den
            a1 += np.float64(gd * kr)
            a2 += np.float64(gd * kr * xv)
            a3 += np.float64(gd * kl)
            a4 += np.float64(d * q)
            a5 += np.float64(d)
        qr[p] = a1
        qrx[p] = a2
        ql[p] = a3
        qw[p] = a4
        qb[p] = a5


@kernel
def b0_red_cl(x, dy, w, v, sb, si, nchunks, qr, qrx, ql, qw, qb):
    N, S, C = x.shape
    T = x.dtype.type
    half, one, zero = T(0.5), T(1), T(0)
    for t in prange(nchunks):
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn, gn, rn = x[n], dy[n], si[n]
            a1, a2, a3, a4, a5 = qr[n], qrx[n], ql[n], qw[n], qb[n]
            a1[:] = 0.0
            a2[:] = 0.0
            a3[:] = 0.0
            a4[:] = 0.0
            a5[:] = 0.0
            for s in range(S):
                xs, gs = xn[s], gn[s]
                for c in range(C):
                    xv = xs[c]
                    d = gs[c]
                    lc = sb[c]
                    r = v[c] * xv + rn[c]
                    den = lc if (lc > r or lc != lc) else r
                    kr = zero if lc > r else (half if lc == r else one)
                    kl = zero if lc < r else (half if lc == r else one)
                    q = xv / den
                    gd = -(d * w[c]) * q / den
                    a1[c] += np.float64(gd * kr)
                    a2[c] += np.float64(gd * kr * xv)
                    a3[c] += np.float64(gd * kl)
                    a4[c] += np.float64(d * q)
                    a5[c] += np.float64(d)


@kernel
def b0_dx(x, dy, w, v, sb, si, k1, mh, k0, dx):
    P, S = x.shape
    C = w.shape[0]
    T = x.dtype.type
    half, one, zero = T(0.5), T(1), T(0)
    for p in prange(P):
        c = p % C
        xs, gs, dxs = x[p], dy[p], dx[p]
        lc, rc, wc, vc = sb[c], si[p], w[c], v[c]
        a, m, z = k1[p], mh[p], k0[p]
        for s in range(S):
            xv = xs[s]
            r = vc * xv + rc
            den = lc if (lc > r or lc != lc) else r
            kr = zero if lc > r else (half if lc == r else one)
            h = gs[s] * wc
            dxs[s] = h / den - vc * kr * (h * (xv / den) / den) + a * (xv - m) + z


@kernel
def b0_dx_cl(x, dy, w, v, sb, si, k1, mh, k0, nchunks, dx):
    N, S, C = x.shape
    T = x.dtype.type
    half, one, zero = T(0.5), T(1), T(0)
    for t in prange(nchunks):
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn, gn, dxn = x[n], dy[n], dx[n]
            rn, an, mn, zn = si[n], k1[n], mh[n], k0[n]
            for s in range(S):
                xs, gs, dxs = xn[s], gn[s], dxn[s]
                for c in range(C):
                    xv = xs[c]
                    lc = sb[c]
                    r = v[c] * xv + rn[c]
                    den = lc if (lc > r or lc != lc) else r
                    kr = zero if lc > r else (half if lc == r else one)
                    h = gs[c] * w[c]
                    dxs[c] = h / den - v[c] * kr * (h * (xv / den) / den) + an[c] * (xv - mn[c]) + zn[c]


def _b0_arrays(t: Tensor, cl: bool, n: int, c: int, s: int) -> np.ndarray:
    """Channels-last: the (N, S, C) rows; contiguous: the (N·C, S) planes."""
    if cl:
        return t.movedim(1, -1).numpy().reshape(n, s, c)
    return t.numpy().reshape(n * c, s)


def evonorm_b0(x: Tensor, weight, bias, v, running_var, eps: float):
    """(y, batch mean, batch var, instance mean, instance var), float64 statistics ((C,) and
    (N, C)); ``running_var`` given: σ²_b is it (the batch mean comes back empty), else the
    biased batch variance. ``v=None``: R = σ_i. None when float64 squares overflowed."""
    x, cl, s = _layout(x)
    n, c = x.shape[0], x.shape[1]
    T = NP_DT[x.dtype]
    mean_i, var_i = np.empty((n, c)), np.empty((n, c))
    xa = _b0_arrays(x, cl, n, c, s)
    if cl:
        launch(b0_stats_cl, xa, _chunks(x, n), mean_i, var_i)
    else:
        launch(b0_stats, xa, mean_i.reshape(-1), var_i.reshape(-1))
    if x.dtype == torch.float64 and (np.isfinite(mean_i) & ~np.isfinite(var_i)).any():
        return None  # Σd² overflowed float64
    if running_var is None:
        mean_b = mean_i.mean(0)
        var_b = var_i.mean(0) + ((mean_i - mean_b) ** 2).mean(0)  # all (n, c) hold S values
    else:
        mean_b, var_b = np.zeros(0), f64(running_var).copy()
    sb = np.sqrt(var_b + eps).astype(T)
    si = np.sqrt(var_i + eps).astype(T)
    y = pool.empty(tuple(x.shape), x.stride(), x.dtype)
    w, b = param(weight, c, x.dtype, 1.0), param(bias, c, x.dtype, 0.0)
    vv = param(v, c, x.dtype, 0.0)
    if cl:
        launch(b0_fwd_cl, xa, w, b, vv, sb, si, _chunks(x, n), _b0_arrays(y, cl, n, c, s))
    else:
        launch(b0_fwd, xa, w, b, vv, sb, si.reshape(-1), _b0_arrays(y, cl, n, c, s))
    return (y, torch.from_numpy(mean_b), torch.from_numpy(var_b), torch.from_numpy(mean_i),
            torch.from_numpy(var_i))


def evonorm_b0_backward(dy, x, weight, bias, v, mean_b, var_b, mean_i, var_i, batch: bool, eps: float, *,
                        mask=(True,) * 4):
    """(dx, dγ, dβ, dv): dx in x's layout and dtype, the rest float64 (C,); ``batch``: σ²_b is
    the batch variance (its gradient reaches x), else a constant (running statistics)."""
    x, cl, s = _layout(x)
    n, c = x.shape[0], x.shape[1]
    T = NP_DT[x.dtype]
    dy = dy.detach()
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype).copy_(dy)
    vb, mi, vi = f64(var_b), f64(mean_i).reshape(n, c), f64(var_i).reshape(n, c)
    sb64, si64 = np.sqrt(vb + eps), np.sqrt(vi + eps)
    sb, si = sb64.astype(T), si64.astype(T)
    w, vv = param(weight, c, x.dtype, 1.0), param(v, c, x.dtype, 0.0)
    xa, ga = _b0_arrays(x, cl, n, c, s), _b0_arrays(dy, cl, n, c, s)
    qr, qrx, ql, qw, qb = (np.empty((n, c)) for _ in range(5))
    if cl:
        launch(b0_red_cl, xa, ga, w, vv, sb, si, _chunks(x, n), qr, qrx, ql, qw, qb)
    else:
        launch(b0_red, xa, ga, w, vv, sb, si.reshape(-1), *(q.reshape(-1) for q in (qr, qrx, ql, qw, qb)))
    dx = None
    if mask[0]:
        alpha = qr / (si64 * s)  # coefficient of (x − μ_i)
        beta = ql.sum(0) / (sb64 * n * s) if batch else np.zeros(c)  # coefficient of (x − μ_b)
        mb = f64(mean_b) if batch else np.zeros(c)
        mhi = mi.astype(T)
        lo = mi - mhi.astype(np.float64)
        k1 = (alpha + beta).astype(T)
        k0 = (-alpha * lo - beta * (mb - mhi.astype(np.float64))).astype(T)
        dx = pool.empty(tuple(x.shape), x.stride(), x.dtype)
        if cl:
            launch(b0_dx_cl, xa, ga, w, vv, sb, si, k1, mhi, k0, _chunks(x, n), _b0_arrays(dx, cl, n, c, s))
        else:
            launch(b0_dx, xa, ga, w, vv, sb, si.reshape(-1), k1.reshape(-1), mhi.reshape(-1), k0.reshape(-1),
                   _b0_arrays(dx, cl, n, c, s))
    out = (dx, torch.from_numpy(qw.sum(0)), torch.from_numpy(qb.sum(0)),
           torch.from_numpy(qrx.sum(0)) if v is not None else None)
    return tuple(o if m else None for o, m in zip(out, mask))


def _warmup_b0(dt: torch.dtype) -> None:
    x = torch.randn(2, 4, 3, 3, dtype=dt)
    w = torch.ones(4, dtype=dt)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        for rv in (None, w):
            y, mb, vb, mi, vi = evonorm_b0(xi, w, w, w, rv, 1e-5)
            evonorm_b0_backward(y, xi, w, w, w, mb, vb, mi, vi, rv is None, 1e-5)
