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

Numerics: ``shared`` (shifted block sums with the float64 fallback, the mean split as
m_hi + lo, the backward formula); the shift is the row's first element (none for RMS).
Per-column dγ/dβ partials are summed in the input dtype over ``ROW_BLOCK`` rows, then in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import prange

from normlab.core.cpu.jit import inline, kernel
from normlab.core.cpu.plan import Plan
from normlab.core.cpu.shared import (BLOCK, affine_run, dx_run, dx_value, fold_affine, grad_sums,
                                     mean_var, overflow_bound, shifted_sums, split_mean,
                                     sum_partials, xhat, xhat_consts)
from normlab.core.cpu.threads import launch

__all__ = ["RowsPlan", "rows_fwd", "rows_bwd", "ROW_BLOCK"]

ROW_BLOCK = 16


# --------------------------------------------------------------------------------------------
# building blocks (one row; inlined into the kernels' loops)
# --------------------------------------------------------------------------------------------


@inline
def _normalize_columns(xr, yr, w, b, mu, rs):
    """y = x̂·γ_k + β_k along the row (per-column affine: layer norm)."""
    mhi, rsT, loT = xhat_consts(mu, rs, xr)
    for k in range(xr.shape[0]):
        yr[k] = xhat(xr[k], mhi, rsT, loT) * w[k] + b[k]


@inline
def _normalize_segments(xr, yr, w, b, mu, rs, seg, c0):
    """y = (x − m_hi)·a_c + b'_c over the row's segments, channel c0 + j for segment j."""
    mhi, lo = split_mean(mu, xr)
    for j in range(xr.shape[0] // seg):
        a, bc = fold_affine(lo, rs, w[c0 + j], b[c0 + j], xr)
        affine_run(xr[j * seg:(j + 1) * seg], yr[j * seg:(j + 1) * seg], mhi, a, bc)


@inline
def _grad_columns(xr, gr, dxr, w, mhi, rsT, loT, rms, bw, bb):
    """dx of one row with a per-column affine; dγ/dβ of the row added to the block buffers."""
    T = xr.dtype.type
    L = xr.shape[0]
    sg = 0.0
    sgx = 0.0
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
            xh = xhat(xs[k], mhi, rsT, loT)
            d = gs[k]
            g = d * ws[k]
            bsg += g
            bsgx += g * xh
            bws[k] += d * xh
            bbs[k] += d
        sg += bsg
        sgx += bsgx
    c1T = T(0.0 if rms else sg / L)
    c2T = T(sgx / L)
    for k in range(L):
        dxr[k] = dx_value(xhat(xr[k], mhi, rsT, loT), gr[k], w[k], rsT, c1T, c2T)


@inline
def _grad_segments(xr, gr, dxr, w, mhi, rsT, loT, rms, seg, c0, pw, pb):
    """dx of one row made of per-channel segments; Σdy·x̂, Σdy added to the float64 partials."""
    T = xr.dtype.type
    L = xr.shape[0]
    J = L // seg
    sg = 0.0
    sgx = 0.0
    for j in range(J):
        sd, sdx = grad_sums(xr[j * seg:(j + 1) * seg], gr[j * seg:(j + 1) * seg], mhi, rsT, loT,
                            0.0, 0.0)
        wc = np.float64(w[c0 + j])
        pw[c0 + j] += sdx
        pb[c0 + j] += sd
        sg += wc * sd
        sgx += wc * sdx
    c1T = T(0.0 if rms else sg / L)
    c2T = T(sgx / L)
    for j in range(J):
        dx_run(xr[j * seg:(j + 1) * seg], gr[j * seg:(j + 1) * seg], dxr[j * seg:(j + 1) * seg],
               w[c0 + j], mhi, rsT, loT, c1T, c2T)


@inline
def _flush(bw, bb, pw, pb):
    """Add the input-dtype block buffers to the float64 partials and clear them."""
    T = bw.dtype.type
    for k in range(bw.shape[0]):
        pw[k] += bw[k]
        pb[k] += bb[k]
        bw[k] = T(0)
        bb[k] = T(0)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


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
    big = overflow_bound(x)
    for t in prange(nt):
        for r in range(t * R // nt, (t + 1) * R // nt):
            xr = x[r]
            sh = T(0) if rms else xr[0]
            s1, s2 = shifted_sums(xr, sh, big, 0.0, 0.0)
            if rms:
                mu = 0.0
                v = s2 / L
            else:
                mu, v = mean_var(s1, s2, L, sh)
            rs = 1.0 / np.sqrt(v + eps)
            mean[r] = mu
            var[r] = v
            rstd[r] = rs
            if seg == 0:
                _normalize_columns(xr, y[r], w, b, mu, rs)
            else:
                _normalize_segments(xr, y[r], w, b, mu, rs, seg, (r % groups) * (L // seg))


@kernel
def rows_bwd(x, dy, w, seg, groups, rms, mean, rstd, nt, dx, dw, db):
    """dx (R, L); dw = Σ dy·x̂ and db = Σ dy per parameter (len(w)), any float dtype.

    nt thread chunks each accumulate float64 partials of dγ/dβ (per-column: summed in the
    input dtype over ROW_BLOCK rows first); the partials are added up at the end.
    """
    R, L = x.shape
    P = w.shape[0]
    dwp = np.zeros((nt, P))
    dbp = np.zeros((nt, P))
    PB = P if seg == 0 else 0  # block buffers only for the per-column case
    dwb = np.zeros((nt, PB), x.dtype)
    dbb = np.zeros((nt, PB), x.dtype)
    for t in prange(nt):
        pending = 0
        for r in range(t * R // nt, (t + 1) * R // nt):
            mhi, rsT, loT = xhat_consts(mean[r], rstd[r], x)
            if seg == 0:
                _grad_columns(x[r], dy[r], dx[r], w, mhi, rsT, loT, rms, dwb[t], dbb[t])
                pending += 1
                if pending == ROW_BLOCK:
                    _flush(dwb[t], dbb[t], dwp[t], dbp[t])
                    pending = 0
            else:
                _grad_segments(x[r], dy[r], dx[r], w, mhi, rsT, loT, rms, seg,
                               (r % groups) * (L // seg), dwp[t], dbp[t])
        if pending > 0:
            _flush(dwb[t], dbb[t], dwp[t], dbp[t])
    sum_partials(dwp, dbp, dw, db)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowsPlan(Plan):
    """Rows of ``shape2 = (R, L)``: layer/RMS norm (``seg = 0``), or group/instance norm on
    NCHW memory (``seg = H·W``, ``groups`` = G)."""

    seg: int = 0
    groups: int = 1
    rms: bool = False

    @property
    def has_mean(self) -> bool:
        return not self.rms

    def fwd(self, xa, w, b, nt, ya, mean, var, rstd) -> None:
        launch(rows_fwd, xa, w, b, self.seg, self.groups, self.rms, self.eps, min(nt, xa.shape[0]),
               ya, mean, var, rstd)

    def bwd(self, xa, dya, w, mean, rstd, nt, dxa, dw, db) -> None:
        launch(rows_bwd, xa, dya, w, self.seg, self.groups, self.rms, mean, rstd,
               min(nt, xa.shape[0]), dxa, dw, db)
