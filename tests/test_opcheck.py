"""``torch.library.opcheck`` for every ``torch.ops.normlab.*`` operator (issue 8, §1).

Each case runs opcheck (schema, fake tensor, autograd registration, AOT dispatch) and, because
opcheck only tests self-consistency, also compares the operator's outputs with torch's own
functional ops evaluated in float64 on the same (already rounded) inputs.

Matrix: float32/float64/bfloat16 x contiguous/channels_last/sliced x affine/no affine x backend
"" (automatic: the fused CPU kernels where they apply) / "reference", plus mean-only batch norm,
RMS layer norm and empty inputs (a dimension of size 0). The default run takes a covering subset
(every value of every axis, for every operator); the full product is marked ``slow``.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as TF

import normlab  # noqa: F401  (registers torch.ops.normlab)
from conftest import assert_close

N = torch.ops.normlab
EPS = 1e-5
SHAPE = (4, 6, 5, 3)  # (N, C, H, W): C = 6 (3 groups), LN over the last dim (3) or the last two
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
BACKENDS = ["", "reference"]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (operator family, variant) -> what the forward computes
FAMILIES = [
    ("batch_norm", "standard"),
    ("batch_norm", "center_only"),
    ("batch_norm_eval", "standard"),
    ("batch_norm_eval", "center_only"),
    ("group_norm", "standard"),
    ("layer_norm", "standard"),
    ("layer_norm", "rms"),
    ("layer_norm2", "standard"),  # normalized_ndim = 2
    ("layer_norm_channels", "standard"),
    ("ghost_batch_norm", "standard"),  # virtual batches of 2 samples
]


def _input(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g, dtype=torch.float64).mul(1.5).add(0.3).to(dtype)
    if layout == "channels_last":
        x = v.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        big = torch.zeros(shape[:-1] + (2 * shape[-1] + 1,), dtype=dtype)
        big[..., 1::2] = v
        x = big[..., 1::2]
        assert x.numel() == 0 or not x.is_contiguous()
    else:
        x = v.contiguous()
    assert torch.equal(x, v)
    return x


def _param(shape, dtype, seed, base=0.0):
    g = torch.Generator().manual_seed(seed)
    return (base + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _case(family, variant, dtype, layout, affine, backend, empty):
    """(forward op, forward args, float64 torch reference of the forward, info for the backward)."""
    shape = (0,) + SHAPE[1:] if empty else SHAPE
    x = _input(shape, dtype, layout)
    c = shape[1]
    center = variant == "center_only"
    rms = variant == "rms"
    if family.startswith("layer_norm") and family != "layer_norm_channels":
        k = 2 if family == "layer_norm2" else 1
        pshape = tuple(shape[len(shape) - k:])
    else:
        k = None
        pshape = (c,)
    w = _param(pshape, dtype, 1, 1.0) if affine and not center else None
    b = _param(pshape, dtype, 2) if affine and not rms else None

    if family == "batch_norm":
        op = N.batch_norm
        args = (x, w, b, EPS, center, backend)

        def ref(x, w, b):
            if center:
                y = x - x.mean((0, 2, 3), keepdim=True)
                return y if b is None else y + b.view(1, -1, 1, 1)
            return TF.batch_norm(x, None, None, w, b, True, 0.0, EPS)
    elif family == "batch_norm_eval":
        op = N.batch_norm_eval
        mean = _param((c,), dtype, 3)
        var = None if center else _param((c,), dtype, 4).abs().add(0.5).to(dtype)
        args = (x, mean, var, w, b, EPS, center, backend)

        def ref(x, w, b, mean=mean.double(), var=None if var is None else var.double()):
            if center:
                y = x - mean.view(1, -1, 1, 1)
                return y if b is None else y + b.view(1, -1, 1, 1)
            return TF.batch_norm(x, mean, var, w, b, False, 0.0, EPS)
    elif family == "ghost_batch_norm":
        op = N.ghost_batch_norm
        args = (x, w, b, 2, EPS, backend)

        def ref(x, w, b):  # torch's batch norm on each virtual batch of 2 samples
            if x.shape[0] == 0:
                return x.clone()
            return torch.cat([TF.batch_norm(v, None, None, w, b, True, 0.0, EPS) for v in x.split(2)])
    elif family == "group_norm":
        op = N.group_norm
        args = (x, w, b, 3, EPS, backend)

        def ref(x, w, b):
            return TF.group_norm(x, 3, w, b, EPS)
    elif family == "layer_norm_channels":
        op = N.layer_norm_channels
        args = (x, w, b, EPS, backend)

        def ref(x, w, b):
            return TF.layer_norm(x.movedim(1, -1), (c,), w, b, EPS).movedim(-1, 1)
    else:
        op = N.layer_norm
        args = (x, w, b, k, EPS, rms, backend)

        def ref(x, w, b):
            if rms:
                return TF.rms_norm(x, pshape, w, EPS)
            return TF.layer_norm(x, pshape, w, b, EPS)
    return op, args, ref


def _with_grad(args):
    """Float tensors of the forward args as leaves requiring grad (x, weight, bias)."""
    out = list(args)
    for i in range(3):
        if isinstance(out[i], torch.Tensor):
            out[i] = out[i].detach().requires_grad_()
    return tuple(out)


def _backward_case(family, variant, args, backend):
    """(backward op, its args, mask) from the forward's outputs."""
    x, w = args[0], args[1]
    dy = _input(tuple(x.shape), x.dtype, "contiguous", seed=7)
    has_b = args[2] is not None
    mask = [True, w is not None, has_b]
    if family == "batch_norm":
        _, mean, _, rstd = N.batch_norm(*args)
        return N.batch_norm_backward, (dy, x, w, mean, rstd, EPS, variant == "center_only", backend, mask), mask
    if family == "ghost_batch_norm":
        _, mean, _, rstd = N.ghost_batch_norm(*args)
        return N.ghost_batch_norm_backward, (dy, x, w, mean, rstd, 2, EPS, backend, mask), mask
    if family == "group_norm":
        _, mean, _, rstd = N.group_norm(*args)
        return N.group_norm_backward, (dy, x, w, mean, rstd, 3, EPS, backend, mask), mask
    if family == "layer_norm_channels":
        _, mean, _, rstd = N.layer_norm_channels(*args)
        return N.layer_norm_channels_backward, (dy, x, w, mean, rstd, EPS, backend, mask), mask
    _, mean, _, rstd = N.layer_norm(*args)
    k, rms = args[3], args[5]
    return N.layer_norm_backward, (dy, x, w, mean, rstd, k, EPS, rms, backend, mask), mask


