"""Per-layer forward + backward: torch.nn's layer vs its normlab twin, with and without the eager
fast lane (``core/ops.py`` ``_Lane``), interleaved in one process.

    python bench/layer_ab.py [threads]

Each case alternates the three contenders (order reversed every repetition), 15 repetitions of
40 calls, and prints the medians in µs and torch ÷ normlab (above 1: normlab faster). The shapes
are those of the small models of ``normlab bench e2e`` (ResNet-18 at width 16, ViT, a
transformer block).
"""
import copy
import statistics
import sys
import time

import torch

import normlab
from normlab.core import ops

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
CASES = [
    ("BatchNorm2d", (16, 128, 4, 4), lambda: torch.nn.BatchNorm2d(128)),
    ("BatchNorm2d", (16, 16, 32, 32), lambda: torch.nn.BatchNorm2d(16)),
    ("GroupNorm(8)", (16, 64, 8, 8), lambda: torch.nn.GroupNorm(8, 64)),
    ("LayerNorm(96)", (16, 65, 96), lambda: torch.nn.LayerNorm(96)),
    ("RMSNorm(64)", (16, 64, 64), lambda: torch.nn.RMSNorm(64)),
]
LANE = ops._LANE_OPS

for name, shape, make in CASES:
    x = torch.randn(*shape).requires_grad_()
    g = torch.randn(*shape)
    theirs = make()
    ours = normlab.convert(copy.deepcopy(theirs))

    def step(m):
        m(x).backward(g)

    def lane_on():
        ops._LANE_OPS = LANE
        step(ours)

    def lane_off():
        ops._LANE_OPS = frozenset()
        step(ours)

    contenders = [("torch", lambda: step(theirs)), ("lane", lane_on), ("no lane", lane_off)]
    for _ in range(30):
        for _k, f in contenders:
            f()
    times = {k: [] for k, _ in contenders}
    for rep in range(15):
        for k, f in contenders if rep % 2 == 0 else contenders[::-1]:
            t = time.perf_counter()
            for _ in range(40):
                f()
            times[k].append((time.perf_counter() - t) / 40 * 1e6)
    ops._LANE_OPS = LANE
    md = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name:14} {str(shape):16} torch {md['torch']:7.1f} µs | normlab {md['lane']:7.1f} µs "
          f"(x{md['torch'] / md['lane']:.2f}) | without the lane {md['no lane']:7.1f} µs "
          f"(x{md['torch'] / md['no lane']:.2f})")
