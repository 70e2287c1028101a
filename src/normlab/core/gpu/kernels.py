"""The Triton kernels of the GPU backend: one set of strided, tiled reductions and point-wise passes
that every normalization of the backend is an instance of (see ``geometry``).

Every kernel sees its tensor through a *geometry*: a statistic group ``t`` (or a parameter ``p``)
and a position ``r`` inside it, each split into two coordinates, so that the address of element
(t, r) is::

    addr = (t // G2)·sg1 + (t % G2)·sg2 + (r // R2)·sr1 + (r % R2)·sr2

and a second linear index of the same coordinates (``aux``) says which parameter (or, for the
parameter-gradient reductions, which statistic group) the element belongs to. LayerNorm rows,
per-channel BatchNorm over NCHW or NHWC, GroupNorm/InstanceNorm in either layout and
channels-first LayerNorm are then only different integers (Triton specialises the integer
arguments equal to 1, so the // and % vanish where a coordinate is absent). A program handles a
(BG groups × BR positions) tile; when the groups are contiguous in memory the tile is wide along
the groups (coalesced NHWC access), otherwise along the positions.

Reductions are two-stage and deterministic: stage 1 writes one partial per (chunk of positions,
group) to a buffer, stage 2 (a finalize kernel) merges the partials in a fixed order. No atomics.

Numerics (as the core's reference): float32 accumulation for every input dtype; each chunk's
statistics are centred on the chunk's own mean (two passes over the chunk, the second reading it
from cache) and divided by a power of two ≥ max|x| when that exceeds 2⁶⁰, so neither an offset of
1e6 nor |x| ≈ 1e30 loses float32 precision or overflows; the finalize merges the chunks with the
shifted (Chan et al.) update. The mean is kept as (shift, correction) for normalizing, and the
backward recomputes the correction from the saved (rounded) mean. NaN/Inf propagate: no
fast-math, and clamps are ``where`` (NaN-preserving), not ``maximum``.
"""

from __future__ import annotations

import triton
import triton.language as tl

STANDARD, RMS, CENTER = 0, 1, 2  # the modes of the normalize routine (reference.py's three)
_BIG = 1.152921504606846976e18  # 2**60: above this max|x| the chunk is rescaled before squaring


