"""The numerics every kernel family shares, written once (numba; see ``jit`` for the flags).

Statistics (forward)
    Shifted sums: d = x − sh with sh a value of the group (its first element), Σd and Σd² in
    float64. Contiguous runs are summed ``BLOCK`` elements at a time in the input dtype
    (vectorized, a handful of terms per lane) and each block sum is added to the float64 totals
    (``shifted_sums``). A block whose Σd² exceeds ``overflow_bound`` or is not a number
    (|x| ≳ 1e19 in float32, or a NaN/Inf input) is summed again in float64 (``exact_sums``), so
    |x| ≈ 1e30 is exact in float32 and NaN still propagates. Then μ = sh + Σd/n and
    σ² = max(Σd²/n − (Σd/n)², 0) (``mean_var``).

Normalized values
    μ is split as μ = m_hi + lo with m_hi = fl(μ) (``split_mean``): ``x − m_hi`` is exact when x
    is near the mean (Sterbenz), and the small remainder is applied scaled,
    x̂ = (x − m_hi)·rstd − lo·rstd (``xhat``), or folded into the bias of the forward,
    y = (x − m_hi)·a + (β − lo·a) with a = rstd·γ (``fold_affine``, ``affine_run``). An offset of
    1e6 with std 0.1 keeps full precision in float32 arithmetic, and nothing overflows or
    underflows for |x| ≈ 1e30 (x − m_hi is scaled before anything else).

Backward
    dx = rstd·((g − c1) − x̂·c2) with g = γ·dy, c1 = mean(g), c2 = mean(g·x̂) over the statistic
    group (``dx_value``; c1 = 0 for RMS, c2 = 0 for mean-only). It is the reference's expression
    and rounding, so exact cancellations (a group of one element) stay exact. Σdy and Σdy·x̂ of a
    contiguous run are block sums like the statistics (``grad_sums``). dγ/dβ are accumulated
    per thread (or per work item) in float64 and added up once at the end (``sum_partials``).
"""

from __future__ import annotations

import numpy as np

from normlab.core.cpu.jit import helper, inline, strict

__all__ = ["BLOCK", "overflow_bound", "exact_sums", "shifted_sums", "mean_var", "split_mean",
           "xhat_consts", "xhat", "fold_affine", "affine_run", "grad_sums", "dx_value", "dx_run",
           "sum_partials", "affine_coefs", "xhat_coefs"]

# Elements summed in the input dtype before the block sum is added to a float64 accumulator.
# Within a block LLVM spreads the sum over 16-64 vector lanes, so each lane adds only a handful
# of terms: float32 block sums are as accurate as a float64 sum for all practical purposes,
# while the float64 accumulation across blocks keeps long rows (and 1e6 offsets) exact.
BLOCK = 512


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


@inline
def overflow_bound(x):
    """Block sums of squares above this (in x's dtype) are redone in float64."""
    T = x.dtype.type
    return T(1e38) if x.itemsize == 4 else T(1e307)


@inline
def exact_sums(xs, sh, s1, s2):
    """(s1 + Σ(x − sh), s2 + Σ(x − sh)²) over the 1-D array xs, in float64 throughout.

    The fallback for a block whose input-dtype sum overflowed or is not a number.
    """
    sh64 = np.float64(sh)
    for k in range(xs.shape[0]):
        d64 = np.float64(xs[k]) - sh64
        s1 += d64
        s2 += d64 * d64
    return s1, s2


@inline
def shifted_sums(xs, sh, big, s1, s2):
    """(s1 + Σ(x − sh), s2 + Σ(x − sh)²) over the contiguous 1-D array xs.

    Blocks of ``BLOCK`` elements are summed in the input dtype, then added in float64; a block
    whose Σd² is above ``big`` or not a number is summed again by ``exact_sums``.
    """
    T = xs.dtype.type
    n = xs.shape[0]
    for k0 in range(0, n, BLOCK):
        k1 = min(k0 + BLOCK, n)
        xb = xs[k0:k1]  # 0-based loops over slices: LLVM vectorizes them
        b1 = T(0)
        b2 = T(0)
        for k in range(k1 - k0):
            d = xb[k] - sh
            b1 += d
            b2 += d * d
        if b2 <= big:  # False for +inf and NaN (not np.isfinite: see jit)
            s1 += b1
            s2 += b2
        else:  # d² overflowed the input dtype, or NaN/Inf input
            s1, s2 = exact_sums(xb, sh, s1, s2)
    return s1, s2


@inline
def mean_var(s1, s2, count, sh):
    """(μ, biased σ²) of ``count`` values from their shifted sums: μ = sh + Σd/n,
    σ² = max(Σd²/n − (Σd/n)², 0)."""
    m = s1 / count
    v = s2 / count - m * m
    if v < 0.0:
        v = 0.0
    return np.float64(sh) + m, v


