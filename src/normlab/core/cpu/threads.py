"""Threads: numba's thread count follows torch's, small problems run on one thread, and kernel
launches are serialized under numba's workqueue layer.

Every call sets numba's thread count to ``torch.get_num_threads()`` (capped at
``numba.config.NUMBA_NUM_THREADS``), so ``torch.set_num_threads`` controls both; inputs of fewer
than ``PARALLEL_MIN_NUMEL`` elements run on one thread (waking the pool would cost more than it
saves).
"""

from __future__ import annotations

import threading

import numba
import torch

__all__ = ["PARALLEL_MIN_NUMEL", "start_pool", "launch", "threads"]

# Below this many elements a call runs on one thread: waking the worker threads costs more
# than it saves (tens of µs on an idle machine, milliseconds on an oversubscribed one).
PARALLEL_MIN_NUMEL = 1 << 15

_pool_started = False


def start_pool() -> None:
    """Start numba's thread pool once, keeping torch's thread count.

    Launching numba's OpenMP layer resets the process-wide OpenMP thread count, which silently
    changed ``torch.get_num_threads()`` (e.g. from a sweep worker's 1 back to the core count).
    """
    global _pool_started
    torch_threads = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _pool_started = True


# numba's workqueue threading layer aborts the process when two Python threads launch parallel
# kernels at once (omp and tbb are thread-safe); kernels launched under that layer take a lock.
_launch_lock = threading.RLock()

_serialize: bool | None = None


def launch(kernel, *args) -> None:
    """Run a parallel kernel (under a lock when numba's threading layer is not thread-safe)."""
    global _serialize
    if _serialize is None:
        start_pool()
        _serialize = numba.threading_layer() == "workqueue"
    if _serialize:
        with _launch_lock:
            kernel(*args)
    else:
        kernel(*args)


_numba_threads = threading.local()  # numba's thread count is per calling thread: remember it


def threads(numel: int) -> int:
    """numba's thread count := torch's (capped by numba's pool), 1 for small problems."""
    if not _pool_started:
        start_pool()
    n = 1 if numel < PARALLEL_MIN_NUMEL else max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_numba_threads, "n", None) != n:
        numba.set_num_threads(n)
        _numba_threads.n = n
    return n
