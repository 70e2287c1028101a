"""Prebuild the CPU kernels into numba's disk cache.

    python -m normlab.core.cpu [float32] [float64] [--families nchw,rows]

The kernel families (:data:`normlab.core.cpu.WARMUP_FAMILIES`: ``nhwc``, ``nchw``, ``rows``,
``pointwise``, ``dyt`` (DyT/Derf only, part of ``pointwise``); default all) are compiled by up to two processes side by side (``warmup(part=i,
parts=n)``); numba compiles on one thread, so on 2 cores this about halves a cold build. Numba
re-reads a function's cache index just before adding an entry, so two processes compiling the
same kernel at once (a few are shared between layouts) cost duplicate work, not a broken cache.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from normlab.core.cpu import WARMUP_FAMILIES, warmup

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def main(argv: list[str]) -> int:
    families = list(WARMUP_FAMILIES)
    if "--families" in argv:
        i = argv.index("--families")
        if i + 1 >= len(argv):
            print("--families: expected a comma-separated list, got nothing", file=sys.stderr)
            return 2
        families = argv[i + 1].split(",")
        argv = argv[:i] + argv[i + 2:]
        bad = [f for f in families if f not in WARMUP_FAMILIES]
        if bad:
            print(f"--families: expected some of {list(WARMUP_FAMILIES)}, got {bad[0]!r}", file=sys.stderr)
            return 2
    names = argv or list(_DTYPES)
    bad = [n for n in names if n not in _DTYPES]
    if bad:
        print(f"dtype: expected some of {sorted(_DTYPES)}, got {bad[0]!r}", file=sys.stderr)
        return 2
    dtypes = tuple(_DTYPES[n] for n in names)
    if os.environ.get("_NORMLAB_WARMUP_PART"):
        part, parts = map(int, os.environ["_NORMLAB_WARMUP_PART"].split("/"))
        warmup(dtypes, families=families, part=part, parts=parts)
        return 0
    parts = max(1, min(2, os.cpu_count() or 1, len(families)))
    procs = [subprocess.Popen([sys.executable, "-m", "normlab.core.cpu", *names, "--families", ",".join(families)],
                              env={**os.environ, "_NORMLAB_WARMUP_PART": f"{i}/{parts}"})
             for i in range(parts)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
