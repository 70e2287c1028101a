"""Triton kernels of the fused operators (core/gpu/fused.py) against the reference backend in float64.

Without a GPU they run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set here
before triton is imported), on small shapes; on a CUDA machine the same comparisons run on the GPU.
Inputs are rounded to the tested dtype first and the reference evaluates the same values in
float64, so the tolerance (conftest.TOL) only absorbs the kernels' own rounding. The fuller
product (more shapes, float16, long rows split into chunks) is marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# triton's own library functions (tl.zeros, ...) are interpreted only when TRITON_INTERPRET=1 was
# set before triton was first imported; importing normlab imports triton (through torch), so a
# session that imported normlab before this module cannot interpret: the tests then run in a
# fresh process (test_in_fresh_process).
_TRITON_BEFORE = "triton" in sys.modules
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from conftest import assert_close  # noqa: E402
from normlab.core import reference  # noqa: E402

K = pytest.importorskip("normlab.core.gpu.fused")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

EPS = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FRESH = DEVICE == "cpu" and _TRITON_BEFORE and type(triton.language.standard.zeros).__name__ != "InterpretedFunction"
here = pytest.mark.skipif(FRESH, reason="triton was imported before TRITON_INTERPRET: run by test_in_fresh_process")


def _fresh(markers: str) -> None:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", markers, __file__],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.mark.skipif(not FRESH, reason="this process interprets the kernels itself")
def test_in_fresh_process():
    _fresh("not slow")


@pytest.mark.slow
@pytest.mark.skipif(not FRESH, reason="this process interprets the kernels itself")
def test_in_fresh_process_slow():
    _fresh("slow")


def _rand(shape, seed, dtype, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype).to(DEVICE)


def _nhwc(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def _d(t):
    return None if t is None else t.double()


def _close(got, want, dtype, msg):
    assert got is not None, msg
    assert_close(got.cpu(), want.cpu(), dtype, msg=msg)


def _check_add_ln(shape, k, dtype, rms, affine, with_ds, offset=0.0):
    pshape = shape[len(shape) - k:]
    x, r = _rand(shape, 0, dtype, 1.5, offset), _rand(shape, 1, dtype)
    w = _rand(pshape, 2, dtype, 0.3, 1.0) if affine else None
    b = _rand(pshape, 3, dtype, 0.3) if (affine and not rms) else None
    y, s, mean, var, rstd = K.add_layer_norm(x, r, k, w, b, EPS, rms=rms)
    assert torch.equal(s, x + r), "s is x + residual rounded to the input dtype"
    ey, _, emean, evar, erstd = reference.add_layer_norm(s.double(), torch.zeros_like(s, dtype=torch.float64), k,
                                                         _d(w), _d(b), EPS, rms=rms)
    _close(y, ey, dtype, "y")
    _close(var, evar, torch.float32, "var")
    _close(rstd, erstd, torch.float32, "rstd")
    if not rms:
        _close(mean, emean, torch.float32, "mean")
    dy = _rand(shape, 4, dtype)
    ds = _rand(shape, 5, dtype) if with_ds else None
    mask = (True, affine, affine and not rms)
    got = K.add_layer_norm_backward(dy, ds, s, w, mean, rstd, k, EPS, rms=rms, mask=mask)
    want = reference.add_layer_norm_backward(dy.double(), _d(ds), s.double(), _d(w), emean, erstd, k, EPS, rms=rms,
                                             mask=mask)
    for name, gi, wi, m in zip(["dsum", "dweight", "dbias"], got, want, mask):
        if m:
            _close(gi, wi, dtype, name)
            assert gi.shape == wi.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("case", [((5, 24), 1, True, True), ((2, 3, 4, 5), 2, False, False), ((3, 40), 1, True, False)],
                         ids=lambda c: f"{len(c[0])}d-k{c[1]}-affine{int(c[2])}-ds{int(c[3])}")
@here
def test_add_layer_norm_kernels(dtype, rms, case):
    shape, k, affine, with_ds = case
    _check_add_ln(shape, k, dtype, rms, affine, with_ds)


@here
def test_add_layer_norm_offset_keeps_float32_precision():
    """Two-pass centred statistics: an offset of 1e3 with unit spread keeps float32 precision."""
    _check_add_ln((4, 64), 1, torch.float32, False, True, True, offset=1e3)


def _check_gn(shape, groups, dtype, layout, affine, wmask=None):
    c = shape[1]
    x = _nhwc(_rand(shape, 0, dtype, 1.5, 0.3), layout)
    w = _rand((c,), 1, dtype, 0.5, 1.0) if affine else None
    b = _rand((c,), 2, dtype, 0.5) if affine else None
    y, mean, var, rstd = K.group_norm_silu(x, groups, w, b, EPS)
    ey, emean, evar, erstd = reference.group_norm_silu(x.double(), groups, _d(w), _d(b), EPS)
    _close(y, ey, dtype, "y")
    for name, gi, wi in (("mean", mean, emean), ("var", var, evar), ("rstd", rstd, erstd)):
        _close(gi, wi, torch.float32, name)
    if layout == "nhwc":
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = _rand(shape, 3, dtype)
    mask = wmask or (True, affine, affine)
    got = K.group_norm_silu_backward(dy, x, w, b, mean, rstd, groups, EPS, mask=mask)
    want = reference.group_norm_silu_backward(dy.double(), x.double(), _d(w), _d(b), emean, erstd, groups, EPS,
                                              mask=mask)
    for name, gi, wi, m in zip(["dx", "dweight", "dbias"], got, want, mask):
        if m:
            _close(gi, wi, dtype, name)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_group_norm_silu_kernels(dtype, layout):
    _check_gn((2, 6, 3, 5), 3, dtype, layout, True)


@here
def test_group_norm_silu_kernels_no_affine_3d():
    _check_gn((3, 4, 7), 2, torch.float32, "nchw", False)
    _check_gn((2, 4, 3, 3), 2, torch.float32, "nchw", True, wmask=(False, True, True))


def _check_bn(shape, dtype, layout, affine, training=True):
    c = shape[1]
    x = _nhwc(_rand(shape, 0, dtype, 1.5, 0.3), layout)
    w = _rand((c,), 1, dtype, 0.5, 1.0) if affine else None
    b = _rand((c,), 2, dtype, 0.5) if affine else None
    if not training:
        rm, rv = _rand((c,), 3, dtype, 0.3), _rand((c,), 4, dtype).abs().add(0.5).to(dtype)
        y = K.batch_norm_relu_eval(x, rm, rv, w, b, EPS)
        _close(y, reference.batch_norm_relu_eval(x.double(), rm.double(), rv.double(), _d(w), _d(b), EPS), dtype, "y")
        return
    y, mean, var, rstd = K.batch_norm_relu(x, w, b, EPS)
    ey, emean, evar, erstd = reference.batch_norm_relu(x.double(), _d(w), _d(b), EPS)
    _close(y, ey, dtype, "y")
    for name, gi, wi in (("mean", mean, emean), ("var", var, evar), ("rstd", rstd, erstd)):
        _close(gi, wi, torch.float32, name)
    if layout == "nhwc":
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = _rand(shape, 5, dtype)
    mask = (True, affine, affine)
    got = K.batch_norm_relu_backward(dy, y, x, w, mean, rstd, EPS, mask=mask)
    # the reference's ReLU mask from its own float64 y: the same positions (y > 0 ⇔ z > 0)
    want = reference.batch_norm_relu_backward(dy.double(), ey, x.double(), _d(w), emean, erstd, EPS, mask=mask)
    for name, gi, wi, m in zip(["dx", "dweight", "dbias"], got, want, mask):
        if m:
            _close(gi, wi, dtype, name)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_relu_kernels(dtype, layout, training):
    _check_bn((3, 4, 3, 5), dtype, layout, True, training)


@here
def test_batch_norm_relu_kernels_matrix_and_no_affine():
    _check_bn((6, 5), torch.float32, "nchw", False)
    _check_bn((6, 5), torch.float32, "nchw", True, training=False)


@here
def test_nan_propagates():
    x = _rand((2, 4, 3, 3), 0, torch.float32)
    x[0, 1, 1, 1] = float("nan")
    y = K.batch_norm_relu(x, None, None, EPS)[0]
    assert torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, 0]).any()
    y = K.group_norm_silu(x, 2, None, None, EPS)[0]
    assert torch.isnan(y[0, :2]).all() and not torch.isnan(y[1]).any()


@here
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fused_kernels_full_product(dtype):
    for rms in (False, True):
        _check_add_ln((3, 2100), 1, dtype, rms, True, True)  # a row in 3 chunks of 1024
        _check_add_ln((2, 3, 7, 9), 2, dtype, rms, True, False)
    for layout in ("nchw", "nhwc"):
        _check_gn((2, 8, 9, 7), 4, dtype, layout, True)
        _check_gn((2, 8, 40, 30), 2, dtype, layout, True)  # positions in several chunks
        _check_bn((4, 3, 17, 19), dtype, layout, True)
        _check_bn((2, 3, 5, 7), dtype, layout, True, training=False)
