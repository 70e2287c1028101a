r"""Fused point-wise kernels: Dynamic Tanh and Dynamic erf (one pass forward, one pass backward).

.. math::

    \text{DyT:}\quad y = \gamma_f \tanh(\alpha x) + \beta_f \qquad
    \text{Derf:}\quad y = \gamma_f \operatorname{erf}(\alpha x + s) + \beta_f

Every kernel sees x as a C-contiguous (R, F, S) array: f indexes the affine parameters (the
feature), S the contiguous positions that share one feature. Rows (``S == 1``): channels-last
layers (F = the normalized shape's size) and channels-first ones on channels-last memory
(F = C); planes (``S > 1``): channels-first layers on contiguous (N, C, \*S) memory.

Passes over memory (the minimum): forward reads x and writes y; backward reads x and dy and
writes dx (the activation is recomputed from x rather than saved), and reduces in the same pass

.. math::

    u = \alpha x + s,\ a = f(u),\ g = dy\,\gamma_f f'(u):\quad
    dx = \alpha g,\quad d\alpha = \textstyle\sum g\,x,\quad ds = \sum g,\quad
    d\gamma_f = \sum_{f} dy\, a,\quad d\beta_f = \sum_{f} dy

with f' = 1 − tanh² (DyT) or 2/√π·exp(−u²) (Derf). Each parallel chunk (``prange``) accumulates
its own float64 partial sums (dα and ds scalars, dγ and dβ per feature) and the launcher adds
the chunks' rows: no atomics, the result depends only on the number of chunks.

Element functions. numba on this platform has no vector math library (no SVML): ``np.tanh`` and
``math.erf`` are scalar libm calls, 20–60 ns per element, several times slower than torch's
vectorized ones. In float32 the kernels therefore use branch-free rational approximations that
LLVM vectorizes (the minimax forms Eigen uses for ``tanh``/``erf`` of floats: clamp, odd
polynomial over even polynomial; at most ~6 ulp, 3.5e-7 absolute, against float64 libm over
[−12, 12]), and exp(−u²) of Derf's derivative is computed in float64 as (e^{−v/256})^{256}
(a degree-10 Taylor polynomial, then 8 squarings: ~4e-10 relative, no libm call). float64
keeps libm (``tanh``, ``erf``, ``exp``): exact to the last bits, which gradcheck needs.
NaN propagates (every clamp is written so a NaN compares false and passes through; no
fast-math flag that assumes finite values); ±Inf saturate to ±1 as in torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload
from torch import Tensor

from normlab.core.cpu.jit import CACHE, FASTMATH, _cache_dir_override, _stamp_with_common
from normlab.core.cpu.params import NP_DTYPE, f64, param
from normlab.core.cpu.plan import is_channels_last
from normlab.core.cpu.pool import pool
from normlab.core.cpu.threads import launch, threads

__all__ = ["POINTWISE_OPS", "dynamic_erf", "dynamic_erf_backward", "dynamic_tanh", "dynamic_tanh_backward",
           "erf_deriv", "erf_f", "filter_response_norm", "filter_response_norm_backward", "frn_bwd",
           "frn_bwd_cl", "frn_fwd", "frn_fwd_cl", "pw_bwd", "pw_fwd", "tanh_f", "warmup"]

#: the backend ops this family implements (element-wise, so 1-D input is fine)
POINTWISE_OPS = ("dynamic_tanh", "dynamic_erf", "filter_response_norm")

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)

# Eigen's float tanh: tanh(z) ≈ z·P(z²)/Q(z²) on |z| ≤ 7.9053 (beyond, 1 in float32).
_TA = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
       -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TB = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
# Eigen's float erf: erf(z) ≈ z·P(z²)/Q(z²) on |z| ≤ 4 (beyond, ±1 in float32).
_EA = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
       -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
_EB = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
       -1.45660718464996e-05)

_TA32 = tuple(np.float32(c) for c in _TA)
_TB32 = tuple(np.float32(c) for c in _TB)
_EA32 = tuple(np.float32(c) for c in _EA)
_EB32 = tuple(np.float32(c) for c in _EB)
_T_CLAMP = np.float32(7.90531110763549805)
_T_SMALL = np.float32(0.0004)
_E_CLAMP = np.float32(4.0)
_INV_FACT = tuple(1.0 / math.factorial(k) for k in range(11))


def tanh_f(z):
    """tanh in the kernels' precision (see the module docstring); compiled via the overload."""
    return np.tanh(z)


