"""Row kernels: LayerNorm, RMSNorm, and GroupNorm / InstanceNorm on contiguous (NCHW) input.

Every one of these has its statistics over one contiguous run of memory per "row":

* LayerNorm / RMSNorm: x viewed as (R, L), a row is one sample's normalized dims; the affine
  parameters are per column (``seg == 0``).
* GroupNorm (NCHW contiguous): x viewed as (N·G, C/G·HW); a row is one (sample, group) and is
  made of C/G segments of ``seg = HW`` elements, one per channel; the affine parameters are per
  channel ``c = (r % G)·C/G + k // seg``. InstanceNorm is G = C (one segment per row).

Passes over memory (per row, rows split evenly over the threads with ``prange``):

* forward: statistics (reads the row), then y = (x − m_hi)·a + b' (reads it again,
  from L1/L2 since a row is at most a few hundred KiB, and writes y): one read and one write of
  DRAM per element — the minimum.
* backward: the two sums Σg and Σg·x̂ (reads x and dy) while accumulating the per-thread dγ/dβ
  partials, then dx (re-reads the row from cache, writes dx): one DRAM read of x and dy and one
  write of dx. The per-thread partials are added up once at the end.

Numerics (float32 input; float64 runs the same code in float64):

* statistics are shifted sums (shift = the row's first element for the mean/variance, none for
  RMS); each block of ``BLOCK`` elements is summed in the input dtype (vectorized, a handful of
  terms per lane) and the block sums are accumulated in float64. A block whose sum of squares
  exceeds ``BIG`` or is not a number (|x| ≳ 1e19 in float32, or a NaN/Inf) is recomputed in
  float64, so |x| ≈ 1e30 is exact and NaN still propagates;
* the mean is split as μ = m_hi + lo with m_hi = fl(μ) (``split_mean``): ``x − m_hi`` is exact
  when x is near the mean (Sterbenz), and the small remainder is applied scaled, as
  x̂ = (x − m_hi)·rstd − lo·rstd (or folded into the bias: y = (x − m_hi)·a + (β − lo·a)), so an
  offset of 1e6 with std 0.1 keeps full precision in float32 arithmetic, and nothing overflows
  or underflows for |x| ≈ 1e30 (x − m_hi is scaled before anything else);
* dγ/dβ partials are summed in the input dtype over ``ROW_BLOCK`` rows, then in float64.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.core.cpu_kernels_common import BLOCK, kernel, split_mean

__all__ = ["rows_fwd", "rows_bwd", "ROW_BLOCK"]

ROW_BLOCK = 16


@kernel
def rows_fwd(x, w, b, seg, groups, rms, eps, nt, y, mean, var, rstd):
    """Normalize each row of x (R, L) into y; mean/var/rstd (R,) float64 outputs.

    seg == 0: w, b have length L (per column). seg > 0: w, b have length groups·(L // seg)
    and row r uses channels (r % groups)·(L // seg) + j. rms: no centring, var = mean(x²).
    nt: number of thread chunks (<= numba's thread count and <= R); passed in because calling
    numba.get_num_threads() inside a kernel makes it uncacheable ("dynamic globals").
    """
    R, L = x.shape
    T = x.dtype.type
    BIG = T(1e38) if x.itemsize == 4 else T(1e307)  # block sums above: redo in float64
    for t in prange(nt):
        for r in range(t * R // nt, (t + 1) * R // nt):
            xr = x[r]
            yr = y[r]
            sh = T(0) if rms else xr[0]
            s1 = 0.0
            s2 = 0.0
            for k0 in range(0, L, BLOCK):
                xs = xr[k0:k0 + BLOCK]  # 0-based loops over slices: LLVM vectorizes them
                b1 = T(0)
                b2 = T(0)
                for k in range(xs.shape[0]):
                    d = xs[k] - sh
                    b1 += d
                    b2 += d * d
                if b2 <= BIG:  # False for +inf and NaN (not np.isfinite: see common)
                    s1 += b1
                    s2 += b2
                else:  # overflow of d² in the input dtype, or NaN/Inf input: redo in float64
                    sh64 = np.float64(sh)
                    for k in range(xs.shape[0]):
                        d64 = np.float64(xs[k]) - sh64
                        s1 += d64
                        s2 += d64 * d64
            m = s1 / L
            if rms:
                v = s2 / L
                mu = 0.0
            else:
                v = s2 / L - m * m
                if v < 0.0:
                    v = 0.0
                mu = np.float64(sh) + m
            rs = 1.0 / np.sqrt(v + eps)
            mean[r] = mu
            var[r] = v
            rstd[r] = rs
            mhi, lo = split_mean(mu, x)
            rsT = T(rs)
            if seg == 0:
                loT = T(lo * rs)
                for k in range(L):
                    yr[k] = ((xr[k] - mhi) * rsT - loT) * w[k] + b[k]
            else:
                J = L // seg
                c0 = (r % groups) * J
                for j in range(J):
                    a = rs * w[c0 + j]
                    aT = T(a)
                    bT = T(b[c0 + j] - lo * a)
                    xs = xr[j * seg:(j + 1) * seg]
                    ys = yr[j * seg:(j + 1) * seg]
                    for k in range(seg):
                        ys[k] = (xs[k] - mhi) * aT + bT


@kernel
def rows_bwd(x, dy, w, seg, groups, rms, mean, rstd, nt, dx, dw, db):
    """dx (R, L); dw = Σ dy·x̂ and db = Σ dy per parameter (len(w)), any float dtype.

    nt thread chunks each accumulate float64 partials of dγ/dβ (per-column: summed in the
    input dtype over ROW_BLOCK rows first); the partials are added up at the end.
    """
    R, L = x.shape
    T = x.dtype.type
    P = w.shape[0]
    dwp = np.zeros((nt, P))
    dbp = np.zeros((nt, P))
    PB = P if seg == 0 else 0  # block buffers only for the per-column case
    dwb = np.zeros((nt, PB), x.dtype)
    dbb = np.zeros((nt, PB), x.dtype)
    for t in prange(nt):
        pw = dwp[t]
        pb = dbp[t]
        bw = dwb[t]
        bb = dbb[t]
        pending = 0
        for r in range(t * R // nt, (t + 1) * R // nt):
            xr = x[r]
            gr = dy[r]
            dxr = dx[r]
            mu = mean[r]
            rs = rstd[r]
            mhi, lo = split_mean(mu, x)
            rsT = T(rs)
            loT = T(lo * rs)
            sg = 0.0
            sgx = 0.0
            if seg == 0:
                for k0 in range(0, L, BLOCK):
                    k1 = min(k0 + BLOCK, L)
                    xs = xr[k0:k1]
                    gs = gr[k0:k1]
                    ws = w[k0:k1]
                    bws = bw[k0:k1]
                    bbs = bb[k0:k1]
                    bsg = T(0)
                    bsgx = T(0)
                    for k in range(k1 - k0):
                        xh = (xs[k] - mhi) * rsT - loT
                        d = gs[k]
                        g = d * ws[k]
                        bsg += g
                        bsgx += g * xh
                        bws[k] += d * xh
                        bbs[k] += d
                    sg += bsg
                    sgx += bsgx
                pending += 1
                if pending == ROW_BLOCK:
                    for k in range(L):
                        pw[k] += bw[k]
                        pb[k] += bb[k]
                        bw[k] = T(0)
                        bb[k] = T(0)
                    pending = 0
                c1 = 0.0 if rms else sg / L
                c2 = sgx / L
                c1T = T(c1)
                c2T = T(c2)
                for k in range(L):
                    xh = (xr[k] - mhi) * rsT - loT
                    dxr[k] = rsT * ((gr[k] * w[k] - c1T) - xh * c2T)
            else:
                J = L // seg
                c0 = (r % groups) * J
                for j in range(J):
                    sd = 0.0
                    sdx = 0.0
                    for k0 in range(j * seg, (j + 1) * seg, BLOCK):
                        k1 = min(k0 + BLOCK, (j + 1) * seg)
                        xs = xr[k0:k1]
                        gs = gr[k0:k1]
                        bsd = T(0)
                        bsdx = T(0)
                        for k in range(k1 - k0):
                            d = gs[k]
                            bsd += d
                            bsdx += d * ((xs[k] - mhi) * rsT - loT)
                        sd += bsd
                        sdx += bsdx
                    wc = np.float64(w[c0 + j])
                    pw[c0 + j] += sdx
                    pb[c0 + j] += sd
                    sg += wc * sd
                    sgx += wc * sdx
                c1T = T(0.0 if rms else sg / L)
                c2T = T(sgx / L)
                for j in range(J):
                    wT = w[c0 + j]
                    xs = xr[j * seg:(j + 1) * seg]
                    gs = gr[j * seg:(j + 1) * seg]
                    dxs = dxr[j * seg:(j + 1) * seg]
                    for k in range(seg):
                        xh = (xs[k] - mhi) * rsT - loT
                        dxs[k] = rsT * ((gs[k] * wT - c1T) - xh * c2T)
        if pending > 0:
            for k in range(bw.shape[0]):
                pw[k] += bw[k]
                pb[k] += bb[k]
    for k in range(P):
        a1 = 0.0
        a2 = 0.0
        for t in range(nt):
            a1 += dwp[t, k]
            a2 += dbp[t, k]
        dw[k] = a1
        db[k] = a2
