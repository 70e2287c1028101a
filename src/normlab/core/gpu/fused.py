"""Triton kernels of the fused operators: residual-add + LayerNorm/RMSNorm, GroupNorm + SiLU, BatchNorm + ReLU.

The functions at the bottom have the backend signatures of docs/CONTRACTS.md ("Fused variants"),
so the GPU backend exposes them as they are (``normlab.core.ops`` calls them when the backend
module has them, the composition of ``normlab.core.composed`` otherwise).

Kernels (one program per statistic group: a row, a (sample, group), a channel; long groups are
walked in chunks, so any size works):

* ``add_ln_fwd``: s = x + r rounded to the input dtype (as torch's ``x + r``) and stored; mean,
  then the centred second moment with its correction (two passes over the row, the second reading
  s back), y = γ·(s − μ)·rstd + β (RMS: no centring);
* ``add_ln_bwd``: g = dy·γ, the row sums Σg, Σg·x̂, dsum = rstd·(g − Σg/n − x̂·Σg·x̂/n) + ds;
  dγ/dβ partials per program (rows ``pid, pid + P, …``) into a (P, n) buffer that only that
  program writes, summed over P afterwards by torch: deterministic, no atomics;
* ``gn_silu_fwd`` / ``gn_silu_bwd``: a (sample, group) walks its positions × channels through the
  tensor's strides (NCHW and NHWC natively); z = GN(x) stays in float32 for the SiLU; the backward
  recomputes z, dz = dy·σ(z)(1 + z(1 − σ(z))), and writes per-(sample, channel) dγ/dβ partials
  (summed over the samples by torch);
* ``bn_relu_fwd`` / ``bn_relu_bwd``: a channel walks its N·S values (NCHW or NHWC strides); the
  backward masks dy where y ≤ 0 (torch's threshold_backward) and owns its channel's dγ/dβ;
* ``bn_relu_eval``: y = relu(a_c·x + b_c), a, b from the running statistics.

Numerics: float32 accumulation for float32/bfloat16/float16 (float64 for float64 inputs),
float32 statistics; two-pass centred variance with the mean's correction term
(var = mean(d²) − mean(d)², d = x − mean), so an offset of 1e6 keeps float32 precision. NOT
covered here (the unfused kernels' rescaling is): |x| ≳ 1e19, whose squares overflow float32.
NaN/Inf propagate (no fast-math; ``where`` instead of ``maximum`` for the ReLU so NaN stays NaN).
Layout: add + norm runs on contiguous rows (other strides are copied once); GN/BN run any tensor
whose (N, C, S) view has uniform strides (contiguous and channels-last-like); others are copied.
Empty inputs go to the reference routines.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab.core import reference

__all__ = ["add_layer_norm", "add_layer_norm_backward", "group_norm_silu", "group_norm_silu_backward",
           "batch_norm_relu", "batch_norm_relu_backward", "batch_norm_relu_eval"]

_MAX_BLOCK = 1024
_PROGRAMS = 64  # programs of the add + norm backward: rows are dealt out round-robin


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _out(v, BF16: tl.constexpr):
    """v ready for a store in the output dtype: bfloat16 rounded to nearest-even here, exactly
    as the hardware conversion does (Triton's interpreter truncates instead)."""
    if BF16:
        v32 = v.to(tl.float32)
        bits = v32.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        v = tl.where(v32 != v32, v32, r)  # NaN payloads stay NaN
    return v


@triton.jit
def _add_ln_fwd(X, R, S, Y, W, B, MEAN, VAR, RSTD, n, eps,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr, ACC: tl.constexpr, BF16: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    total = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < n
        x = tl.load(X + base + cols, mask=m, other=0.0)
        r = tl.load(R + base + cols, mask=m, other=0.0)
        s = _out(x.to(ACC) + r.to(ACC), BF16).to(S.dtype.element_ty)
        tl.store(S + base + cols, s, mask=m)
        total += tl.where(m, s.to(ACC), 0.0)
    if IS_RMS:
        mean = 0.0
    else:
        mean = tl.sum(total, axis=0) / n
    sq = tl.zeros([BLOCK], dtype=ACC)
    cs = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < n
        d = tl.where(m, tl.load(S + base + cols, mask=m, other=0.0).to(ACC) - mean, 0.0)
        sq += d * d
        cs += d
    corr = tl.sum(cs, axis=0) / n
    var = tl.sum(sq, axis=0) / n
    if not IS_RMS:
        var = var - corr * corr
        var = tl.where(var < 0.0, 0.0, var)
        mean = mean + corr
    rstd = 1.0 / tl.sqrt(var + eps)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(VAR + row, var)
    tl.store(RSTD + row, rstd)
    for off in range(0, n, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < n
        s = tl.load(S + base + cols, mask=m, other=0.0).to(ACC)
        y = (s - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(ACC)
        tl.store(Y + base + cols, _out(y, BF16).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _add_ln_bwd(DY, DS, S, W, MEAN, RSTD, DSUM, PW, PB, rows, n, P,
                HAS_DS: tl.constexpr, HAS_W: tl.constexpr, IS_RMS: tl.constexpr, WANT_DX: tl.constexpr,
                WANT_P: tl.constexpr, ACC: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    for row in range(pid, rows, P):
        base = tl.cast(row, tl.int64) * n
        rstd = tl.load(RSTD + row).to(ACC)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(MEAN + row).to(ACC)
        sg = tl.zeros([BLOCK], dtype=ACC)
        sgx = tl.zeros([BLOCK], dtype=ACC)
        for off in range(0, n, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            m = cols < n
            xh = (tl.load(S + base + cols, mask=m, other=0.0).to(ACC) - mean) * rstd
            dy = tl.load(DY + base + cols, mask=m, other=0.0).to(ACC)
            g = dy
            if HAS_W:
                g = dy * tl.load(W + cols, mask=m, other=0.0).to(ACC)
            sg += g
            sgx += g * xh
            if WANT_P:
                pw = tl.load(PW + pid * n + cols, mask=m, other=0.0)
                tl.store(PW + pid * n + cols, pw + dy * xh, mask=m)
                pb = tl.load(PB + pid * n + cols, mask=m, other=0.0)
                tl.store(PB + pid * n + cols, pb + dy, mask=m)
        if WANT_DX:
            mg = tl.sum(sg, axis=0) / n
            mgx = tl.sum(sgx, axis=0) / n
            for off in range(0, n, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                m = cols < n
                xh = (tl.load(S + base + cols, mask=m, other=0.0).to(ACC) - mean) * rstd
                g = tl.load(DY + base + cols, mask=m, other=0.0).to(ACC)
                if HAS_W:
                    g = g * tl.load(W + cols, mask=m, other=0.0).to(ACC)
                if IS_RMS:
                    dx = rstd * (g - xh * mgx)
                else:
                    dx = rstd * (g - mg - xh * mgx)
                if HAS_DS:
                    dx += tl.load(DS + base + cols, mask=m, other=0.0).to(ACC)
                tl.store(DSUM + base + cols, _out(dx, BF16).to(DSUM.dtype.element_ty), mask=m)


@triton.jit
def _gn_silu_fwd(X, Y, W, B, MEAN, VAR, RSTD, S, G, CG, sxn, sxc, sxs, syn, syc, sys_, eps,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BF16: tl.constexpr, BS: tl.constexpr,
                 BC: tl.constexpr):
    pid = tl.program_id(0)
    nn = pid // G
    g = pid % G
    cc = tl.arange(0, BC)
    cm = cc < CG
    ch = g * CG + cc
    xb = X + nn.to(tl.int64) * sxn
    cnt = S * CG
    total = tl.zeros([BS, BC], dtype=ACC)
    for off in range(0, S, BS):
        ss = off + tl.arange(0, BS)
        m = (ss < S)[:, None] & cm[None, :]
        x = tl.load(xb + ss[:, None].to(tl.int64) * sxs + ch[None, :] * sxc, mask=m, other=0.0).to(ACC)
        total += x
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / cnt
    sq = tl.zeros([BS, BC], dtype=ACC)
    cs = tl.zeros([BS, BC], dtype=ACC)
    for off in range(0, S, BS):
        ss = off + tl.arange(0, BS)
        m = (ss < S)[:, None] & cm[None, :]
        x = tl.load(xb + ss[:, None].to(tl.int64) * sxs + ch[None, :] * sxc, mask=m, other=0.0).to(ACC)
        d = tl.where(m, x - mean, 0.0)
        sq += d * d
        cs += d
    corr = tl.sum(tl.sum(cs, axis=1), axis=0) / cnt
    var = tl.sum(tl.sum(sq, axis=1), axis=0) / cnt - corr * corr
    var = tl.where(var < 0.0, 0.0, var)
    mean = mean + corr
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + pid, mean)
    tl.store(VAR + pid, var)
    tl.store(RSTD + pid, rstd)
    if HAS_W:
        w = tl.load(W + ch, mask=cm, other=0.0).to(ACC)
    else:
        w = tl.full([BC], 1.0, ACC)
    if HAS_B:
        b = tl.load(B + ch, mask=cm, other=0.0).to(ACC)
    else:
        b = tl.zeros([BC], dtype=ACC)
    a = w * rstd
    c = b - mean * a
    yb = Y + nn.to(tl.int64) * syn
    for off in range(0, S, BS):
        ss = off + tl.arange(0, BS)
        m = (ss < S)[:, None] & cm[None, :]
        x = tl.load(xb + ss[:, None].to(tl.int64) * sxs + ch[None, :] * sxc, mask=m, other=0.0).to(ACC)
        z = x * a[None, :] + c[None, :]
        y = z / (1.0 + tl.exp(-z))
        tl.store(yb + ss[:, None].to(tl.int64) * sys_ + ch[None, :] * syc, _out(y, BF16).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _gn_silu_bwd(DY, X, DX, W, B, MEAN, RSTD, PW, PB, S, G, CG, C, sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, WANT_DX: tl.constexpr, ACC: tl.constexpr, BF16: tl.constexpr,
                 BS: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    nn = pid // G
    g = pid % G
    cc = tl.arange(0, BC)
    cm = cc < CG
    ch = g * CG + cc
    mean = tl.load(MEAN + pid).to(ACC)
    rstd = tl.load(RSTD + pid).to(ACC)
    if HAS_W:
        w = tl.load(W + ch, mask=cm, other=0.0).to(ACC)
    else:
        w = tl.full([BC], 1.0, ACC)
    if HAS_B:
        b = tl.load(B + ch, mask=cm, other=0.0).to(ACC)
    else:
        b = tl.zeros([BC], dtype=ACC)
    xb = X + nn.to(tl.int64) * sxn
    db_ = DY + nn.to(tl.int64) * sdn
    sdz = tl.zeros([BS, BC], dtype=ACC)
    sdzx = tl.zeros([BS, BC], dtype=ACC)
    for off in range(0, S, BS):
        ss = off + tl.arange(0, BS)
        m = (ss < S)[:, None] & cm[None, :]
        x = tl.load(xb + ss[:, None].to(tl.int64) * sxs + ch[None, :] * sxc, mask=m, other=0.0).to(ACC)
        dy = tl.load(db_ + ss[:, None].to(tl.int64) * sds + ch[None, :] * sdc, mask=m, other=0.0).to(ACC)
        xh = (x - mean) * rstd
        z = xh * w[None, :] + b[None, :]
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = tl.where(m, dy * sig * (1.0 + z * (1.0 - sig)), 0.0)
        sdz += dz
        sdzx += dz * xh
    pdb = tl.sum(sdz, axis=0)
    pdw = tl.sum(sdzx, axis=0)
    tl.store(PW + nn.to(tl.int64) * C + ch, pdw, mask=cm)
    tl.store(PB + nn.to(tl.int64) * C + ch, pdb, mask=cm)
    if WANT_DX:
        cnt = S * CG
        mg = tl.sum(pdb * w, axis=0) / cnt
        mgx = tl.sum(pdw * w, axis=0) / cnt
        ob = DX + nn.to(tl.int64) * son
        for off in range(0, S, BS):
            ss = off + tl.arange(0, BS)
            m = (ss < S)[:, None] & cm[None, :]
            x = tl.load(xb + ss[:, None].to(tl.int64) * sxs + ch[None, :] * sxc, mask=m, other=0.0).to(ACC)
            dy = tl.load(db_ + ss[:, None].to(tl.int64) * sds + ch[None, :] * sdc, mask=m, other=0.0).to(ACC)
            xh = (x - mean) * rstd
            z = xh * w[None, :] + b[None, :]
            sig = 1.0 / (1.0 + tl.exp(-z))
            gz = dy * sig * (1.0 + z * (1.0 - sig)) * w[None, :]
            dx = rstd * (gz - mg - xh * mgx)
            tl.store(ob + ss[:, None].to(tl.int64) * sos + ch[None, :] * soc, _out(dx, BF16).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _bn_addr(i, S, sn, ss):
    return (i // S).to(tl.int64) * sn + (i % S).to(tl.int64) * ss


@triton.jit
def _bn_relu_fwd(X, Y, W, B, MEAN, VAR, RSTD, S, total, sxn, sxc, sxs, syn, syc, sys_, eps,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    xb = X + c.to(tl.int64) * sxc
    acc = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, total, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < total
        acc += tl.load(xb + _bn_addr(i, S, sxn, sxs), mask=m, other=0.0).to(ACC)
    mean = tl.sum(acc, axis=0) / total
    sq = tl.zeros([BLOCK], dtype=ACC)
    cs = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, total, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < total
        d = tl.where(m, tl.load(xb + _bn_addr(i, S, sxn, sxs), mask=m, other=0.0).to(ACC) - mean, 0.0)
        sq += d * d
        cs += d
    corr = tl.sum(cs, axis=0) / total
    var = tl.sum(sq, axis=0) / total - corr * corr
    var = tl.where(var < 0.0, 0.0, var)
    mean = mean + corr
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + c, mean)
    tl.store(VAR + c, var)
    tl.store(RSTD + c, rstd)
    a = rstd
    if HAS_W:
        a = a * tl.load(W + c).to(ACC)
    sh = -mean * a
    if HAS_B:
        sh = sh + tl.load(B + c).to(ACC)
    yb = Y + c.to(tl.int64) * syc
    for off in range(0, total, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < total
        z = tl.load(xb + _bn_addr(i, S, sxn, sxs), mask=m, other=0.0).to(ACC) * a + sh
        y = tl.where(z > 0.0, z, tl.where(z == z, 0.0, z))  # relu keeping NaN
        tl.store(yb + _bn_addr(i, S, syn, sys_), _out(y, BF16).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bn_relu_bwd(DY, Y, X, DX, W, MEAN, RSTD, DW, DB, S, total, sdn, sdc, sds, syn, syc, sys_, sxn, sxc, sxs,
                 son, soc, sos, HAS_W: tl.constexpr, WANT_DX: tl.constexpr, ACC: tl.constexpr, BF16: tl.constexpr,
                 BLOCK: tl.constexpr):
    c = tl.program_id(0)
    mean = tl.load(MEAN + c).to(ACC)
    rstd = tl.load(RSTD + c).to(ACC)
    db_, yb, xb = DY + c.to(tl.int64) * sdc, Y + c.to(tl.int64) * syc, X + c.to(tl.int64) * sxc
    sdz = tl.zeros([BLOCK], dtype=ACC)
    sdzx = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, total, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < total
        dy = tl.load(db_ + _bn_addr(i, S, sdn, sds), mask=m, other=0.0).to(ACC)
        y = tl.load(yb + _bn_addr(i, S, syn, sys_), mask=m, other=0.0).to(ACC)
        x = tl.load(xb + _bn_addr(i, S, sxn, sxs), mask=m, other=0.0).to(ACC)
        dz = tl.where(y <= 0.0, 0.0, dy)
        dz = tl.where(m, dz, 0.0)
        sdz += dz
        sdzx += dz * (x - mean) * rstd
    sb = tl.sum(sdz, axis=0)
    sw = tl.sum(sdzx, axis=0)
    tl.store(DB + c, sb)
    tl.store(DW + c, sw)
    if WANT_DX:
        w = 1.0
        if HAS_W:
            w = tl.load(W + c).to(ACC)
        mb = sb / total
        mw = sw / total
        ob = DX + c.to(tl.int64) * soc
        for off in range(0, total, BLOCK):
            i = off + tl.arange(0, BLOCK)
            m = i < total
            dy = tl.load(db_ + _bn_addr(i, S, sdn, sds), mask=m, other=0.0).to(ACC)
            y = tl.load(yb + _bn_addr(i, S, syn, sys_), mask=m, other=0.0).to(ACC)
            x = tl.load(xb + _bn_addr(i, S, sxn, sxs), mask=m, other=0.0).to(ACC)
            dz = tl.where(y <= 0.0, 0.0, dy)
            xh = (x - mean) * rstd
            dx = w * rstd * (dz - mb - xh * mw)
            tl.store(ob + _bn_addr(i, S, son, sos), _out(dx, BF16).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _bn_relu_eval(X, Y, A, SH, S, total, sxn, sxc, sxs, syn, syc, sys_, ACC: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    a = tl.load(A + c)
    sh = tl.load(SH + c)
    x = tl.load(X + c.to(tl.int64) * sxc + _bn_addr(i, S, sxn, sxs), mask=m, other=0.0).to(ACC)
    z = x * a + sh
    y = tl.where(z > 0.0, z, tl.where(z == z, 0.0, z))
    tl.store(Y + c.to(tl.int64) * syc + _bn_addr(i, S, syn, sys_), _out(y, BF16).to(Y.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------- launchers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2(n: int, cap: int = _MAX_BLOCK) -> int:
    return max(1, min(triton.next_power_of_2(max(int(n), 1)), cap))


def _ncs(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """t and its (N, C, S) strides: NCHW-contiguous and channels-last-like natively, else one copy."""
    n, c = t.shape[0], t.shape[1]
    s = math.prod(t.shape[2:])
    if t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous():
        return t, (s * c, 1, c)
    if not t.is_contiguous():
        t = t.contiguous()
    return t, (c * s, s, 1)


def _like(t: Tensor, x: Tensor, dtype=None) -> tuple[Tensor, tuple[int, int, int]]:
    """An output laid out like x (whose (N, C, S) strides _ncs found)."""
    out = torch.empty_like(x, dtype=dtype or x.dtype)
    return _ncs(out)


def _ptr(t: Tensor | None, fallback: Tensor) -> Tensor:
    return fallback if t is None else t.contiguous()


def add_layer_norm(x: Tensor, residual: Tensor, normalized_ndim: int, weight, bias, eps: float, *,
                   rms: bool = False):
    """(y, s, mean | None, var, rstd): s = x + residual, y = LN/RMS(s); statistics of the lead dims."""
    if x.numel() == 0:
        return reference.add_layer_norm(x, residual, normalized_ndim, weight, bias, eps, rms=rms)
    lead = tuple(x.shape[: x.dim() - normalized_ndim])
    n = math.prod(x.shape[x.dim() - normalized_ndim:])
    rows = x.numel() // n
    x, r = x.contiguous(), residual.contiguous()
    s, y = torch.empty_like(x), torch.empty_like(x)
    sd = _acc_torch(x.dtype)
    mean = torch.empty(rows, dtype=sd, device=x.device)
    var, rstd = torch.empty_like(mean), torch.empty_like(mean)
    _add_ln_fwd[(rows,)](x, r, s, y, _ptr(weight, x), _ptr(bias, x), mean, var, rstd, n, float(eps),
                         HAS_W=weight is not None, HAS_B=bias is not None, IS_RMS=rms, ACC=_acc(x.dtype), BF16=x.dtype == torch.bfloat16,
                         BLOCK=_pow2(n))
    return y, s, None if rms else mean.view(lead), var.view(lead), rstd.view(lead)


def add_layer_norm_backward(dy, ds, s, weight, mean, rstd, normalized_ndim: int, eps: float, *, rms: bool = False,
                            mask=(True, True, True)):
    """(dsum, dγ, dβ): dsum = ∂L/∂s through y + ds, the gradient of x and of the residual."""
    if s.numel() == 0:
        return reference.add_layer_norm_backward(dy, ds, s, weight, mean, rstd, normalized_ndim, eps, rms=rms,
                                                 mask=mask)
    wshape = tuple(s.shape[s.dim() - normalized_ndim:])
    n = math.prod(wshape)
    rows = s.numel() // n
    acc = _acc_torch(s.dtype)
    s, dy = s.contiguous(), dy.contiguous()
    ds = None if ds is None else ds.contiguous()
    want_p = bool(mask[1] or mask[2])
    p = min(rows, _PROGRAMS)
    pw = torch.zeros((p, n) if want_p else (1,), dtype=acc, device=s.device)
    pb = torch.zeros_like(pw)
    dsum = torch.empty_like(s) if mask[0] else s
    rstd_c = rstd.reshape(-1).to(acc).contiguous()
    mean_c = rstd_c if (rms or mean is None) else mean.reshape(-1).to(acc).contiguous()
    _add_ln_bwd[(p,)](dy, _ptr(ds, dy), s, _ptr(weight, s), mean_c, rstd_c, dsum, pw, pb, rows, n, p,
                      HAS_DS=ds is not None, HAS_W=weight is not None, IS_RMS=rms, WANT_DX=bool(mask[0]),
                      WANT_P=want_p, ACC=_acc(s.dtype), BF16=s.dtype == torch.bfloat16, BLOCK=_pow2(n))
    dw = pw.sum(0).view(wshape) if mask[1] else None
    db = pb.sum(0).view(wshape) if mask[2] else None
    return (dsum if mask[0] else None), dw, db


def _gn_blocks(s: int, cg: int) -> tuple[int, int]:
    bc = _pow2(cg, 4096)
    return max(1, min(_pow2(s), 4096 // bc)), bc


def group_norm_silu(x: Tensor, num_groups: int, weight, bias, eps: float):
    """(y, mean, var, rstd): y = silu(GN(x)), statistics (N, G); NCHW and NHWC natively."""
    if x.numel() == 0:
        return reference.group_norm_silu(x, num_groups, weight, bias, eps)
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    x, (sxn, sxc, sxs) = _ncs(x)
    y, (syn, syc, sys_) = _like(x, x)
    sd = _acc_torch(x.dtype)
    mean = torch.empty(n * num_groups, dtype=sd, device=x.device)
    var, rstd = torch.empty_like(mean), torch.empty_like(mean)
    bs, bc = _gn_blocks(s, c // num_groups)
    _gn_silu_fwd[(n * num_groups,)](x, y, _ptr(weight, x), _ptr(bias, x), mean, var, rstd, s, num_groups,
                                    c // num_groups, sxn, sxc, sxs, syn, syc, sys_, float(eps),
                                    HAS_W=weight is not None, HAS_B=bias is not None, ACC=_acc(x.dtype), BF16=x.dtype == torch.bfloat16,
                                    BS=bs, BC=bc)
    v = (n, num_groups)
    return y, mean.view(v), var.view(v), rstd.view(v)


def group_norm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups: int, eps: float, *,
                             mask=(True, True, True)):
    """(dx, dγ, dβ) of :func:`group_norm_silu`: z recomputed, dz = silu'(z)·dy, GN's backward of dz."""
    if x.numel() == 0:
        return reference.group_norm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups, eps, mask=mask)
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    acc = _acc_torch(x.dtype)
    x, (sxn, sxc, sxs) = _ncs(x)
    dy, (sdn, sdc, sds) = _ncs(dy)
    dx, (son, soc, sos) = _like(x, x) if mask[0] else (x, (0, 0, 0))
    pw = torch.empty((n, c), dtype=acc, device=x.device)
    pb = torch.empty_like(pw)
    bs, bc = _gn_blocks(s, c // num_groups)
    _gn_silu_bwd[(n * num_groups,)](dy, x, dx, _ptr(weight, x), _ptr(bias, x), mean.reshape(-1).to(acc).contiguous(),
                                    rstd.reshape(-1).to(acc).contiguous(), pw, pb, s, num_groups, c // num_groups, c,
                                    sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
                                    HAS_W=weight is not None, HAS_B=bias is not None, WANT_DX=bool(mask[0]),
                                    ACC=_acc(x.dtype), BF16=x.dtype == torch.bfloat16, BS=bs, BC=bc)
    return (dx if mask[0] else None), (pw.sum(0) if mask[1] else None), (pb.sum(0) if mask[2] else None)


def batch_norm_relu(x: Tensor, weight, bias, eps: float):
    """(y, mean, var, rstd): y = relu(BN(x)) with batch statistics (C,); NCHW and NHWC natively."""
    if x.numel() == 0:
        return reference.batch_norm_relu(x, weight, bias, eps)
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    x, (sxn, sxc, sxs) = _ncs(x)
    y, (syn, syc, sys_) = _like(x, x)
    sd = _acc_torch(x.dtype)
    mean = torch.empty(c, dtype=sd, device=x.device)
    var, rstd = torch.empty_like(mean), torch.empty_like(mean)
    _bn_relu_fwd[(c,)](x, y, _ptr(weight, x), _ptr(bias, x), mean, var, rstd, s, n * s, sxn, sxc, sxs,
                       syn, syc, sys_, float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
                       ACC=_acc(x.dtype), BF16=x.dtype == torch.bfloat16, BLOCK=_pow2(n * s))
    return y, mean, var, rstd


def batch_norm_relu_backward(dy, y, x, weight, mean, rstd, eps: float, *, mask=(True, True, True)):
    """(dx, dγ, dβ): dz = dy where y > 0, then batch norm's backward of dz; each channel owns its sums."""
    if x.numel() == 0:
        return reference.batch_norm_relu_backward(dy, y, x, weight, mean, rstd, eps, mask=mask)
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    acc = _acc_torch(x.dtype)
    x, (sxn, sxc, sxs) = _ncs(x)
    dy, (sdn, sdc, sds) = _ncs(dy)
    y, (syn, syc, sys_) = _ncs(y)
    dx, (son, soc, sos) = _like(x, x) if mask[0] else (x, (0, 0, 0))
    dw = torch.empty(c, dtype=acc, device=x.device)
    db = torch.empty_like(dw)
    _bn_relu_bwd[(c,)](dy, y, x, dx, _ptr(weight, x), mean.to(acc).contiguous(), rstd.to(acc).contiguous(), dw, db,
                       s, n * s, sdn, sdc, sds, syn, syc, sys_, sxn, sxc, sxs, son, soc, sos,
                       HAS_W=weight is not None, WANT_DX=bool(mask[0]), ACC=_acc(x.dtype), BF16=x.dtype == torch.bfloat16, BLOCK=_pow2(n * s))
    return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None)


def batch_norm_relu_eval(x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> Tensor:
    """y = relu(a_c·x + b_c), a = γ·rsqrt(σ² + ε), b = β − a·μ (C-sized, torch), one pass over x."""
    if x.numel() == 0:
        return reference.batch_norm_relu_eval(x, mean, var, weight, bias, eps)
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    acc = _acc_torch(x.dtype)
    a = torch.rsqrt(var.to(acc) + eps)
    if weight is not None:
        a = a * weight.to(acc)
    sh = -mean.to(acc) * a
    if bias is not None:
        sh = sh + bias.to(acc)
    x, (sxn, sxc, sxs) = _ncs(x)
    y, (syn, syc, sys_) = _like(x, x)
    block = _pow2(n * s)
    _bn_relu_eval[(triton.cdiv(n * s, block), c)](x, y, a.contiguous(), sh.contiguous(), s, n * s, sxn, sxc, sxs,
                                                  syn, syc, sys_, ACC=_acc(x.dtype), BF16=x.dtype == torch.bfloat16, BLOCK=block)
    return y
