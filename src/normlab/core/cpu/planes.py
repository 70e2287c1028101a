"""Plane kernels: BatchNorm on contiguous (NCHW-style) input: x viewed as (N·C, S), S = H·W·….

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

Numerics: ``shared`` (block sums in the input dtype, float64 across blocks, float64
recomputation of an overflowing block, mean split as m_hi + lo, the backward formula); the
shift is the channel's first element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import prange

from normlab.core.cpu.jit import inline, kernel
from normlab.core.cpu.plan import Plan
from normlab.core.cpu.shared import (BLOCK, affine_coefs, affine_run, dx_run, fold_affine,
                                     grad_sums, mean_var, overflow_bound, shifted_sums,
                                     split_mean, sum_partials, xhat, xhat_coefs, xhat_consts)
from normlab.core.cpu.threads import launch

__all__ = ["GhostPlanesPlan", "PlanesPlan", "planes_fwd", "planes_bwd"]


# --------------------------------------------------------------------------------------------
# building blocks (inlined into the kernels' loops)
# --------------------------------------------------------------------------------------------


@inline
def _train_channel(x, y, N, c, w, b, eps, center, big, mean, var, rstd):
    """Statistics of channel c (rows n·C + c of x), then its output."""
    C = x.shape[0] // N
    sh = x[c, 0]
    s1 = 0.0
    s2 = 0.0
    for n in range(N):
        s1, s2 = shifted_sums(x[n * C + c], sh, big, s1, s2)
    mu, v = mean_var(s1, s2, N * x.shape[1], sh)
    mean[c] = mu
    var[c] = v
    rs = 1.0 if center else 1.0 / np.sqrt(v + eps)
    rstd[c] = rs
    mhi, lo = split_mean(mu, x)
    a, bc = fold_affine(lo, rs, w[c], b[c], x)
    for n in range(N):
        affine_run(x[n * C + c], y[n * C + c], mhi, a, bc)


@inline
def _train_channel_grad(x, dy, dx, N, c, w, mean, rstd, center, dw, db):
    """Full batch-norm backward of channel c: the two sums, then dx; dγ/dβ of the channel."""
    T = x.dtype.type
    C = x.shape[0] // N
    M = N * x.shape[1]
    mhi, rsT, loT = xhat_consts(mean[c], rstd[c], x)
    sd = 0.0
    sdx = 0.0
    for n in range(N):
        sd, sdx = grad_sums(x[n * C + c], dy[n * C + c], mhi, rsT, loT, sd, sdx)
    wc = np.float64(w[c])
    # center: rstd = 1, no x̂ term
    c1T = T(wc * sd / M)
    c2T = T(0.0 if center else wc * sdx / M)
    for n in range(N):
        dx_run(x[n * C + c], dy[n * C + c], dx[n * C + c], w[c], mhi, rsT, loT, c1T, c2T)
    dw[c] = sdx
    db[c] = sd


@inline
def _eval_row_grad(xr, gr, dxr, m, r1, lo1, a1):
    """Eval backward of one row in one fused pass: dx = a·dy; returns (Σdy, Σdy·x̂) of the row."""
    T = xr.dtype.type
    S = xr.shape[0]
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
            bsdx += d * xhat(xs[k], m, r1, lo1)
            dxs[k] = a1 * d
        sd += bsd
        sdx += bsdx
    return sd, sdx


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@kernel
def planes_fwd(x, N, w, b, eps, train, center, nt, y, mean, var, rstd):
    """y = ((x − μ_c)·rstd_c)·w_c + b_c on x viewed as (N·C, S) (row n·C + c).

    train: μ, σ² (biased) computed into mean/var (C,) float64; otherwise read from them.
    center (mean-only BN): rstd = 1 and w must be ones. rstd (C,) float64 is written.
    """
    NC = x.shape[0]
    C = NC // N
    if not train:
        # eval: one streaming pass in memory order (rows n·C + c split evenly over threads),
        # which the prefetchers like better than channel-major strides when H·W is small
        mh = np.empty(C, x.dtype)
        aa = np.empty(C, x.dtype)
        bb = np.empty(C, x.dtype)
        affine_coefs(x, mean, var, rstd, w, b, eps, center, mh, aa, bb)
        for t in prange(nt):
            for r in range(t * NC // nt, (t + 1) * NC // nt):
                c = r % C
                affine_run(x[r], y[r], mh[c], aa[c], bb[c])
        return
    big = overflow_bound(x)
    for t in prange(nt):
        for c in range(t * C // nt, (t + 1) * C // nt):
            _train_channel(x, y, N, c, w, b, eps, center, big, mean, var, rstd)


@kernel
def planes_bwd(x, dy, N, w, mean, rstd, train, center, nt, dx, dw, db):
    """dx (N·C, S) like x, dw = Σ dy·x̂ and db = Σ dy per channel (C,) float64.

    train: the statistics depend on x (full batch-norm backward); otherwise they are
    constants (eval mode: dx = rstd·w·dy). center: mean-only batch norm (rstd = 1, w = 1).
    """
    NC = x.shape[0]
    C = NC // N
    if not train:
        # eval: dx = rstd·w·dy needs no sums first, so ONE pass in memory order; the per-channel
        # Σdy and Σdy·x̂ (for dγ, dβ) go to per-thread partials added up at the end
        mh = np.empty(C, x.dtype)
        ml = np.empty(C, x.dtype)
        rsc = np.empty(C, x.dtype)
        aa = np.empty(C, x.dtype)
        xhat_coefs(x, mean, rstd, w, mh, ml, rsc, aa)
        pd = np.zeros((nt, C))
        pdx = np.zeros((nt, C))
        for t in prange(nt):
            for r in range(t * NC // nt, (t + 1) * NC // nt):
                c = r % C
                sd, sdx = _eval_row_grad(x[r], dy[r], dx[r], mh[c], rsc[c], ml[c], aa[c])
                pd[t, c] += sd
                pdx[t, c] += sdx
        sum_partials(pdx, pd, dw, db)
        return
    for t in prange(nt):
        for c in range(t * C // nt, (t + 1) * C // nt):
            _train_channel_grad(x, dy, dx, N, c, w, mean, rstd, center, dw, db)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanesPlan(Plan):
    """Batch norm on (N, C, S) memory, ``shape2 = (N·C, S)``; channels split over the threads
    (training) or rows streamed in memory order (eval)."""

    n: int = 1
    center: bool = False

    def fwd(self, xa, w, b, nt, ya, mean, var, rstd) -> None:
        launch(planes_fwd, xa, self.n, w, b, self.eps, self.train, self.center,
               min(nt, xa.shape[0] // self.n), ya, mean, var, rstd)

    def bwd(self, xa, dya, w, mean, rstd, nt, dxa, dw, db) -> None:
        launch(planes_bwd, xa, dya, self.n, w, mean, rstd, self.train, self.center,
               min(nt, xa.shape[0] // self.n), dxa, dw, db)


@dataclass(frozen=True)
class GhostPlanesPlan(PlanesPlan):
    """Ghost batch norm on (N, C, S) memory: virtual batch j is the slab of rows j·g·C … (j+1)·g·C
    of ``shape2``, itself a batch-norm problem of g samples (``n = g``), so the planes kernels
    run on each slab's view, no copy; statistics (k, C), dγ/dβ summed over the k slabs."""

    k: int = 1

    def _slabs(self, xa):
        rows, c = xa.shape[0] // self.k, self.pcount
        return [(slice(j * rows, (j + 1) * rows), slice(j * c, (j + 1) * c)) for j in range(self.k)]

    def fwd(self, xa, w, b, nt, ya, mean, var, rstd) -> None:
        for r, s in self._slabs(xa):
            super().fwd(xa[r], w, b, nt, ya[r], mean[s], var[s], rstd[s])

    def bwd(self, xa, dya, w, mean, rstd, nt, dxa, dw, db) -> None:
        pw = np.empty((self.k, self.pcount), dw.dtype)
        pb = np.empty((self.k, self.pcount), db.dtype)
        for j, (r, s) in enumerate(self._slabs(xa)):
            super().bwd(xa[r], dya[r], w, mean[s], rstd[s], nt, dxa[r], pw[j], pb[j])
        dw[:] = pw.sum(0, dtype=np.float64)
        db[:] = pb.sum(0, dtype=np.float64)