@strict
def split_mean(mu, x):
    """(hi, lo): hi = μ rounded to x's dtype, lo = μ − hi exactly (float64).

    Compiled WITHOUT fast-math flags: under ``reassoc`` LLVM folds ``μ − fpext(fptrunc(μ))``
    to 0, which would silently drop the part of the mean below float32 resolution (0.06 at
    an offset of 1e6). LLVM keeps per-instruction flags when it inlines this into a kernel.
    """
    hi = x.dtype.type(mu)
    return hi, mu - np.float64(hi)


# --------------------------------------------------------------------------------------------
# normalized values and the forward output
# --------------------------------------------------------------------------------------------


@inline
def xhat_consts(mu, rs, x):
    """(m_hi, rstd, lo·rstd) in x's dtype: x̂ = (x − m_hi)·rstd − lo·rstd (see ``xhat``)."""
    T = x.dtype.type
    mhi, lo = split_mean(mu, x)
    return mhi, T(rs), T(lo * rs)


@inline
def xhat(x, mhi, rs, lo):
    """x̂ = (x − m_hi)·rstd − lo·rstd, with ``lo`` already scaled by rstd."""
    return (x - mhi) * rs - lo


@inline
def fold_affine(lo, rs, w, b, x):
    """(a, b') in x's dtype with y = (x − m_hi)·a + b', a = rstd·γ, b' = β − lo·a (μ = m_hi + lo)."""
    T = x.dtype.type
    a = rs * w
    return T(a), T(b - lo * a)


@inline
def affine_run(xs, ys, mhi, a, b):
    """ys = (xs − m_hi)·a + b' over a contiguous run."""
    for k in range(xs.shape[0]):
        ys[k] = (xs[k] - mhi) * a + b


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@inline
def grad_sums(xs, gs, mhi, rs, lo, sd, sdx):
    """(sd + Σ dy, sdx + Σ dy·x̂) over contiguous runs xs, gs (= dy): block sums in the input
    dtype, added in float64."""
    T = xs.dtype.type
    n = xs.shape[0]
    for k0 in range(0, n, BLOCK):
        k1 = min(k0 + BLOCK, n)
        xb = xs[k0:k1]  # 0-based loops over slices vectorize
        gb = gs[k0:k1]
        bsd = T(0)
        bsdx = T(0)
        for k in range(k1 - k0):
            d = gb[k]
            bsd += d
            bsdx += d * xhat(xb[k], mhi, rs, lo)
        sd += bsd
        sdx += bsdx
    return sd, sdx


@inline
def dx_value(xh, dy, w, rs, c1, c2):
    """dx = rstd·((γ·dy − c1) − x̂·c2): c1 = mean(g), c2 = mean(g·x̂) over the group."""
    return rs * ((dy * w - c1) - xh * c2)


@helper
def sum_partials(pw, pb, dw, db):
    """dw = Σ_i pw[i], db = Σ_i pb[i] over the partials' first axis (float64 totals, stored once
    into dw/db, which may be float32). Summed in order of i for every parameter."""
    P = pw.shape[1]
    tw = np.zeros(P)
    tb = np.zeros(P)
    for i in range(pw.shape[0]):
        for k in range(P):
            tw[k] += pw[i, k]
            tb[k] += pb[i, k]
    for k in range(P):
        dw[k] = tw[k]
        db[k] = tb[k]


@inline
def dx_run(xs, gs, dxs, w, mhi, rs, lo, c1, c2):
    """dx over a contiguous run of one channel (scalar γ): ``dx_value`` of each element."""
    for k in range(xs.shape[0]):
        dxs[k] = dx_value(xhat(xs[k], mhi, rs, lo), gs[k], w, rs, c1, c2)


# --------------------------------------------------------------------------------------------
# per-channel coefficients of one statistic group per entry of mean/var/rstd
# --------------------------------------------------------------------------------------------


@helper
def affine_coefs(x, mean, var, rstd, w, b, eps, center, mh, aa, bb):
    """Forward coefficients per channel, y = (x − m_hi)·a + b' (``fold_affine``), for the
    G = len(mean) groups of C/G consecutive channels; writes rstd per group (1 for center)."""
    C = mh.shape[0]
    groups = mean.shape[0]
    Cg = C // groups
    for g in range(groups):
        rs = 1.0 if center else 1.0 / np.sqrt(var[g] + eps)
        rstd[g] = rs
        hi, lo = split_mean(mean[g], x)
        for c in range(g * Cg, (g + 1) * Cg):
            a, bc = fold_affine(lo, rs, w[c], b[c], x)
            mh[c] = hi
            aa[c] = a
            bb[c] = bc


@helper
def xhat_coefs(x, mean, rstd, w, mh, ml, rsc, aa):
    """Backward coefficients per channel (m_hi, lo·rstd, rstd, rstd·γ) in x's dtype, for the
    G = len(mean) groups of C/G consecutive channels."""
    T = x.dtype.type
    C = mh.shape[0]
    groups = mean.shape[0]
    Cg = C // groups
    for g in range(groups):
        hi, rsT, loT = xhat_consts(mean[g], rstd[g], x)
        for c in range(g * Cg, (g + 1) * Cg):
            mh[c] = hi
            ml[c] = loT
            rsc[c] = rsT
            aa[c] = T(rstd[g] * w[c])