def erf_f(z):
    """erf in the kernels' precision."""
    return math.erf(z)


def erf_deriv(u):
    """d erf(u)/du = 2/√π·exp(−u²), in float64 for float32 u (the caller casts)."""
    return _TWO_OVER_SQRT_PI * math.exp(-u * u)


# numba's default (Python) error model checks every float division for a zero divisor to raise
# ZeroDivisionError, which keeps LLVM from vectorizing the rational approximations; with the
# numpy model x/0 is ±inf or NaN as in IEEE arithmetic (the denominators here are never 0).
_JIT = {"fastmath": FASTMATH, "error_model": "numpy"}


def kernel(fn):
    """``jit.kernel`` plus the numpy error model (same flags, cache, stamp)."""
    with _cache_dir_override():
        disp = njit(parallel=True, cache=CACHE, nogil=True, **_JIT)(fn)
    _stamp_with_common(disp)
    return disp


def _is_f32(z) -> bool:
    return isinstance(z, types.Float) and z.bitwidth == 32


@overload(tanh_f, jit_options=_JIT)
def _tanh_ov(z):
    if not _is_f32(z):
        return lambda z: np.tanh(z)
    a0, a1, a2, a3, a4, a5, a6 = _TA32
    b0, b1, b2, b3 = _TB32
    c, small = _T_CLAMP, _T_SMALL

    def impl(z):
        # written so that NaN (all comparisons false) passes through unchanged
        w = c if z > c else z
        w = -c if w < -c else w
        w2 = w * w
        p = ((((((a6 * w2 + a5) * w2 + a4) * w2 + a3) * w2 + a2) * w2 + a1) * w2 + a0) * w
        q = ((b3 * w2 + b2) * w2 + b1) * w2 + b0
        r = p / q
        return z if ((z < small) & (z > -small)) else r

    return impl


@overload(erf_f, jit_options=_JIT)
def _erf_ov(z):
    if not _is_f32(z):
        return lambda z: math.erf(z)
    a0, a1, a2, a3, a4, a5, a6 = _EA32
    b0, b1, b2, b3, b4 = _EB32
    c = _E_CLAMP

    def impl(z):
        w = c if z > c else z
        w = -c if w < -c else w
        w2 = w * w
        p = ((((((a6 * w2 + a5) * w2 + a4) * w2 + a3) * w2 + a2) * w2 + a1) * w2 + a0) * w
        q = (((b4 * w2 + b3) * w2 + b2) * w2 + b1) * w2 + b0
        return p / q

    return impl


@overload(erf_deriv, jit_options=_JIT)
def _erf_deriv_ov(u):
    k = _TWO_OVER_SQRT_PI
    if not _is_f32(u):
        return lambda u: k * math.exp(-u * u)
    f = _INV_FACT

    def impl(u):
        v = np.float64(u) * np.float64(u)
        v = 104.0 if v > 104.0 else v  # exp(−104) is below float32's smallest subnormal; NaN passes
        w = -v * (1.0 / 256.0)
        e = f[0] + w * (f[1] + w * (f[2] + w * (f[3] + w * (f[4] + w * (f[5] + w * (
            f[6] + w * (f[7] + w * (f[8] + w * (f[9] + w * f[10])))))))))
        for _ in range(8):
            e = e * e
        return k * e

    return impl


