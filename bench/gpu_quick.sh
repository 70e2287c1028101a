#!/usr/bin/env bash
# The whole GPU suite on one CUDA GPU, meant to finish in under 8 minutes on an H100-class GPU
# (never run yet: no GPU was available when it was written; the time limits below are guesses:
# 270 s for the tests, which compile every kernel specialisation they reach, 180 s for the
# 32-case quick benchmark, whose torch.compile contender compiles two graphs per case):
#   1. tests/test_gpu_backend.py with the compiled Triton kernels on CUDA tensors, unmarked
#      (the tests marked slow too; TRITON_INTERPRET is not set when a CUDA device exists);
#   2. `normlab bench kernels --device cuda --quick`: torch native, torch.compile and the gpu
#      backend, CUDA-event medians, GB/s and % of a device-to-device copy from the same run.
# Usage: bash bench/gpu_quick.sh [OUT_DIR]   (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-bench-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_quick.sh: no CUDA device (torch.cuda.is_available() is False)")
import triton
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
PYEOF
date -u +"%Y-%m-%d %H:%M UTC" | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true

start=$SECONDS
echo "== tests (compiled kernels, slow ones included)"
timeout 270 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu_backend.py 2>&1 | tee "$OUT/tests.txt"
echo "== bench kernels --device cuda --quick"
timeout 180 "$PY" -c "from normlab.cli import main; main()" bench kernels --device cuda --quick --out "$OUT" \
    2>&1 | tee "$OUT/bench.txt"
echo "gpu_quick.sh: $((SECONDS - start)) s; results in $OUT"
