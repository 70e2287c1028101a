"""BatchNorm kernels for contiguous (NCHW-style) input: x viewed as (N·C, S), S = H·W·….

(2-D arrays on purpose: numba's 1-D slices of a 3-D array, ``x[n, c]``, vectorize about three
times worse than rows of a 2-D array.)

A channel's data is N runs of S contiguous elements (stride C·S). In training, channels are
split evenly over the threads (``prange`` over thread chunks); each thread owns whole channels,
so no cross-thread merge is needed and dγ/dβ come out directly. In eval mode there is nothing
to wait for, so the rows (n, c) are streamed in memory order instead (better prefetching when
H·W is small), with per-thread dγ/dβ partials in the backward.

Passes over memory per channel:

* training forward: statistics (read), then y (read again + write). The second read comes from
  L2 when the channel's N·S·4 bytes fit (up to 32×64² in float32), from DRAM otherwise: 2 reads
  + 1 write at worst, which is the floor for batch norm (the statistics need all of the
  channel before the first output).
* eval forward: one read + one write.
* training backward: Σdy and Σdy·x̂ (read x, dy), then dx (read both again + write).
* eval backward: one fused pass (dx = a·dy does not wait for the sums): read x, dy, write dx.

Numerics: see ``cpu_kernels_rows`` (block sums in the input dtype, float64 across blocks,
float64 recomputation of an overflowing block, mean split as m_hi + lo by ``split_mean``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.core.cpu_kernels_common import BLOCK, kernel, split_mean

__all__ = ["planes_fwd", "planes_bwd"]


@kernel
def planes_fwd(x, N, w, b, eps, train, center, nt, y, mean, var, rstd):
    """y = ((x − μ_c)·rstd_c)·w_c + b_c on x viewed as (N·C, S) (row n·C + c).

    train: μ, σ² (biased) computed into mean/var (C,) float64; otherwise read from them.
    center (mean-only BN): rstd = 1 and w must be ones. rstd (C,) float64 is written.
    """
    NC, S = x.shape
    C = NC // N
    M = N * S
    T = x.dtype.type
    BIG = T(1e38) if x.itemsize == 4 else T(1e307)  # block sums above: redo in float64
    if not train:
        # eval: one streaming pass in memory order (rows n·C + c split evenly over threads),
        # which the prefetchers like better than channel-major strides when H·W is small
        mh = np.empty(C, x.dtype)
        aa = np.empty(C, x.dtype)
        bb = np.empty(C, x.dtype)
        for c in range(C):
            rs = 1.0 if center else 1.0 / np.sqrt(var[c] + eps)
            rstd[c] = rs
            hi, lo = split_mean(mean[c], x)
            a = rs * w[c]
            mh[c] = hi
            aa[c] = T(a)
            bb[c] = T(b[c] - lo * a)
        for t in prange(nt):
            for r in range(t * NC // nt, (t + 1) * NC // nt):
                c = r % C
                m = mh[c]
                a1 = aa[c]
                b1 = bb[c]
                xr = x[r]
                yr = y[r]
                for k in range(S):
                    yr[k] = (xr[k] - m) * a1 + b1
        return
    for t in prange(nt):
        for c in range(t * C // nt, (t + 1) * C // nt):
            sh = x[c, 0]
            s1 = 0.0
            s2 = 0.0
            for n in range(N):
                xr = x[n * C + c]
                for k0 in range(0, S, BLOCK):
                    k1 = min(k0 + BLOCK, S)
                    xs = xr[k0:k1]  # 0-based loops over slices vectorize
                    b1 = T(0)
                    b2 = T(0)
                    for k in range(k1 - k0):
                        d = xs[k] - sh
                        b1 += d
                        b2 += d * d
                    if b2 <= BIG:  # False for +inf and NaN (not np.isfinite: see common)
                        s1 += b1
                        s2 += b2
                    else:  # d² overflowed the input dtype, or NaN/Inf: redo in float64
                        sh64 = np.float64(sh)
                        for k in range(k1 - k0):
                            d64 = np.float64(xs[k]) - sh64
                            s1 += d64
                            s2 += d64 * d64
            m = s1 / M
            v = s2 / M - m * m
            if v < 0.0:
                v = 0.0
            mu = np.float64(sh) + m
            mean[c] = mu
            var[c] = v
            rs = 1.0 if center else 1.0 / np.sqrt(v + eps)
            rstd[c] = rs
            mhi, lo = split_mean(mu, x)
            a = rs * w[c]
            aT = T(a)
            bT = T(b[c] - lo * a)
            for n in range(N):
                xr = x[n * C + c]
                yr = y[n * C + c]
                for k in range(S):
                    yr[k] = (xr[k] - mhi) * aT + bT


@kernel
def planes_bwd(x, dy, N, w, mean, rstd, train, center, nt, dx, dw, db):
    """dx (N·C, S) like x, dw = Σ dy·x̂ and db = Σ dy per channel (C,) float64.

    train: the statistics depend on x (full batch-norm backward); otherwise they are
    constants (eval mode: dx = rstd·w·dy). center: mean-only batch norm (rstd = 1, w = 1).
    """
    NC, S = x.shape
    C = NC // N
    M = N * S
    T = x.dtype.type
    if not train:
        # eval: dx = rstd·w·dy needs no sums first, so ONE pass in memory order; the per-channel
        # Σdy and Σdy·x̂ (for dγ, dβ) go to per-thread partials added up at the end
        mh = np.empty(C, x.dtype)
        ml = np.empty(C, x.dtype)
        rsc = np.empty(C, x.dtype)
        aa = np.empty(C, x.dtype)
        for c in range(C):
            hi, lo = split_mean(mean[c], x)
            mh[c] = hi
            ml[c] = T(lo * rstd[c])
            rsc[c] = T(rstd[c])
            aa[c] = T(rstd[c] * w[c])
        pd = np.zeros((nt, C))
        pdx = np.zeros((nt, C))
        for t in prange(nt):
            for r in range(t * NC // nt, (t + 1) * NC // nt):
                c = r % C
                m = mh[c]
                lo1 = ml[c]
                r1 = rsc[c]
                a1 = aa[c]
                xr = x[r]
                gr = dy[r]
                dxr = dx[r]
                sd = 0.0
                sdx = 0.0
                for k0 in range(0, S, BLOCK):
                    k1 = min(k0 + BLOCK, S)
                    xs = xr[k0:k1]  # 0-based loops over slices vectorize
                    gs = gr[k0:k1]
                    dxs = dxr[k0:k1]
                    bsd = T(0)
                    bsdx = T(0)
                    for k in range(k1 - k0):
                        d = gs[k]
                        bsd += d
                        bsdx += d * ((xs[k] - m) * r1 - lo1)
                        dxs[k] = a1 * d
                    sd += bsd
                    sdx += bsdx
                pd[t, c] += sd
                pdx[t, c] += sdx
        for c in range(C):
            a1 = 0.0
            a2 = 0.0
            for t in range(nt):
                a1 += pd[t, c]
                a2 += pdx[t, c]
            dw[c] = a2
            db[c] = a1
        return
    for t in prange(nt):
        for c in range(t * C // nt, (t + 1) * C // nt):
            mu = mean[c]
            rs = rstd[c]
            mhi, lo = split_mean(mu, x)
            rsT = T(rs)
            loT = T(lo * rs)
            wc = np.float64(w[c])
            sd = 0.0
            sdx = 0.0
            for n in range(N):
                xr = x[n * C + c]
                gr = dy[n * C + c]
                for k0 in range(0, S, BLOCK):
                    k1 = min(k0 + BLOCK, S)
                    xs = xr[k0:k1]  # 0-based loops over slices vectorize
                    gs = gr[k0:k1]
                    bsd = T(0)
                    bsdx = T(0)
                    for k in range(k1 - k0):
                        d = gs[k]
                        bsd += d
                        bsdx += d * ((xs[k] - mhi) * rsT - loT)
                    sd += bsd
                    sdx += bsdx
            # dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = w·dy (center: rstd = 1, no x̂ term)
            c1T = T(wc * sd / M)
            c2T = T(0.0 if center else wc * sdx / M)
            wT = w[c]
            for n in range(N):
                xr = x[n * C + c]
                gr = dy[n * C + c]
                dxr = dx[n * C + c]
                for k in range(S):
                    xh = (xr[k] - mhi) * rsT - loT
                    dxr[k] = rsT * ((gr[k] * wT - c1T) - xh * c2T)
            dw[c] = sdx
            db[c] = sd