@kernel
def pw_fwd(x, x2, alpha, shift, w, b, erf, nchunks, y, y2):
    """y = w_f·f(α x + s) + b_f over (R, F, S) x; f = erf if ``erf`` else tanh (s unused).

    ``x2``, ``y2``: the same memory as (R, F·S). Rows (S = 1) loop over ``x2[r]``, a contiguous
    1-D array; ``x[r, :, 0]`` would be a strided one (S is not a compile-time constant), which
    LLVM does not vectorize.
    """
    R, F, S = x.shape
    units = R if S == 1 else R * F
    for t in prange(nchunks):
        lo, hi = t * units // nchunks, (t + 1) * units // nchunks
        if S == 1:
            for r in range(lo, hi):
                xr, yr = x2[r], y2[r]
                if erf:
                    for j in range(F):
                        yr[j] = w[j] * erf_f(alpha * xr[j] + shift) + b[j]
                else:
                    for j in range(F):
                        yr[j] = w[j] * tanh_f(alpha * xr[j]) + b[j]
        else:
            for p in range(lo, hi):
                r, f = p // F, p % F
                xp, yp = x[r, f], y[r, f]
                wf, bf = w[f], b[f]
                if erf:
                    for s in range(S):
                        yp[s] = wf * erf_f(alpha * xp[s] + shift) + bf
                else:
                    for s in range(S):
                        yp[s] = wf * tanh_f(alpha * xp[s]) + bf


@kernel
def pw_bwd(x, x2, dy, dy2, alpha, shift, w, erf, nchunks, dx, dx2, pa, ps, pw, pb):
    """dx and per-chunk float64 partials pa = Σ g·x, ps = Σ g (g = dy·w_f·f'(u)),
    pw[t, f] = Σ dy·f(u), pb[t, f] = Σ dy; dα = Σ_t pa, ds = Σ_t ps, dγ = Σ_t pw, dβ = Σ_t pb.
    ``*2``: (R, F·S) views, as in :func:`pw_fwd`.

    Rows: each row is two loops, both vectorized: the first (x, dy, γ in; dx and dy·f(u) into a
    row-sized scratch out; scalar sums) and the second adding the scratch and dy into the
    chunk's dγ, dβ rows. One loop doing both touches six arrays, more than LLVM's run-time
    alias checks allow, and stays scalar.
    """
    R, F, S = x.shape
    units = R if S == 1 else R * F
    one = x.dtype.type(1)  # a bare 1 would promote float32 arithmetic to float64
    for t in prange(nchunks):
        lo, hi = t * units // nchunks, (t + 1) * units // nchunks
        acc_a = 0.0
        acc_s = 0.0
        if S == 1:
            pwt, pbt = pw[t], pb[t]
            sc = np.empty(F, x.dtype)
            for r in range(lo, hi):
                xr, gr, dxr = x2[r], dy2[r], dx2[r]
                sa = 0.0
                ss = 0.0
                if erf:
                    for j in range(F):
                        u = alpha * xr[j] + shift
                        d = gr[j]
                        g = d * w[j] * x.dtype.type(erf_deriv(u))
                        dxr[j] = alpha * g
                        sa += np.float64(g * xr[j])
                        ss += np.float64(g)
                        sc[j] = d * erf_f(u)
                else:
                    for j in range(F):
                        a = tanh_f(alpha * xr[j])
                        d = gr[j]
                        g = d * w[j] * (one - a * a)
                        dxr[j] = alpha * g
                        sa += np.float64(g * xr[j])
                        sc[j] = d * a
                for j in range(F):
                    pwt[j] += np.float64(sc[j])
                    pbt[j] += np.float64(gr[j])
                acc_a += sa
                acc_s += ss
        else:
            for p in range(lo, hi):
                r, f = p // F, p % F
                xp, gp, dxp = x[r, f], dy[r, f], dx[r, f]
                wf = w[f]
                sa = 0.0
                ss = 0.0
                sw = 0.0
                sb = 0.0
                if erf:
                    for s in range(S):
                        u = alpha * xp[s] + shift
                        d = gp[s]
                        g = d * wf * x.dtype.type(erf_deriv(u))
                        dxp[s] = alpha * g
                        sa += np.float64(g * xp[s])
                        ss += np.float64(g)
                        sw += np.float64(d * erf_f(u))
                        sb += np.float64(d)
                else:
                    for s in range(S):
                        a = tanh_f(alpha * xp[s])
                        d = gp[s]
                        g = d * wf * (one - a * a)
                        dxp[s] = alpha * g
                        sa += np.float64(g * xp[s])
                        sw += np.float64(d * a)
                        sb += np.float64(d)
                acc_a += sa
                acc_s += ss
                pw[t, f] += sw
                pb[t, f] += sb
        pa[t] = acc_a
        ps[t] = acc_s