@triton.jit
def _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2):
    t64 = t.to(tl.int64)
    r64 = r.to(tl.int64)
    tb = (t64 // G2) * sg1 + (t64 % G2) * sg2
    rb = (r64 // R2) * sr1 + (r64 % R2) * sr2
    return tb[:, None] + rb[None, :]


@triton.jit
def _aux(t, r, G2, R2, ag1, ag2, ar1, ar2):
    """A second linear index of (t, r): the parameter (or statistic group) of each element."""
    ta = (t // G2) * ag1 + (t % G2) * ag2
    ra = (r // R2) * ar1 + (r % R2) * ar2
    return ta[:, None] + ra[None, :]


@triton.jit
def stats_partial(X, PM, PS, PL, PQ, T, R, CH, G2, sg1, sg2, R2, sr1, sr2,
                  MODE: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    """Stage 1 of the statistics: for BG groups × one chunk [lo, lo+CH) of positions, the chunk's
    shift m (its mean; 0 for RMS), scale s (power of two, 1 unless max|x| > 2⁶⁰) and the sums
    L = Σ(x−m)/s, Q = Σ((x−m)/s)², written to row ``chunk`` of the (chunks, T) buffers."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    t = pid * BG + tl.arange(0, BG)
    tmask = t < T
    lo = j * CH
    hi = tl.minimum(lo + CH, R)
    n = (hi - lo) * 1.0
    acc = tl.zeros([BG], dtype=tl.float32)
    amax = tl.zeros([BG], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        mask = tmask[:, None] & (r < hi)[None, :]
        x = tl.load(X + _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2), mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=1)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    if MODE == 1:
        m = tl.zeros([BG], dtype=tl.float32)
    else:
        m = acc / n
    # |x − m| ≤ 2·max|x|: s = 2^(ceil(log2 max|x|) + 1) bounds it; non-finite groups keep s = 1
    # (their results are NaN/Inf as torch's, the scale would only change which).
    big = (amax > _BIG) & (amax < float("inf"))
    s = tl.where(big, tl.exp2(tl.ceil(tl.log2(tl.where(big, amax, 1.0))) + 1.0), 1.0)
    if MODE == 2:
        s = tl.full([BG], 1.0, dtype=tl.float32)
    inv = 1.0 / s  # exact: s is a power of two
    lsum = tl.zeros([BG], dtype=tl.float32)
    qsum = tl.zeros([BG], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        mask = tmask[:, None] & (r < hi)[None, :]
        x = tl.load(X + _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2), mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, (x - m[:, None]) * inv[:, None], 0.0)
        lsum += tl.sum(d, axis=1)
        qsum += tl.sum(d * d, axis=1)
    out = j * T + t
    tl.store(PM + out, m, mask=tmask)
    tl.store(PS + out, s, mask=tmask)
    tl.store(PL + out, lsum, mask=tmask)
    tl.store(PQ + out, qsum, mask=tmask)


@triton.jit
def stats_finalize(PM, PS, PL, PQ, SHIFT, CORR, MEAN, VAR, RSTD, T, R, CH, NCHUNK, eps,
                   MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 2: merge the chunk partials in chunk order. With G = Σ (n_j/n)·m_j and S = max s_j,
    in units of S: L = Σ σ_j L_j + n_j δ_j, Q = Σ σ_j² Q_j + 2 δ_j σ_j L_j + n_j δ_j²
    (δ_j = (m_j − G)/S, σ_j = s_j/S); corr = L/n, var/S² = Q/n − corr² (RMS: Q/n),
    rstd = 1 / (S·sqrt(var/S² + ε/S²)), mean = G + S·corr (G itself where G = ±Inf)."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tmask = t < T
    nf = R * 1.0  # (not .to: Triton passes R = 1 as a constant)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    big = tl.full([BLOCK], 1.0, dtype=tl.float32)
    for j in range(0, NCHUNK):
        nj = tl.minimum(CH, R - j * CH) * 1.0
        g += (nj / nf) * tl.load(PM + j * T + t, mask=tmask, other=0.0)
        big = tl.maximum(big, tl.load(PS + j * T + t, mask=tmask, other=1.0))
    if NCHUNK == 1:
        g = tl.load(PM + t, mask=tmask, other=0.0)  # exactly the one chunk's shift
    lsum = tl.zeros([BLOCK], dtype=tl.float32)
    qsum = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, NCHUNK):
        nj = tl.minimum(CH, R - j * CH) * 1.0
        m = tl.load(PM + j * T + t, mask=tmask, other=0.0)
        sig = tl.load(PS + j * T + t, mask=tmask, other=1.0) / big
        lj = tl.load(PL + j * T + t, mask=tmask, other=0.0)
        qj = tl.load(PQ + j * T + t, mask=tmask, other=0.0)
        if MODE == 1:  # no shifts: Q alone (and an Inf row gives var = Inf, rstd = 0, as torch)
            qsum += sig * sig * qj
        else:
            dl = (m - g) / big
            lsum += sig * lj + nj * dl
            qsum += sig * sig * qj + 2.0 * dl * sig * lj + nj * dl * dl
    corr = lsum / nf
    if MODE == 1:
        var_s = qsum / nf
        corr = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        var_s = qsum / nf - corr * corr
        var_s = tl.where(var_s < 0.0, 0.0, var_s)  # NaN-preserving clamp
    rstd = 1.0 / (big * tl.sqrt(var_s + eps / (big * big)))
    c = corr * big
    mean = tl.where((g == float("inf")) | (g == -float("inf")), g, g + c)
    if MODE == 2:
        rstd = tl.full([BLOCK], 1.0, dtype=tl.float32)
    tl.store(SHIFT + t, g, mask=tmask)
    tl.store(CORR + t, c, mask=tmask)
    tl.store(MEAN + t, mean, mask=tmask)
    tl.store(VAR + t, var_s * big * big, mask=tmask)
    tl.store(RSTD + t, rstd, mask=tmask)


@triton.jit
def normalize(X, Y, SHIFT, CORR, RSTD, W, B, T, R, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    """y = ((x − shift) − corr)·rstd·γ[aux] + β[aux] over a (BG × BR) tile (RMS: shift = corr = 0;
    mean-only: rstd = 1; batch norm with given statistics: shift = μ, corr = 0)."""
    t = tl.program_id(0) * BG + tl.arange(0, BG)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    tmask = t < T
    mask = tmask[:, None] & (r < R)[None, :]
    off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + t, mask=tmask, other=0.0)
    c = tl.load(CORR + t, mask=tmask, other=0.0)
    rs = tl.load(RSTD + t, mask=tmask, other=1.0)
    y = ((x - sh[:, None]) - c[:, None]) * rs[:, None]
    if HAS_W or HAS_B:
        a = _aux(t, r, G2, R2, ag1, ag2, ar1, ar2)
        if HAS_W:
            y = y * tl.load(W + a, mask=mask, other=1.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + a, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def backward_partial(X, DY, MEAN, W, PD, PG, PGD, T, R, CH, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
                     HAS_W: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    """Stage 1 of the input gradient: per group and chunk Σd, Σg, Σg·d with g = dy·γ[aux] and
    d = x − mean (the saved, rounded mean; Σd recovers its rounding error)."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    t = pid * BG + tl.arange(0, BG)
    tmask = t < T
    lo = j * CH
    hi = tl.minimum(lo + CH, R)
    m = tl.load(MEAN + t, mask=tmask, other=0.0)
    sd = tl.zeros([BG], dtype=tl.float32)
    sg = tl.zeros([BG], dtype=tl.float32)
    sgd = tl.zeros([BG], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        mask = tmask[:, None] & (r < hi)[None, :]
        off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + _aux(t, r, G2, R2, ag1, ag2, ar1, ar2), mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - m[:, None], 0.0)
        sd += tl.sum(d, axis=1)
        sg += tl.sum(g, axis=1)
        sgd += tl.sum(g * d, axis=1)
    out = j * T + t
    tl.store(PD + out, sd, mask=tmask)
    tl.store(PG + out, sg, mask=tmask)
    tl.store(PGD + out, sgd, mask=tmask)


@triton.jit
def backward_finalize(PD, PG, PGD, RSTD, CORR, CA, CB, T, R, NCHUNK,
                      MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 2 of the input gradient, per group: corr = Σd/n (0 for RMS), A = mean(g) (0 for RMS)
    and B = mean(g·x̂) = rstd·(Σg·d − corr·Σg)/n (0 for mean-only), so that
    dx = rstd·(g − A − x̂·B) with x̂ = (d − corr)·rstd."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tmask = t < T
    nf = R * 1.0  # (not .to: Triton passes R = 1 as a constant)
    sd = tl.zeros([BLOCK], dtype=tl.float32)
    sg = tl.zeros([BLOCK], dtype=tl.float32)
    sgd = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, NCHUNK):
        sd += tl.load(PD + j * T + t, mask=tmask, other=0.0)
        sg += tl.load(PG + j * T + t, mask=tmask, other=0.0)
        sgd += tl.load(PGD + j * T + t, mask=tmask, other=0.0)
    rs = tl.load(RSTD + t, mask=tmask, other=1.0)
    c = sd / nf
    if MODE == 1:
        c = tl.zeros([BLOCK], dtype=tl.float32)
    a = sg / nf
    b = rs * (sgd - c * sg) / nf
    if MODE == 1:
        a = tl.zeros([BLOCK], dtype=tl.float32)
    if MODE == 2:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(CORR + t, c, mask=tmask)
    tl.store(CA + t, a, mask=tmask)
    tl.store(CB + t, b, mask=tmask)


@triton.jit
def input_grad(X, DY, DX, MEAN, CORR, RSTD, CA, CB, W, T, R, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
               HAS_W: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    """dx = rstd·(g − A − x̂·B), x̂ = ((x − mean) − corr)·rstd, g = dy·γ[aux], over a tile."""
    t = tl.program_id(0) * BG + tl.arange(0, BG)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    tmask = t < T
    mask = tmask[:, None] & (r < R)[None, :]
    off = _offsets(t, r, G2, sg1, sg2, R2, sr1, sr2)
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        g = g * tl.load(W + _aux(t, r, G2, R2, ag1, ag2, ar1, ar2), mask=mask, other=0.0).to(tl.float32)
    m = tl.load(MEAN + t, mask=tmask, other=0.0)
    c = tl.load(CORR + t, mask=tmask, other=0.0)
    rs = tl.load(RSTD + t, mask=tmask, other=1.0)
    a = tl.load(CA + t, mask=tmask, other=0.0)
    b = tl.load(CB + t, mask=tmask, other=0.0)
    xh = ((x - m[:, None]) - c[:, None]) * rs[:, None]
    dx = rs[:, None] * (g - a[:, None] - xh * b[:, None])
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def param_partial(X, DY, MEAN, CORR, RSTD, PW, PB, P, R, CH, G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2,
                  BG: tl.constexpr, BR: tl.constexpr):
    """Stage 1 of dγ, dβ: per parameter p (the groups of this geometry) and chunk, Σdy·x̂ and Σdy
    with x̂ = ((x − mean[t]) − corr[t])·rstd[t], t = aux (the element's statistic group)."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    p = pid * BG + tl.arange(0, BG)
    pmask = p < P
    lo = j * CH
    hi = tl.minimum(lo + CH, R)
    sw = tl.zeros([BG], dtype=tl.float32)
    sb = tl.zeros([BG], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        mask = pmask[:, None] & (r < hi)[None, :]
        off = _offsets(p, r, G2, sg1, sg2, R2, sr1, sr2)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        t = _aux(p, r, G2, R2, ag1, ag2, ar1, ar2)
        m = tl.load(MEAN + t, mask=mask, other=0.0)
        c = tl.load(CORR + t, mask=mask, other=0.0)
        rs = tl.load(RSTD + t, mask=mask, other=1.0)
        xh = tl.where(mask, ((x - m) - c) * rs, 0.0)
        sw += tl.sum(dy * xh, axis=1)
        sb += tl.sum(dy, axis=1)
    tl.store(PW + j * P + p, sw, mask=pmask)
    tl.store(PB + j * P + p, sb, mask=pmask)


@triton.jit
def sum_partials(PART, OUT, P, NCHUNK, BLOCK: tl.constexpr):
    """out[p] = Σ_j part[j, p] in chunk order (stage 2 of a deterministic reduction)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pmask = p < P
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, NCHUNK):
        acc += tl.load(PART + j * P + p, mask=pmask, other=0.0)
    tl.store(OUT + p, acc, mask=pmask)


# --------------------------------------------------------------------------------------------
# rows that fit in one program: layer norm / RMS norm in one read of x (forward) and one read of
# x and dy (backward), the statistics computed from registers with the same numerics
# --------------------------------------------------------------------------------------------


@triton.jit
def rows_forward(X, Y, W, B, MEAN, VAR, RSTD, T, K, eps, MODE: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr):
    """BG whole rows of a contiguous (T, K) x per program (K ≤ BK): shift m = mean(x) (0 for
    RMS), s = power of two ≥ |x − m| when max|x| > 2⁶⁰, L = Σ(x−m)/s, Q = Σ((x−m)/s)², then
    var = (Q/K − (L/K)²)·s², rstd = 1/(s·sqrt(var/s² + ε/s²)), y = ((x − m) − s·L/K)·rstd·γ + β."""
    t = tl.program_id(0) * BG + tl.arange(0, BG)
    k = tl.arange(0, BK)
    tmask = t < T
    kmask = k < K
    mask = tmask[:, None] & kmask[None, :]
    off = t.to(tl.int64)[:, None] * K + k[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    nf = K * 1.0
    amax = tl.max(tl.abs(x), axis=1)
    big = (amax > _BIG) & (amax < float("inf"))
    s = tl.where(big, tl.exp2(tl.ceil(tl.log2(tl.where(big, amax, 1.0))) + 1.0), 1.0)
    if MODE == 1:
        m = tl.zeros([BG], dtype=tl.float32)
    else:
        m = tl.sum(x, axis=1) / nf
    d = tl.where(mask, (x - m[:, None]) * (1.0 / s)[:, None], 0.0)
    q = tl.sum(d * d, axis=1) / nf
    if MODE == 1:
        corr = tl.zeros([BG], dtype=tl.float32)
        var_s = q
    else:
        corr = tl.sum(d, axis=1) / nf
        var_s = q - corr * corr
        var_s = tl.where(var_s < 0.0, 0.0, var_s)  # NaN-preserving clamp
    rstd = 1.0 / (s * tl.sqrt(var_s + eps / (s * s)))
    c = corr * s
    y = ((x - m[:, None]) - c[:, None]) * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + k, mask=kmask, other=1.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + k, mask=kmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + t, tl.where((m == float("inf")) | (m == -float("inf")), m, m + c), mask=tmask)
    tl.store(VAR + t, var_s * s * s, mask=tmask)
    tl.store(RSTD + t, rstd, mask=tmask)


@triton.jit
def rows_backward(X, DY, DX, W, MEAN, RSTD, PW, PB, T, K, MODE: tl.constexpr, HAS_W: tl.constexpr,
                  NEED_DX: tl.constexpr, NEED_P: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr):
    """Whole rows: with d = x − mean (the saved mean), corr = mean(d) (0 for RMS),
    x̂ = (d − corr)·rstd, g = dy·γ: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) (RMS: no mean(g));
    a program walks row blocks pid, pid + programs, ... and writes its Σdy·x̂ and Σdy per column
    to row pid of the (programs, K) partial buffers (summed by ``sum_partials``)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    k = tl.arange(0, BK)
    kmask = k < K
    nf = K * 1.0
    if HAS_W:
        w = tl.load(W + k, mask=kmask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BK], dtype=tl.float32)
    acc_b = tl.zeros([BK], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(T, BG), nprog):
        t = blk * BG + tl.arange(0, BG)
        tmask = t < T
        mask = tmask[:, None] & kmask[None, :]
        off = t.to(tl.int64)[:, None] * K + k[None, :]
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(MEAN + t, mask=tmask, other=0.0)
        rs = tl.load(RSTD + t, mask=tmask, other=1.0)
        d = tl.where(mask, x - m[:, None], 0.0)
        if MODE == 1:
            corr = tl.zeros([BG], dtype=tl.float32)
        else:
            corr = tl.sum(d, axis=1) / nf
        xh = tl.where(mask, (d - corr[:, None]) * rs[:, None], 0.0)
        if NEED_DX:
            g = dy
            if HAS_W:
                g = dy * w[None, :]
            b = tl.sum(g * xh, axis=1) / nf
            if MODE == 1:
                dx = rs[:, None] * (g - xh * b[:, None])
            else:
                a = tl.sum(g, axis=1) / nf
                dx = rs[:, None] * (g - a[:, None] - xh * b[:, None])
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_P:
            acc_w += tl.sum(dy * xh, axis=0)
            acc_b += tl.sum(dy, axis=0)
    if NEED_P:
        tl.store(PW + pid * K + k, acc_w, mask=kmask)
        tl.store(PB + pid * K + k, acc_b, mask=kmask)
