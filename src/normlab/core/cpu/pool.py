"""Output buffers: a free-list of page-backed numpy blocks for the large outputs (y, dx).

Outputs of at least ``POOL_MIN_BYTES`` come from the pool (numpy advises transparent huge pages
for large arrays), wrapped with ``torch.from_numpy``: a block returns to the pool only when the
last tensor/view/saved-variable referencing it is freed (a weak reference to the array that the
tensor's storage owns), so reuse can never alias live data. This avoids the page faults of a
fresh multi-MiB allocation (the glibc allocator behind ``torch.empty`` returns large blocks to
the OS on free, and faulting them back in costs as much as the normalization itself). Pool size:
``NORMLAB_CPU_POOL_MB`` (default 2048; 0 disables), or :func:`set_buffer_pool`. Pool-backed
tensors are ordinary tensors except that their storage cannot grow (``resize_`` to a larger size
raises). Smaller outputs, dγ/dβ and the statistics use ``torch.empty`` or numpy allocations.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

from normlab.core.cpu.params import NP_DTYPE

__all__ = ["POOL_MIN_BYTES", "BufferPool", "pool", "set_buffer_pool", "clear_buffer_pool",
           "buffer_pool_stats"]

POOL_MIN_BYTES = 1 << 20


class BufferPool:
    """Free-list of page-backed numpy blocks keyed by exact byte size (see the module docstring)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._live: dict = {}  # id(weakref to a handed-out array) -> (weakref, block)
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def empty(self, shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A tensor of ``shape``/``strides`` (elements; dense) that is not a view."""
        npd = NP_DTYPE[dtype]
        itemsize = 4 if npd is np.float32 else 8
        nbytes = math.prod(shape) * itemsize
        if self.max_bytes <= 0 or nbytes < POOL_MIN_BYTES:
            return torch.empty_strided(shape, strides, dtype=dtype)
        block = None
        with self._lock:
            blocks = self._free.get(nbytes)
            if blocks:
                block = blocks.pop()
                self._free_bytes -= nbytes
                self.hits += 1
            else:
                self.misses += 1
        if block is None:
            block = np.empty(nbytes, np.uint8)
        arr = np.ndarray(shape, npd, buffer=block, strides=tuple(st * itemsize for st in strides))
        # The tensor's storage owns `arr`: when the storage dies (last tensor, view or saved
        # variable gone) `arr` dies, the weak reference fires, and only then the block goes
        # back to the free list.
        ref = weakref.ref(arr, self._release)
        self._live[id(ref)] = (ref, block)  # keeps the weak reference (and its callback) alive
        return torch.from_numpy(arr)

    def _release(self, ref) -> None:
        entry = self._live.pop(id(ref), None)
        if entry is None:
            return
        block = entry[1]
        nbytes = block.nbytes
        with self._lock:
            if self._free_bytes + nbytes > self.max_bytes:
                return  # over budget: let the block be freed
            self._free.setdefault(nbytes, []).append(block)
            self._free_bytes += nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes = 0


pool = BufferPool(int(float(os.environ.get("NORMLAB_CPU_POOL_MB", "2048")) * (1 << 20)))


def set_buffer_pool(max_mb: float) -> None:
    """Cap the cached free output buffers at ``max_mb`` MiB (0 disables the pool)."""
    pool.max_bytes = int(max_mb * (1 << 20))
    if pool.max_bytes <= 0:
        pool.clear()


def clear_buffer_pool() -> None:
    """Drop every cached free buffer (live outputs are unaffected)."""
    pool.clear()


def buffer_pool_stats() -> dict:
    """hits / misses / bytes currently cached / cap."""
    return {"hits": pool.hits, "misses": pool.misses, "free_bytes": pool._free_bytes,
            "max_bytes": pool.max_bytes}
