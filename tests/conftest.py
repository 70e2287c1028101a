"""Shared fixtures and helpers for the normlab core test-suite.

* ``backend`` fixture: every core test runs once under the reference backend
  (``normlab.use_backend("reference")``) and once under the default dispatch.
* ``TOL`` / ``assert_close``: per-dtype tolerances.  Low-precision results
  (bfloat16 / float16) are always compared against a float32 (or float64)
  computation on the *same* (already rounded) inputs, so the tolerance only
  has to absorb the rounding of the result, never a different input.
* ``make_input``: deterministic inputs in a given memory layout
  (contiguous, channels_last, reversed strides, N/C swapped, sliced).
"""
from __future__ import annotations

import contextlib
import os

# numba's OpenMP threading layer (the CPU backend) and torch each keep OpenMP
# worker threads; with the default (active) wait policy the idle workers of one
# spin after every parallel region and starve the other -- on a loaded 2-core
# machine a torch op right after a normlab kernel takes ~75 ms instead of
# ~0.05 ms.  Passive waiting only affects speed, never results.  Must be set
# before the OpenMP runtime starts (i.e. before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels (tests/test_gpu_*.py) run in Triton's interpreter on CPU
# tensors. Triton reads TRITON_INTERPRET when it is first imported (and torch._dynamo imports it
# as soon as normlab is imported), so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ["reference", "default"]

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# --------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------
@contextlib.contextmanager
def backend_ctx(name: str):
    """Run the body under backend ``name`` ("default" = normal dispatch)."""
    if name == "default":
        yield
        return
    import normlab

    with normlab.use_backend(name):
        yield