# --------------------------------------------------------------------------------------------
# Filter Response Normalization + TLU on (P = N·C, S) planes
# --------------------------------------------------------------------------------------------
# ν² = mean_s(x²), r = 1/sqrt(ν² + ε), z = γ_c·x·r + β_c, y = max(z, τ_c). Forward: one read of
# x from memory (the plane is re-read from cache), one write of y. Backward: with torch.maximum's
# gradient (dy to z unless z < τ, to τ unless z > τ, half to each on a tie; so a NaN z sends dy
# to both), dz = dy·k_z, dτ_c = Σ dy·k_τ, dγ_c = Σ dz·x̂, dβ_c = Σ dz, and the RMS-norm input gradient
# dx = r·(dx̂ − x̂·mean_s(dx̂·x̂)) with x̂ = x·r, dx̂ = γ_c·dz: two passes over each plane (the
# second from cache). Channels-last input: ``frn_fwd_cl`` / ``frn_bwd_cl`` below.


@kernel
def frn_fwd(x, w, b, tau, eps, nchunks, y, rstd):
    P, S = x.shape
    C = w.shape[0]
    for t in prange(nchunks):
        for p in range(t * P // nchunks, (t + 1) * P // nchunks):
            c = p % C
            xp, yp = x[p], y[p]
            ss = 0.0
            for s in range(S):
                ss += np.float64(xp[s]) * np.float64(xp[s])
            r = 1.0 / np.sqrt(ss / S + eps)
            rstd[p] = r
            a = x.dtype.type(w[c] * r)
            bc, tc = b[c], tau[c]
            for s in range(S):
                z = a * xp[s] + bc
                yp[s] = tc if z < tc else z  # NaN z compares false and passes through


@kernel
def frn_bwd(x, dy, w, b, tau, rstd, nchunks, dx, pw, pb, pt):
    P, S = x.shape
    C = w.shape[0]
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    for t in prange(nchunks):
        for p in range(t * P // nchunks, (t + 1) * P // nchunks):
            c = p % C
            xp, gp, dxp = x[p], dy[p], dx[p]
            r = x.dtype.type(rstd[p])
            wc, bc, tc = w[c], b[c], tau[c]
            sq = 0.0
            sw = 0.0
            sb = 0.0
            st = 0.0
            for s in range(S):
                xh = xp[s] * r
                z = wc * xh + bc
                k = zero if z < tc else (half if z == tc else one)
                kt = zero if z > tc else (half if z == tc else one)
                dz = gp[s] * k
                sw += np.float64(dz * xh)
                sb += np.float64(dz)
                st += np.float64(gp[s] * kt)
                sq += np.float64(dz * wc * xh)
            m = x.dtype.type(sq / S)
            for s in range(S):
                xh = xp[s] * r
                z = wc * xh + bc
                k = zero if z < tc else (half if z == tc else one)
                dxp[s] = r * (wc * gp[s] * k - xh * m)
            pw[t, c] += sw
            pb[t, c] += sb
            pt[t, c] += st


# FRN on channels-last memory: x is (N, S, C) with C innermost; the statistics of sample n are
# column sums over its S rows, so each sample is one parallel unit (two passes over it, the
# second from cache: a CNN sample is at most a few MiB).


@kernel
def frn_fwd_cl(x, w, b, tau, eps, nchunks, y, rstd):
    N, S, C = x.shape
    for t in prange(nchunks):
        acc = np.empty(C)
        a = np.empty(C, x.dtype)
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn, yn = x[n], y[n]
            acc[:] = 0.0
            for s in range(S):
                xs = xn[s]
                for c in range(C):
                    acc[c] += np.float64(xs[c]) * np.float64(xs[c])
            for c in range(C):
                r = 1.0 / np.sqrt(acc[c] / S + eps)
                rstd[n, c] = r
                a[c] = x.dtype.type(w[c] * r)
            for s in range(S):
                xs, ys = xn[s], yn[s]
                for c in range(C):
                    z = a[c] * xs[c] + b[c]
                    ys[c] = tau[c] if z < tau[c] else z


@kernel
def frn_bwd_cl(x, dy, w, b, tau, rstd, nchunks, dx, pw, pb, pt):
    N, S, C = x.shape
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    for t in prange(nchunks):
        r = np.empty(C, x.dtype)
        m = np.empty(C, x.dtype)
        sq = np.empty(C)
        pwt, pbt, ptt = pw[t], pb[t], pt[t]
        for n in range(t * N // nchunks, (t + 1) * N // nchunks):
            xn, gn, dxn = x[n], dy[n], dx[n]
            for c in range(C):
                r[c] = x.dtype.type(rstd[n, c])
            sq[:] = 0.0
            for s in range(S):
                xs, gs = xn[s], gn[s]
                for c in range(C):
                    xh = xs[c] * r[c]
                    z = w[c] * xh + b[c]
                    k = zero if z < tau[c] else (half if z == tau[c] else one)
                    kt = zero if z > tau[c] else (half if z == tau[c] else one)
                    dz = gs[c] * k
                    pwt[c] += np.float64(dz * xh)
                    pbt[c] += np.float64(dz)
                    ptt[c] += np.float64(gs[c] * kt)
                    sq[c] += np.float64(dz * w[c] * xh)
            for c in range(C):
                m[c] = x.dtype.type(sq[c] / S)
            for s in range(S):
                xs, gs, dxs = xn[s], gn[s], dxn[s]
                for c in range(C):
                    xh = xs[c] * r[c]
                    z = w[c] * xh + b[c]
                    k = zero if z < tau[c] else (half if z == tau[c] else one)
                    dxs[c] = r[c] * (w[c] * gs[c] * k - xh * m[c])


# --------------------------------------------------------------------------------------------
# launchers: Dynamic Tanh, Dynamic erf (kernels above)
# --------------------------------------------------------------------------------------------




def _pw_prepare(x: Tensor, weight, bias, channels_last: bool):
    """(x in a layout the kernel takes, its (R, F, S) physical shape, F).

    Channels-last layers: x contiguous, F = the parameters' size (x's last dim without them).
    Channels-first: contiguous (N, C, S) planes, or rows of C on channels-last memory. Anything
    else is copied once to contiguous.
    """
    x = x.detach()
    if channels_last:
        p = weight if weight is not None else bias
        f = p.numel() if p is not None else (x.shape[-1] if x.dim() else 1)
        if not x.is_contiguous():
            x = x.contiguous()
        return x, (x.numel() // max(f, 1), f, 1), f
    c = x.shape[1]
    if is_channels_last(x):
        return x, (x.numel() // c, c, 1), c
    if not x.is_contiguous():
        x = x.contiguous()
    return x, (x.shape[0], c, x.numel() // max(x.shape[0] * c, 1)), c


def _pw_phys(t: Tensor, shape) -> tuple[np.ndarray, np.ndarray]:
    """t's memory (contiguous, or channels-last with C innermost) as the kernel's (R, F, S) and
    (R, F·S) arrays."""
    if not t.is_contiguous():
        t = t.movedim(1, -1)
    a = t.numpy()
    return a.reshape(shape), a.reshape(shape[0], shape[1] * shape[2])


def _pw_scalar(t: Tensor | None, dtype: torch.dtype):
    return NP_DTYPE[dtype](0.0 if t is None else float(t.detach().reshape(())))


def _pw_chunks(x: Tensor, shape) -> int:
    units = shape[0] if shape[2] == 1 else shape[0] * shape[1]
    return max(1, min(threads(x.numel()), units))


def _pw_forward(x: Tensor, alpha: Tensor, shift, weight, bias, channels_last: bool) -> Tensor:
    x, shape, f = _pw_prepare(x, weight, bias, channels_last)
    y = pool.empty(tuple(x.shape), x.stride(), x.dtype)
    launch(pw_fwd, *_pw_phys(x, shape), _pw_scalar(alpha, x.dtype), _pw_scalar(shift, x.dtype),
            param(weight, f, x.dtype, 1.0), param(bias, f, x.dtype, 0.0), shift is not None,
            _pw_chunks(x, shape), *_pw_phys(y, shape))
    return y


def _pw_backward(dy, x, alpha, shift, weight, bias, channels_last: bool, mask):
    """(dx, dα, ds, dγ, dβ): dx in x's dtype and layout, the rest float64 (flat for γ/β)."""
    x, shape, f = _pw_prepare(x, weight, bias, channels_last)
    dy = dy.detach()
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype).copy_(dy)
    dx = pool.empty(tuple(x.shape), x.stride(), x.dtype)
    nchunks = _pw_chunks(x, shape)
    pa, ps = np.empty(nchunks), np.empty(nchunks)
    pw, pb = np.zeros((nchunks, f)), np.zeros((nchunks, f))
    launch(pw_bwd, *_pw_phys(x, shape), *_pw_phys(dy, shape), _pw_scalar(alpha, x.dtype),
            _pw_scalar(shift, x.dtype), param(weight, f, x.dtype, 1.0), shift is not None, nchunks, *_pw_phys(dx, shape), pa, ps, pw, pb)
    out = [dx if mask[0] else None, torch.tensor(pa.sum()), torch.tensor(ps.sum()),
           torch.from_numpy(pw.sum(0)), torch.from_numpy(pb.sum(0))]
    return tuple(o if m else None for o, m in zip(out, mask))


def dynamic_tanh(x: Tensor, alpha: Tensor, weight, bias, *, channels_last: bool = True) -> Tensor:
    """y = γ·tanh(α·x) + β in one pass (layout: as :func:`_pw_prepare`)."""
    return _pw_forward(x, alpha, None, weight, bias, channels_last)


def dynamic_tanh_backward(dy, x, alpha, weight, bias, *, channels_last: bool = True, mask=(True,) * 4):
    """(dx, dα, dγ, dβ) in one pass; dα, dγ, dβ float64 (flat), None where not in ``mask``."""
    dx, da, _, dw, db = _pw_backward(dy, x, alpha, None, weight, bias, channels_last,
                                     (mask[0], mask[1], False, mask[2], mask[3]))
    return dx, da, dw, db


def dynamic_erf(x: Tensor, alpha: Tensor, shift: Tensor, weight, bias, *, channels_last: bool = True) -> Tensor:
    """y = γ·erf(α·x + s) + β in one pass."""
    return _pw_forward(x, alpha, shift, weight, bias, channels_last)


def dynamic_erf_backward(dy, x, alpha, shift, weight, bias, *, channels_last: bool = True, mask=(True,) * 5):
    """(dx, dα, ds, dγ, dβ) in one pass; all but dx float64."""
    return _pw_backward(dy, x, alpha, shift, weight, bias, channels_last, tuple(mask))


def warmup(dt: torch.dtype, *, frn: bool = True) -> None:
    """Compile (or load) every point-wise kernel for ``dt`` (``frn=False``: DyT and Derf only)."""
    x = torch.randn(2, 4, 3, 3, dtype=dt)
    a, w = torch.full((1,), 0.5, dtype=dt), torch.ones(4, dtype=dt)
    for xi, cl, p in ((x, False, w), (x.contiguous(memory_format=torch.channels_last), False, w),
                      (x, True, torch.ones(3, dtype=dt))):
        dynamic_tanh_backward(dynamic_tanh(xi, a, p, p, channels_last=cl), xi, a, p, p, channels_last=cl)
        dynamic_erf_backward(dynamic_erf(xi, a, a, p, p, channels_last=cl), xi, a, a, p, p, channels_last=cl)
    if not frn:
        return
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        y, rstd = filter_response_norm(xi, w, w, w, 1e-6)
        filter_response_norm_backward(y, xi, w, w, w, rstd, 1e-6)


# --------------------------------------------------------------------------------------------
# launchers: Filter Response Norm + TLU (kernels above)
# --------------------------------------------------------------------------------------------




def _frn_layout(x: Tensor) -> tuple[Tensor, bool, tuple[int, int, int]]:
    """(x, channels-last?, kernel shape): contiguous (N·C, S, 1) planes or channels-last
    (N, S, C) rows; any other strides are copied once to contiguous."""
    x = x.detach()
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    if is_channels_last(x):
        return x, True, (n, s, c)
    if not x.is_contiguous():
        x = x.contiguous()
    return x, False, (n * c, s, 1)


def _frn_arr(t: Tensor, cl: bool, shape) -> np.ndarray:
    a = t.movedim(1, -1).numpy() if cl else t.numpy()
    return a.reshape(shape) if cl else a.reshape(shape[:2])


def filter_response_norm(x: Tensor, weight, bias, tau, eps: float):
    """(y, rstd): y = max(γ·x·rstd + β, τ), rstd = 1/sqrt(mean_HW(x²) + ε) float64 of shape (N, C);
    y in x's layout (contiguous or channels-last). ``tau=None``: no threshold."""
    x, cl, shape = _frn_layout(x)
    n, c = x.shape[0], x.shape[1]
    y = pool.empty(tuple(x.shape), x.stride(), x.dtype)
    rstd = np.empty((n, c))
    units = n if cl else n * c
    launch(frn_fwd_cl if cl else frn_fwd, _frn_arr(x, cl, shape), param(weight, c, x.dtype, 1.0),
            param(bias, c, x.dtype, 0.0), param(tau, c, x.dtype, -math.inf), float(eps),
            max(1, min(threads(x.numel()), units)), _frn_arr(y, cl, shape), rstd if cl else rstd.reshape(-1))
    return y, torch.from_numpy(rstd)


def filter_response_norm_backward(dy, x, weight, bias, tau, rstd, eps: float, *, mask=(True,) * 4):
    """(dx, dγ, dβ, dτ): dx in x's layout and dtype, the rest float64 (C,)."""
    x, cl, shape = _frn_layout(x)
    n, c = x.shape[0], x.shape[1]
    dy = dy.detach()
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype).copy_(dy)
    dx = pool.empty(tuple(x.shape), x.stride(), x.dtype)
    nchunks = max(1, min(threads(x.numel()), n if cl else n * c))
    pw, pb, pt = (np.zeros((nchunks, c)) for _ in range(3))
    r = f64(rstd)
    launch(frn_bwd_cl if cl else frn_bwd, _frn_arr(x, cl, shape), _frn_arr(dy, cl, shape),
            param(weight, c, x.dtype, 1.0), param(bias, c, x.dtype, 0.0), param(tau, c, x.dtype, -math.inf),
            r.reshape(n, c) if cl else r, nchunks, _frn_arr(dx, cl, shape), pw, pb, pt)
    out = (dx, torch.from_numpy(pw.sum(0)), torch.from_numpy(pb.sum(0)), torch.from_numpy(pt.sum(0)))
    return tuple(o if m else None for o, m in zip(out, mask))
