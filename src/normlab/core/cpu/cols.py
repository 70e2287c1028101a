"""Column kernels: channels-first LayerNorm (ConvNeXt's ``LayerNorm2d``) on contiguous (N, C, S) input.

The statistics of position s of sample n are over the C channels, which lie ``S`` elements apart;
the positions themselves are contiguous. So the kernels walk a block of ``POS_BLOCK`` positions
at a time and, channel by channel, accumulate per-position sums in small float64 arrays: every
inner loop runs along contiguous memory (vectorized), and a block (C × POS_BLOCK values) stays
in L1/L2 between the passes. (Channels-last input is plain rows, ``rows``.)

Passes over memory (per block, blocks split evenly over the threads with ``prange``):

* forward: the sums (reads the block), then y = (x − μ)·rstd·γ_c + β_c (reads it again from
  cache, writes y): one DRAM read and one write per element;
* backward: Σ_c g and Σ_c g·x̂ with g = γ_c·dy (reads x and dy) while the per-thread dγ/dβ
  partials accumulate, then dx (re-reads the block from cache, writes dx).

Numerics: the shift is the block's first channel (the rows kernels' shifted sums), the sums and
x − μ are float64 (so an offset of 1e6 and |x| ≈ 1e30 in float32 are exact; NaN propagates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import prange
from torch import Tensor

from normlab.core.cpu.jit import kernel
from normlab.core.cpu.params import NP_DTYPE, f64, param
from normlab.core.cpu.pool import pool
from normlab.core.cpu.shared import dx_value, mean_var, sum_partials
from normlab.core.cpu.threads import launch, threads

__all__ = ["ColsPlan", "cols_fwd", "cols_bwd", "POS_BLOCK"]

POS_BLOCK = 64


@kernel
def cols_fwd(x, w, b, eps, nt, y, mean, var, rstd):
    """Normalize x (N, C, S) over C into y; mean/var/rstd (N, S) float64 outputs."""
    N, C, S = x.shape
    T = x.dtype.type
    nb = (S + POS_BLOCK - 1) // POS_BLOCK
    units = N * nb
    for t in prange(nt):
        a1 = np.empty(POS_BLOCK)
        a2 = np.empty(POS_BLOCK)
        sh = np.empty(POS_BLOCK)
        mu = np.empty(POS_BLOCK)
        rs = np.empty(POS_BLOCK)
        for u in range(t * units // nt, (t + 1) * units // nt):
            n = u // nb
            s0 = (u % nb) * POS_BLOCK
            L = min(S, s0 + POS_BLOCK) - s0
            xn = x[n]
            first = xn[0, s0:s0 + L]
            for k in range(L):
                sh[k] = np.float64(first[k])
                a1[k] = 0.0
                a2[k] = 0.0
            for c in range(C):
                xr = xn[c, s0:s0 + L]
                for k in range(L):
                    d = np.float64(xr[k]) - sh[k]
                    a1[k] += d
                    a2[k] += d * d
            for k in range(L):
                m, v = mean_var(a1[k], a2[k], C, sh[k])
                mu[k] = m
                rs[k] = 1.0 / np.sqrt(v + eps)
                mean[n, s0 + k] = mu[k]
                var[n, s0 + k] = v
                rstd[n, s0 + k] = rs[k]
            yn = y[n]
            for c in range(C):
                xr = xn[c, s0:s0 + L]
                yr = yn[c, s0:s0 + L]
                wc = np.float64(w[c])
                bc = np.float64(b[c])
                for k in range(L):
                    yr[k] = T((np.float64(xr[k]) - mu[k]) * (rs[k] * wc) + bc)


@kernel
def cols_bwd(x, dy, w, mean, rstd, nt, dx, dw, db):
    """dx (N, C, S); dw = Σ dy·x̂ and db = Σ dy per channel (C,)."""
    N, C, S = x.shape
    T = x.dtype.type
    nb = (S + POS_BLOCK - 1) // POS_BLOCK
    units = N * nb
    pw = np.zeros((nt, C))
    pb = np.zeros((nt, C))
    for t in prange(nt):
        sg = np.empty(POS_BLOCK)
        sgx = np.empty(POS_BLOCK)
        mu = np.empty(POS_BLOCK)
        rs = np.empty(POS_BLOCK)
        for u in range(t * units // nt, (t + 1) * units // nt):
            n = u // nb
            s0 = (u % nb) * POS_BLOCK
            L = min(S, s0 + POS_BLOCK) - s0
            for k in range(L):
                mu[k] = mean[n, s0 + k]
                rs[k] = rstd[n, s0 + k]
                sg[k] = 0.0
                sgx[k] = 0.0
            xn = x[n]
            gn = dy[n]
            for c in range(C):
                xr = xn[c, s0:s0 + L]
                gr = gn[c, s0:s0 + L]
                wc = np.float64(w[c])
                accw = 0.0
                accb = 0.0
                for k in range(L):
                    xh = (np.float64(xr[k]) - mu[k]) * rs[k]
                    g = np.float64(gr[k])
                    sg[k] += g * wc
                    sgx[k] += g * wc * xh
                    accw += g * xh
                    accb += g
                pw[t, c] += accw
                pb[t, c] += accb
            for k in range(L):
                sg[k] /= C
                sgx[k] /= C
            dn = dx[n]
            for c in range(C):
                xr = xn[c, s0:s0 + L]
                gr = gn[c, s0:s0 + L]
                dr = dn[c, s0:s0 + L]
                wc = np.float64(w[c])
                for k in range(L):
                    xh = (np.float64(xr[k]) - mu[k]) * rs[k]
                    dr[k] = T(dx_value(xh, np.float64(gr[k]), wc, rs[k], sg[k], sgx[k]))
    sum_partials(pw, pb, dw, db)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColsPlan:
    """Channels-first layer norm of a contiguous (N, C, *S) tensor, seen as (N, C, S) arrays;
    statistics (N, S) float64. Work units are (sample, block of ``POS_BLOCK`` positions)."""

    n: int
    c: int
    s: int
    eps: float

    def _units(self, numel: int) -> int:
        return min(threads(numel), self.n * -(-self.s // POS_BLOCK))

    def forward(self, x: Tensor, weight, bias) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """(y like x, mean, var, rstd as (N, S) float64 arrays) of contiguous x."""
        n, c, s = self.n, self.c, self.s
        y = pool.empty(tuple(x.shape), x.stride(), x.dtype)
        mean, var, rstd = (np.empty((n, s)) for _ in range(3))
        launch(cols_fwd, x.numpy().reshape(n, c, s), param(weight, c, x.dtype, 1.0),
               param(bias, c, x.dtype, 0.0), self.eps, self._units(x.numel()),
               y.numpy().reshape(n, c, s), mean, var, rstd)
        return y, mean, var, rstd

    def backward(self, x: Tensor, dy: Tensor, weight, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dx like x, dγ, dβ in x's dtype) of contiguous x and dy."""
        n, c, s = self.n, self.c, self.s
        dx = pool.empty(tuple(x.shape), x.stride(), x.dtype)
        dw, db = np.empty(c, NP_DTYPE[x.dtype]), np.empty(c, NP_DTYPE[x.dtype])
        launch(cols_bwd, x.numpy().reshape(n, c, s), dy.numpy().reshape(n, c, s),
               param(weight, c, x.dtype, 1.0), f64(mean).reshape(n, s), f64(rstd).reshape(n, s),
               self._units(x.numel()), dx.numpy().reshape(n, c, s), dw, db)
        return dx, torch.from_numpy(dw), torch.from_numpy(db)
