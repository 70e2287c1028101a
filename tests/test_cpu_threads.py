"""The CPU backend under threads: concurrent callers, numba's threading layers, background compile."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

SCRIPT = textwrap.dedent("""
    import threading, torch, normlab
    torch.manual_seed(0)
    layer = normlab.LayerNorm(4096)
    bn = normlab.BatchNorm2d(32).eval()
    xs = [torch.randn(64, 4096) for _ in range(4)]
    xb = torch.randn(8, 32, 16, 16)
    expected = [torch.nn.functional.layer_norm(x, (4096,)) for x in xs]
    expected_bn = torch.nn.functional.batch_norm(xb, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    errors = []
    def work():
        try:
            for _ in range(30):
                for x, e in zip(xs, expected):
                    torch.testing.assert_close(layer(x), e, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(bn(xb), expected_bn, rtol=1e-5, atol=1e-5)
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    print("ok", normlab.core.cpu.COMPILE_MODE)
""")


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["workqueue", "omp"])
@pytest.mark.parametrize("mode", ["background"])
def test_concurrent_threads_during_background_compile(layer, mode):
    """Four Python threads share layers while the kernels compile in the background (reference
    fallback, then kernels): no abort under either threading layer, right outputs throughout.
    (The lazy mode's concurrency is tests/test_interop.py::test_two_threads_never_abort.)"""
    env = dict(os.environ, NORMLAB_CPU_COMPILE=mode)
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"ok {mode}"
