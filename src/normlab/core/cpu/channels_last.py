"""Channels-last kernels: BatchNorm and GroupNorm / InstanceNorm on (N, S, C) memory.

x is the physical (N, H·W·…, C) layout of a channels_last tensor (or an (N, C) matrix), passed
as a 2-D (N·S, C) array (numba vectorizes rows of a 2-D array much better than 1-D slices of a
3-D one). Every row of C channels is contiguous, so all inner loops run along channels
(vectorized) and the statistics are per-channel partial sums over rows, merged afterwards:

* GroupNorm / InstanceNorm: statistics per (sample n, group g) over (S, C/G) blocks;
* BatchNorm: the same kernel on the (1, N·S, C) view with G = C (one group per channel).

Work items are (sample n, row chunk p), N·P of them, over ``prange``:

* P = 1 (group norm with enough samples): one item is one whole sample, so statistics,
  coefficients and output are computed inside ONE parallel region, and the second read of the
  sample comes from L2 when it fits (H·W·C·4 bytes up to ~1 MiB);
* P > 1 (batch norm, or few samples): the row chunks of a sample are merged between two
  parallel regions (statistics, then output), with Chan's formula across the channels of a
  group.

Passes over memory: forward = statistics (read x) + apply (read x, write y); backward =
Σdy, Σdy·x̂ (read x, dy) + dx (read x, dy, write dx). With P > 1 the second read comes from
DRAM for large tensors (batch statistics need the whole batch before the first output). Eval
mode: one pass forward, one fused pass backward.

Numerics: ``shared``; per-channel shift = the sample's first row; sums over ``ROWS`` rows in
the input dtype, then float64; an overflowing block (|x| ≳ 1e19 in float32) or NaN/Inf is
recomputed in float64 (``exact_sums``); the mean is split as m_hi + lo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import prange

from normlab.core.cpu.jit import helper, kernel
from normlab.core.cpu.plan import Plan
from normlab.core.cpu.shared import (affine_coefs, dx_value, exact_sums, overflow_bound,
                                     sum_partials, xhat, xhat_coefs)
from normlab.core.cpu.threads import launch

__all__ = ["ChannelsLastPlan", "cl_fwd", "cl_bwd", "ROWS", "row_chunks"]

ROWS = 16  # rows summed in the input dtype before the per-channel float64 accumulation


# --------------------------------------------------------------------------------------------
# building blocks (serial; called inside the parallel loops)
# --------------------------------------------------------------------------------------------


@helper
def _moments(x, row0, r0, r1, q1, q2):
    """q1[c] += Σ (x − x[row0, c]), q2[c] += Σ (x − x[row0, c])² over rows [r0, r1)."""
    C = x.shape[1]
    T = x.dtype.type
    big = overflow_bound(x)
    sh = x[row0]
    b1 = np.zeros(C, x.dtype)
    b2 = np.zeros(C, x.dtype)
    for k0 in range(r0, r1, ROWS):
        k1 = min(k0 + ROWS, r1)
        s = k0
        while s + 4 <= k1:  # 4 rows per pass: one load/store of the block sums per 4 elements
            x0 = x[s]
            x1 = x[s + 1]
            x2 = x[s + 2]
            x3 = x[s + 3]
            for c in range(C):
                d0 = x0[c] - sh[c]
                d1 = x1[c] - sh[c]
                d2 = x2[c] - sh[c]
                d3 = x3[c] - sh[c]
                b1[c] += (d0 + d1) + (d2 + d3)
                b2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            s += 4
        for s2 in range(s, k1):
            xr = x[s2]
            for c in range(C):
                d = xr[c] - sh[c]
                b1[c] += d
                b2[c] += d * d
        for c in range(C):
            if b2[c] <= big:  # False for +inf and NaN (np.isfinite is unsafe under reassoc)
                q1[c] += b1[c]
                q2[c] += b2[c]
            else:  # d² overflowed the input dtype, or NaN/Inf: redo in float64
                q1[c], q2[c] = exact_sums(x[k0:k1, c], sh[c], q1[c], q2[c])
            b1[c] = T(0)
            b2[c] = T(0)


@helper
def _group_stats(x, row0, S, q1, q2, groups, mean, var):
    """Per-group (mean, biased var) of one sample from its per-channel shifted sums (Chan)."""
    C = x.shape[1]
    Cg = C // groups
    for g in range(groups):
        tot = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            tot += np.float64(x[row0, c]) + q1[c] / S
        mu = tot / Cg
        m2 = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            dm = np.float64(x[row0, c]) + q1[c] / S - mu
            m2 += (q2[c] - q1[c] * q1[c] / S) + S * dm * dm
        v = m2 / (S * Cg)
        if v < 0.0:
            v = 0.0
        mean[g] = mu
        var[g] = v


@helper
def _apply(x, y, r0, r1, mh, aa, bb):
    C = x.shape[1]
    s = r0
    while s + 2 <= r1:  # 2 rows per pass share the coefficient loads
        x0 = x[s]
        x1 = x[s + 1]
        y0 = y[s]
        y1 = y[s + 1]
        for c in range(C):
            m = mh[c]
            a = aa[c]
            bc = bb[c]
            y0[c] = (x0[c] - m) * a + bc
            y1[c] = (x1[c] - m) * a + bc
        s += 2
    if s < r1:
        xr = x[s]
        yr = y[s]
        for c in range(C):
            yr[c] = (xr[c] - mh[c]) * aa[c] + bb[c]


@helper
def _grad_sums(x, dy, dx, r0, r1, mh, ml, rsc, aa, eval_mode, q1, q2):
    """q1[c] += Σ dy, q2[c] += Σ dy·x̂ over rows [r0, r1); eval_mode also writes dx = a·dy."""
    C = x.shape[1]
    T = x.dtype.type
    b1 = np.zeros(C, x.dtype)
    b2 = np.zeros(C, x.dtype)
    for k0 in range(r0, r1, ROWS):
        k1 = min(k0 + ROWS, r1)
        if eval_mode:
            for s in range(k0, k1):
                xr = x[s]
                gr = dy[s]
                dxr = dx[s]
                for c in range(C):
                    d = gr[c]
                    b1[c] += d
                    b2[c] += d * xhat(xr[c], mh[c], rsc[c], ml[c])
                    dxr[c] = aa[c] * d
        else:
            s = k0
            while s + 2 <= k1:  # 2 rows per pass: half the loads/stores of the block sums
                x0 = x[s]
                x1 = x[s + 1]
                g0 = dy[s]
                g1 = dy[s + 1]
                for c in range(C):
                    m = mh[c]
                    r = rsc[c]
                    lo = ml[c]
                    e0 = g0[c]
                    e1 = g1[c]
                    b1[c] += e0 + e1
                    b2[c] += e0 * xhat(x0[c], m, r, lo) + e1 * xhat(x1[c], m, r, lo)
                s += 2
            if s < k1:
                xr = x[s]
                gr = dy[s]
                for c in range(C):
                    d = gr[c]
                    b1[c] += d
                    b2[c] += d * xhat(xr[c], mh[c], rsc[c], ml[c])
        for c in range(C):
            q1[c] += b1[c]
            q2[c] += b2[c]
            b1[c] = T(0)
            b2[c] = T(0)


@helper
def _bwd_coefs(x, S, groups, center, w, sd, sdx, wv, c1, c2):
    """dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = w·dy, means over the group (per channel).

    Same expression and rounding as the reference, so exact cancellations (groups of one
    element) stay exact. center: rstd = 1 and no x̂ term.
    """
    C = x.shape[1]
    T = x.dtype.type
    Cg = C // groups
    M = S * Cg
    for g in range(groups):
        sg = 0.0
        sgx = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            wc = np.float64(w[c])
            sg += wc * sd[c]
            sgx += wc * sdx[c]
        for c in range(g * Cg, (g + 1) * Cg):
            wv[c] = w[c]
            c1[c] = T(sg / M)
            c2[c] = T(0.0 if center else sgx / M)


@helper
def _apply_bwd(x, dy, dx, r0, r1, mh, ml, rsc, wv, c1, c2):
    C = x.shape[1]
    s = r0
    while s + 2 <= r1:  # 2 rows per pass share the coefficient loads
        x0 = x[s]
        x1 = x[s + 1]
        g0 = dy[s]
        g1 = dy[s + 1]
        d0 = dx[s]
        d1 = dx[s + 1]
        for c in range(C):
            m = mh[c]
            r = rsc[c]
            lo = ml[c]
            wc = wv[c]
            k1 = c1[c]
            k2 = c2[c]
            d0[c] = dx_value(xhat(x0[c], m, r, lo), g0[c], wc, r, k1, k2)
            d1[c] = dx_value(xhat(x1[c], m, r, lo), g1[c], wc, r, k1, k2)
        s += 2
    if s < r1:
        xr = x[s]
        gr = dy[s]
        dxr = dx[s]
        for c in range(C):
            dxr[c] = dx_value(xhat(xr[c], mh[c], rsc[c], ml[c]), gr[c], wv[c], rsc[c], c1[c], c2[c])


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@kernel
def cl_fwd(x, N, w, b, groups, train, center, eps, P, y, mean, var, rstd):
    """y = ((x − μ)·rstd)·w_c + b_c for x viewed as (N·S, C) (row n·S + s).

    Statistics per (n, g): mean/var/rstd (N, G) float64. train: μ, σ² computed into
    mean/var; otherwise read from them. center: rstd = 1, w ones. P: row chunks per sample.
    """
    NS, C = x.shape
    S = NS // N
    if P == 1:  # one sample per work item: a single parallel region
        for n in prange(N):
            q1 = np.zeros(C)
            q2 = np.zeros(C)
            if train:
                _moments(x, n * S, n * S, (n + 1) * S, q1, q2)
                _group_stats(x, n * S, S, q1, q2, groups, mean[n], var[n])
            mh = np.empty(C, x.dtype)
            aa = np.empty(C, x.dtype)
            bb = np.empty(C, x.dtype)
            affine_coefs(x, mean[n], var[n], rstd[n], w, b, eps, center, mh, aa, bb)
            _apply(x, y, n * S, (n + 1) * S, mh, aa, bb)
        return
    NP = N * P
    if train:
        p1 = np.zeros((NP, C))
        p2 = np.zeros((NP, C))
        for i in prange(NP):
            n = i // P
            p = i % P
            _moments(x, n * S, n * S + p * S // P, n * S + (p + 1) * S // P, p1[i], p2[i])
        for n in range(N):
            q1 = np.zeros(C)
            q2 = np.zeros(C)
            for p in range(P):
                for c in range(C):
                    q1[c] += p1[n * P + p, c]
                    q2[c] += p2[n * P + p, c]
            _group_stats(x, n * S, S, q1, q2, groups, mean[n], var[n])
    mh = np.empty((N, C), x.dtype)
    aa = np.empty((N, C), x.dtype)
    bb = np.empty((N, C), x.dtype)
    for n in range(N):
        affine_coefs(x, mean[n], var[n], rstd[n], w, b, eps, center, mh[n], aa[n], bb[n])
    for i in prange(NP):
        n = i // P
        p = i % P
        _apply(x, y, n * S + p * S // P, n * S + (p + 1) * S // P, mh[n], aa[n], bb[n])


@kernel
def cl_bwd(x, dy, N, w, groups, train, center, P, mean, rstd, dx, dw, db):
    """dx (N·S, C) like x; dw = Σ dy·x̂, db = Σ dy per channel (any float dtype).

    train: statistics depend on x (full backward); otherwise constants (eval: dx = a·dy,
    one fused pass). center: mean-only (rstd = 1, w = 1, no variance term).
    """
    NS, C = x.shape
    S = NS // N
    NP = N * P
    pd = np.zeros((NP, C))
    pdx = np.zeros((NP, C))
    if P == 1:  # one sample per work item: a single parallel region
        for n in prange(N):
            mh = np.empty(C, x.dtype)
            ml = np.empty(C, x.dtype)
            rsc = np.empty(C, x.dtype)
            aa = np.empty(C, x.dtype)
            xhat_coefs(x, mean[n], rstd[n], w, mh, ml, rsc, aa)
            _grad_sums(x, dy, dx, n * S, (n + 1) * S, mh, ml, rsc, aa, not train, pd[n], pdx[n])
            if train:
                wv = np.empty(C, x.dtype)
                c1 = np.empty(C, x.dtype)
                c2 = np.empty(C, x.dtype)
                _bwd_coefs(x, S, groups, center, w, pd[n], pdx[n], wv, c1, c2)
                _apply_bwd(x, dy, dx, n * S, (n + 1) * S, mh, ml, rsc, wv, c1, c2)
    else:
        mh = np.empty((N, C), x.dtype)
        ml = np.empty((N, C), x.dtype)
        rsc = np.empty((N, C), x.dtype)
        aa = np.empty((N, C), x.dtype)
        for n in range(N):
            xhat_coefs(x, mean[n], rstd[n], w, mh[n], ml[n], rsc[n], aa[n])
        for i in prange(NP):
            n = i // P
            p = i % P
            _grad_sums(x, dy, dx, n * S + p * S // P, n * S + (p + 1) * S // P, mh[n], ml[n],
                       rsc[n], aa[n], not train, pd[i], pdx[i])
        if train:
            sd = np.zeros((N, C))
            sdx = np.zeros((N, C))
            for i in range(NP):
                for c in range(C):
                    sd[i // P, c] += pd[i, c]
                    sdx[i // P, c] += pdx[i, c]
            wv = np.empty((N, C), x.dtype)
            c1 = np.empty((N, C), x.dtype)
            c2 = np.empty((N, C), x.dtype)
            for n in range(N):
                _bwd_coefs(x, S, groups, center, w, sd[n], sdx[n], wv[n], c1[n], c2[n])
            for i in prange(NP):
                n = i // P
                p = i % P
                _apply_bwd(x, dy, dx, n * S + p * S // P, n * S + (p + 1) * S // P, mh[n],
                           ml[n], rsc[n], wv[n], c1[n], c2[n])
    sum_partials(pdx, pd, dw, db)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def row_chunks(n: int, rows: int, nt: int) -> int:
    """Row chunks per sample: 1 (whole samples, one parallel region) when the n samples
    already split well over nt threads, else enough chunks to balance."""
    if nt <= 1 or n % nt == 0 or n >= 4 * nt:
        return 1
    return max(1, min(rows, nt // math.gcd(n, nt)))


@dataclass(frozen=True)
class ChannelsLastPlan(Plan):
    """(N, S, C) memory, ``shape2 = (N·S, C)``, statistics per (sample, group of C/G channels):
    group/instance norm on channels-last input, and batch norm as N = 1, G = C (on
    channels-last input, or on an (N, C) matrix)."""

    n: int = 1
    groups: int = 1
    center: bool = False

    def fwd(self, xa, w, b, nt, ya, mean, var, rstd) -> None:
        n, g = self.n, self.groups
        launch(cl_fwd, xa, n, w, b, g, self.train, self.center, self.eps,
               row_chunks(n, xa.shape[0] // n, nt), ya, mean.reshape(n, g), var.reshape(n, g),
               rstd.reshape(n, g))

    def bwd(self, xa, dya, w, mean, rstd, nt, dxa, dw, db) -> None:
        n, g = self.n, self.groups
        launch(cl_bwd, xa, dya, n, w, g, self.train, self.center, row_chunks(n, xa.shape[0] // n, nt),
               mean.reshape(n, g), rstd.reshape(n, g), dxa, dw, db)