def _check(family, variant, dtype, layout, affine, backend, empty):
    if layout == "channels_last" and family.startswith("layer_norm2"):
        pass  # 4-D channels_last input to a 2-dim layer norm: still a valid case
    op, args, ref = _case(family, variant, dtype, layout, affine, backend, empty)

    # --- forward operator: opcheck, then values against torch in float64
    torch.library.opcheck(op, _with_grad(args))
    out = op(*args)
    y = out[0] if isinstance(out, tuple) else out
    x64 = args[0].detach().double()
    w64 = None if args[1] is None else args[1].double()
    b64 = None if args[2] is None else args[2].double()
    if family == "batch_norm_eval":
        w64 = None if args[3] is None else args[3].double()
        b64 = None if args[4] is None else args[4].double()
    expected = ref(x64, w64, b64)
    assert y.dtype == dtype and y.shape == args[0].shape
    assert_close(y, expected, dtype, msg=f"{op} forward")
    if layout == "channels_last" and not empty:
        assert y.is_contiguous(memory_format=torch.channels_last), f"{op}: channels_last not kept"

    if family == "batch_norm_eval":
        return  # its autograd formula is plain torch ops (covered by opcheck's autograd tests)

    # --- backward operator: opcheck, then values against torch autograd in float64
    bop, bargs, mask = _backward_case(family, variant, args, backend)
    torch.library.opcheck(bop, bargs)
    dx, dw, db = bop(*bargs)
    leaves = [x64.requires_grad_()] + [t.requires_grad_() for t in (w64, b64) if t is not None]
    grads = torch.autograd.grad(ref(x64, w64, b64), leaves, bargs[0].double(), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    assert dx.shape == args[0].shape and dx.dtype == dtype
    assert_close(dx, grads[0], dtype, msg=f"{bop} dx")
    i = 1
    for m, got in zip(mask[1:], (dw, db)):
        if m:
            assert got.shape == leaves[i].shape
            # 16-bit parameter gradients are sums over the batch: compare at float32's tolerance
            # of the float32-accumulated sum rounded once to the parameter dtype (see conftest.TOL)
            assert_close(got, grads[i], dtype, msg=f"{bop} d(param {i})")
            i += 1
        else:
            assert got.numel() == 0


def _covering():
    """Every value of every axis at least once per operator family (a Latin-square sweep)."""
    cases = []
    for fi, (family, variant) in enumerate(FAMILIES):
        for j, (dtype, layout) in enumerate(zip(DTYPES, LAYOUTS)):
            affine = (j + fi) % 2 == 0
            backend = BACKENDS[(j + fi + 1) % 2 if j < 2 else fi % 2]
            cases.append((family, variant, dtype, layout, affine, backend, False))
        cases.append((family, variant, torch.float32, "contiguous", fi % 2 == 0, BACKENDS[(fi + 1) % 2], True))
    return cases


def _id(case):
    family, variant, dtype, layout, affine, backend, empty = case
    return "-".join([family, variant, str(dtype).split(".")[-1], layout, "affine" if affine else "noaffine",
                     backend or "auto"] + (["empty"] if empty else []))


@pytest.mark.parametrize("case", _covering(), ids=_id)
def test_opcheck(case):
    _check(*case)


_FULL = [
    (f, v, d, lay, a, be, e)
    for (f, v), d, lay, a, be, e in itertools.product(FAMILIES, DTYPES, LAYOUTS, [True, False], BACKENDS, [False, True])
]


# The full product (612 cases, ~9 min on 2 cores) adds no axis the covering set lacks; it runs on
# request (NORMLAB_FULL_OPCHECK=1), e.g. before a release or after changing core/ops.py.
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NORMLAB_FULL_OPCHECK"), reason="full opcheck product: set NORMLAB_FULL_OPCHECK=1")
@pytest.mark.parametrize("case", [c for c in _FULL if c not in _covering()], ids=_id)
def test_opcheck_full_matrix(case):
    _check(*case)


def test_every_operator_is_covered():
    """The matrix names every operator registered in the normlab namespace."""
    registered = {name for name in dir(N) if not name.startswith("_") and isinstance(getattr(N, name), torch._ops.OpOverloadPacket)}
    covered = {"batch_norm", "batch_norm_backward", "batch_norm_eval", "group_norm", "group_norm_backward",
               "layer_norm", "layer_norm_backward", "layer_norm_channels", "layer_norm_channels_backward",
               "ghost_batch_norm", "ghost_batch_norm_backward",
               "dynamic_tanh", "dynamic_tanh_backward", "dynamic_erf", "dynamic_erf_backward",
               "filter_response_norm", "filter_response_norm_backward",
               # the fused variants: opcheck rows in tests/test_fused_ops.py
               "add_layer_norm", "add_layer_norm_backward", "group_norm_silu", "group_norm_silu_backward",
               "batch_norm_relu", "batch_norm_relu_backward", "batch_norm_relu_eval"}
    covered |= EVONORM_OPS
    assert registered == covered, registered ^ covered




# ---- point-wise operators (DyT, Derf): opcheck of forward and backward; values are compared
# with the papers' formulas in tests/test_pointwise.py.
_PW_CASES = [  # (kind, dtype, layout, channels_last, affine, backend)
    ("tanh", torch.float32, "contiguous", True, True, ""),
    ("tanh", torch.float64, "channels_last", False, True, "reference"),
    ("tanh", torch.bfloat16, "sliced", True, False, ""),
    ("tanh", torch.float32, "channels_last", False, True, ""),
    ("erf", torch.float32, "sliced", False, True, ""),
    ("erf", torch.float64, "contiguous", True, True, ""),
    ("erf", torch.bfloat16, "channels_last", False, True, "reference"),
    ("erf", torch.float32, "contiguous", True, False, "reference"),
]


@pytest.mark.parametrize("case", _PW_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_opcheck_pointwise(case):
    kind, dtype, layout, cl, affine, backend = case
    x = _input(SHAPE, dtype, layout)
    p = SHAPE[-1] if cl else SHAPE[1]
    g = torch.Generator().manual_seed(1)
    w = (1 + 0.2 * torch.randn(p, generator=g)).to(dtype) if affine else None
    b = (0.1 * torch.randn(p, generator=g)).to(dtype) if affine else None
    a, s = torch.tensor([0.6], dtype=dtype), torch.tensor([0.1], dtype=dtype)
    params = (a,) if kind == "tanh" else (a, s)
    op, bop = getattr(N, f"dynamic_{kind}"), getattr(N, f"dynamic_{kind}_backward")
    args = (x, *params, w, b, cl, backend)
    leaves = tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(op, leaves)
    y = op(*args)
    if not cl and layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    mask = [True, True] + ([True] if kind == "erf" else []) + [affine, affine]
    torch.library.opcheck(bop, (torch.randn_like(y), x, *params, w, b, cl, backend, mask))


@pytest.mark.parametrize("case", [(torch.float32, "contiguous", True, ""), (torch.float64, "channels_last", True, ""),
                                  (torch.bfloat16, "sliced", False, ""), (torch.float32, "sliced", True, "reference"),
                                  (torch.float32, "contiguous", False, "")],
                         ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_opcheck_filter_response_norm(case):
    dtype, layout, affine, backend = case
    x = _input(SHAPE, dtype, layout)
    g = torch.Generator().manual_seed(2)
    w, b, tau = ((torch.randn(SHAPE[1], generator=g) * 0.3 + v).to(dtype) if affine else None for v in (1.0, 0.0, -0.2))
    args = (x, w, b, tau, 1e-6, backend)
    torch.library.opcheck(N.filter_response_norm, tuple(
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args))
    y, rstd = N.filter_response_norm(*args)
    mask = [True, affine, affine, affine]
    torch.library.opcheck(N.filter_response_norm_backward, (torch.randn_like(y), x, w, b, tau, rstd, 1e-6, backend, mask))


# ---- EvoNorm-S0: opcheck of forward and backward; values are compared with the paper's formula
# in tests/test_evonorm.py.
EVONORM_OPS = {"evonorm_s0", "evonorm_s0_backward"}


@pytest.mark.parametrize("case", [(torch.float32, "contiguous", True, ""), (torch.float64, "channels_last", True, ""),
                                  (torch.bfloat16, "sliced", True, ""), (torch.float32, "channels_last", False, ""),
                                  (torch.float32, "sliced", True, "reference")],
                         ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_opcheck_evonorm_s0(case):
    dtype, layout, gate, backend = case
    x = _input(SHAPE, dtype, layout)
    g = torch.Generator().manual_seed(3)
    w, b, v = ((torch.randn(SHAPE[1], generator=g) * 0.3 + m).to(dtype) for m in (1.0, 0.0, 1.0))
    v = v if gate else None
    args = (x, w, b, v, 3, 1e-5, backend)
    torch.library.opcheck(N.evonorm_s0, tuple(
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args))
    y, mean, rstd = N.evonorm_s0(*args)
    assert mean.shape == rstd.shape == (SHAPE[0], 3)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    mask = [True, True, True, gate]
    torch.library.opcheck(N.evonorm_s0_backward, (torch.randn_like(y), x, w, b, v, mean, rstd, 3, 1e-5, backend, mask))


EVONORM_OPS |= {"evonorm_b0", "evonorm_b0_backward"}


@pytest.mark.parametrize("case", [(torch.float32, "contiguous", True, True, ""),
                                  (torch.float64, "channels_last", True, False, ""),
                                  (torch.bfloat16, "sliced", True, True, ""),
                                  (torch.float32, "channels_last", False, True, ""),
                                  (torch.float32, "sliced", True, False, "reference")],
                         ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_opcheck_evonorm_b0(case):
    dtype, layout, gate, training, backend = case
    x = _input(SHAPE, dtype, layout)
    g = torch.Generator().manual_seed(4)
    w, b, v = ((torch.randn(SHAPE[1], generator=g) * 0.3 + m).to(dtype) for m in (1.0, 0.0, 1.0))
    v = v if gate else None
    run = None if training else (torch.rand(SHAPE[1], generator=g) + 0.5).to(dtype)
    args = (x, w, b, v, run, 1e-5, backend)
    torch.library.opcheck(N.evonorm_b0, tuple(
        t.detach().requires_grad_() if (isinstance(t, torch.Tensor) and t is not run) else t for t in args))
    y, *stats = N.evonorm_b0(*args)
    assert stats[0].shape == ((SHAPE[1],) if training else (0,)) and stats[2].shape == SHAPE[:2]
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    mask = [True, True, True, gate]
    torch.library.opcheck(N.evonorm_b0_backward, (torch.randn_like(y), x, w, b, v, *stats, training, 1e-5, backend,
                                                  mask))