@pytest.fixture(scope="module")
def single_thread():
    """One torch intra-op thread for the module (use via ``pytestmark``).

    The core spec is dominated by many tiny tensors; on a shared 2-core machine
    torch's intra-op thread pool makes each tiny op ~25x slower (spinning
    threads).  Set NORMLAB_TEST_TORCH_THREADS to override."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("NORMLAB_TEST_TORCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with backend_ctx(request.param):
        yield request.param


# --------------------------------------------------------------------------
# tolerances
# --------------------------------------------------------------------------
# rtol applies element-wise; atol is multiplied by the scale of the expected
# tensor (max |expected|, floored at 1 -- the natural size of normalized
# outputs and of the terms that make up their gradients for O(1) grad_outputs,
# e.g. the input gradient of a 2-sample batch norm is exactly 0 and both sides
# only hold rounding noise of O(1)-sized terms) so reductions with large
# results (weight/bias gradients) are judged relative to their magnitude.
#
# bfloat16 / float16: a result computed in float32 and rounded once is off by
# at most half an ulp = 2**-8 (bf16) / 2**-11 (fp16) relative.  The atol term
# (same size, relative to the tensor's scale) leaves room for one extra
# rounding of an intermediate of the size of the output.  (Measured: torch's
# own bf16 CPU kernels meet this for outputs and input/bias gradients of BN,
# GN, IN and LN but not for LayerNorm's weight gradient; an implementation
# that accumulates in 16 bits misses it by orders of magnitude.)
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2.0**-8, atol=2.0**-8),
    torch.float16: dict(rtol=2.0**-11, atol=2.0**-11),
}


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype in which the torch twin / reference is evaluated.

    16-bit results are compared with the twin in float32 (as the spec asks);
    float32 results with the twin in float64, so the comparison measures
    normlab's own float32 error and not torch's float32 rounding (torch's
    float32 LayerNorm of a single element, e.g., is off by 1/sqrt(eps) * ulp)."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return torch.float64


def assert_close(actual, expected, dtype=None, *, scale=None, msg="", rtol=None, atol=None):
    """Compare ``actual`` (normlab) with ``expected`` (torch / reference).

    ``dtype`` selects the tolerance (defaults to ``actual.dtype``)."""
    assert actual is not None, f"{msg}: actual is None"
    assert expected is not None, f"{msg}: expected is None"
    dtype = dtype or actual.dtype
    tol = TOL[dtype]
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if scale is None:
        finite = e[torch.isfinite(e)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        scale = max(scale, 1.0)
    r = tol["rtol"] if rtol is None else rtol
    t = (tol["atol"] if atol is None else atol) * scale
    torch.testing.assert_close(a, e, rtol=r, atol=t, equal_nan=True, msg=lambda m: f"{msg}\n{m}")


# --------------------------------------------------------------------------
# inputs / layouts
# --------------------------------------------------------------------------
LAYOUTS = ["contiguous", "channels_last", "reversed", "swap01", "sliced"]


def memory_format_for(ndim: int):
    if ndim == 4:
        return torch.channels_last
    if ndim == 5:
        return torch.channels_last_3d
    return None


def randn(shape, seed=0, dtype=torch.float64, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def make_input(shape, dtype=torch.float32, layout="contiguous", seed=0, scale=1.0, offset=0.0,
               requires_grad=True):
    """A leaf tensor of ``shape``/``dtype`` with values from ``randn(shape, seed)``
    (rounded to ``dtype``) stored in the requested ``layout``:

    contiguous     -- row-major
    channels_last  -- torch.channels_last (4-D) / channels_last_3d (5-D)
    reversed       -- all strides reversed (a permuted view of a contiguous buffer)
    swap01         -- batch and channel dims swapped in memory (``x.transpose(0, 1)`` view)
    sliced         -- every other element of a larger buffer along the last dim
                      (non-dense, non-zero storage offset)
    """
    shape = tuple(shape)
    v = randn(shape, seed, torch.float64, scale, offset).to(dtype)
    nd = len(shape)
    if layout == "contiguous":
        x = v.contiguous()
    elif layout == "channels_last":
        fmt = memory_format_for(nd)
        if fmt is None:
            raise ValueError(f"channels_last needs a 4-D or 5-D shape, got {shape}")
        x = v.contiguous(memory_format=fmt)
    elif layout == "reversed":
        perm = list(range(nd))[::-1]
        x = v.permute(perm).contiguous().permute(perm)
    elif layout == "swap01":
        x = v.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced":
        big = torch.zeros(shape[:-1] + (2 * shape[-1] + 1,), dtype=dtype)
        big[..., 1::2] = v
        x = big[..., 1::2]
    else:  # pragma: no cover
        raise ValueError(layout)
    assert torch.equal(x, v)
    return x.detach().requires_grad_(requires_grad)


def twin_input(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """Contiguous copy of ``x`` (as a fresh leaf) in ``dtype`` for the torch twin."""
    dtype = dtype or ref_dtype(x.dtype)
    return x.detach().to(dtype).contiguous().requires_grad_(x.requires_grad)


# --------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------
def randomize_module_(m: torch.nn.Module, seed: int = 0, nbt: int | None = None):
    """Deterministically fill parameters and float buffers with non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("weight"):
                r = 1.0 + 0.5 * r
            p.copy_(r.to(p.dtype))
        for name, b in m.named_buffers():
            if b is None:
                continue
            if name.endswith("running_mean"):
                b.copy_((0.5 * torch.randn(b.shape, generator=g, dtype=torch.float64)).to(b.dtype))
            elif name.endswith("running_var"):
                b.copy_((0.5 + 1.5 * torch.rand(b.shape, generator=g, dtype=torch.float64)).to(b.dtype))
            elif name.endswith("num_batches_tracked") and nbt is not None:
                b.fill_(nbt)
    return m


def copy_state_(dst: torch.nn.Module, src: torch.nn.Module):
    """Copy params/buffers by name, converting dtype (used to build twins)."""
    sd = src.state_dict()
    with torch.no_grad():
        for k, v in dst.state_dict().items():
            v.copy_(sd[k].to(v.dtype))
    return dst


def bad_value_regex(*patterns: str) -> str:
    """Regex that matches when *all* patterns occur somewhere in the message."""
    return "(?s)^" + "".join(f"(?=.*{p})" for p in patterns)


def num(value) -> str:
    """Regex for a number printed on its own (not part of a longer number)."""
    if isinstance(value, float) and value.is_integer():
        body = f"{int(value)}(\\.0*)?"
    elif isinstance(value, float):
        body = repr(value).replace(".", "\\.").replace("-", "\\-")
    else:
        body = str(value).replace("-", "\\-")
    return f"(?<![\\d.]){body}(?![\\d])"


@pytest.fixture
def deterministic_seed():
    """Reset torch's global RNG (module inits, e.g. torch.nn.Linear) before each test."""
    torch.manual_seed(0)
    yield


__all__ = [
    "BACKENDS", "FLOAT_DTYPES", "TOL", "LAYOUTS", "assert_close", "backend_ctx", "make_input",
    "twin_input", "randomize_module_", "copy_state_", "memory_format_for", "randn", "ref_dtype",
    "bad_value_regex", "num",
]
