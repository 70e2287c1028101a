"""Shared settings of the numba kernels: compile flags, on-disk cache location, block sizes.

Compile flags
    Every kernel is ``njit(parallel=True, cache=True, fastmath=FASTMATH)`` with
    ``FASTMATH = {"reassoc", "nsz"}``: re-association lets LLVM vectorize the reductions.
    The flags that assume finite values (``nnan``, ``ninf``, hence also the blanket
    ``fastmath=True``) are never used, so NaN and Inf propagate. One caveat, found the hard
    way: numba lowers ``np.isfinite(v)`` as "``v − v`` is ordered", and inside a ``reassoc``
    kernel LLVM may fold ``v − v`` to 0; the kernels therefore detect overflow with an ordered
    comparison against a finite bound (``b2 <= BIG`` is False for +inf and NaN). ``contract``
    (FMA formation) is left out on purpose: the backward recomputes g = γ·dy exactly as the
    forward sum did, so exact cancellations (a group of one element) stay exact instead of
    leaving an FMA residual amplified by 1/sqrt(eps). The hi/lo split of the mean is compiled
    without any fast-math flag (see ``split_mean``).

On-disk cache (compiled on first use, reused by later processes)
    The cache goes to, in order (the README's order): ``$NUMBA_CACHE_DIR`` if set (numba's own
    setting, always honoured first), ``$NORMLAB_NUMBA_CACHE_DIR`` if set, numba's user-wide cache
    (``~/.cache/numba``), and finally ``<tempdir>/normlab-numba-cache-<uid>`` — never the
    installed package's ``__pycache__``. A cache file is code that is loaded and run, so a folder
    is used only as ``ssh`` uses ``~/.ssh``: created private (0700), and only if it is a real
    directory owned by this user and not writable by group or others (another local user who
    pre-creates ``/tmp/normlab-numba-cache-<uid>`` cannot plant kernels). If no folder passes,
    the kernels are compiled in every process (``cache=False``) instead of failing. The override
    is applied only while the normlab kernels are decorated, so other numba code in the process
    is unaffected. ``CACHE_DIR`` below records the choice (``None``: ``$NUMBA_CACHE_DIR``).
    numba invalidates a kernel's cache when the kernel's source file changes; ``kernel`` also
    ties it to this module's source (flags, block sizes, helpers).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile

import numba
import numpy as np
from numba import njit

__all__ = ["FASTMATH", "CACHE", "CACHE_DIR", "BLOCK", "kernel", "helper", "split_mean"]

FASTMATH = {"reassoc", "nsz"}

# Elements summed in the input dtype before the block sum is added to a float64 accumulator.
# Within a block LLVM spreads the sum over 16-64 vector lanes, so each lane adds only a handful
# of terms: float32 block sums are as accurate as a float64 sum for all practical purposes,
# while the float64 accumulation across blocks keeps long rows (and 1e6 offsets) exact.
BLOCK = 512


def _writable(path: str) -> bool:
    """Whether ``path`` is a safe cache folder (created 0700 if missing) that we can write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        uid = os.getuid() if hasattr(os, "getuid") else None
        if not stat.S_ISDIR(st.st_mode):  # a symlink or a file planted in its place
            return False
        if uid is not None and (st.st_uid != uid or st.st_mode & 0o022):
            return False  # someone else's, or others may write (and plant) cache files
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _choose_cache_dir() -> tuple[bool, str | None]:
    """(cache enabled, directory to force or None for numba's own ``NUMBA_CACHE_DIR``)."""
    if numba.config.CACHE_DIR:  # NUMBA_CACHE_DIR: numba uses it for everything
        return True, None
    candidates = [os.environ.get("NORMLAB_NUMBA_CACHE_DIR")]
    try:
        from numba.misc.appdirs import AppDirs

        candidates.append(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    except Exception:  # pragma: no cover - numba internals moved
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    candidates.append(os.path.join(tempfile.gettempdir(), f"normlab-numba-cache-{uid}"))
    for path in candidates:
        if path and _writable(path):
            return True, path
    return False, None


CACHE, CACHE_DIR = _choose_cache_dir()


@contextlib.contextmanager
def _cache_dir_override():
    # numba resolves the cache locator when the function is decorated, so a temporary
    # override of numba.config.CACHE_DIR is enough and leaves other numba users alone.
    if CACHE_DIR is None:
        yield
        return
    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = CACHE_DIR
    try:
        yield
    finally:
        numba.config.CACHE_DIR = previous


def _common_stamp() -> str:
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


_COMMON_STAMP = _common_stamp()


def _stamp_with_common(dispatcher) -> None:
    """Make the on-disk cache also depend on this module (flags, BLOCK, helpers).

    numba keys a kernel's cache on its own source file only, so a change here would otherwise
    reuse stale machine code. Best effort: numba internals may move (then only the kernel's own
    source is checked, numba's default).
    """
    try:
        cache_file = dispatcher._cache._cache_file
        cache_file._source_stamp = (cache_file._source_stamp, _COMMON_STAMP)
    except AttributeError:  # pragma: no cover - caching disabled or numba internals moved
        pass


def kernel(fn):
    """Decorator of the parallel kernels (compiled lazily per dtype signature, cached on disk)."""
    with _cache_dir_override():
        disp = njit(parallel=True, cache=CACHE, fastmath=FASTMATH, nogil=True)(fn)
    _stamp_with_common(disp)
    return disp


def helper(fn):
    """Decorator of the serial building blocks the kernels call (same flags, no threads)."""
    with _cache_dir_override():
        disp = njit(cache=CACHE, fastmath=FASTMATH, nogil=True)(fn)
    _stamp_with_common(disp)
    return disp


def _split_mean(mu, x):
    """(hi, lo): hi = μ rounded to x's dtype, lo = μ − hi exactly (float64).

    Compiled WITHOUT fast-math flags: under ``reassoc`` LLVM folds ``μ − fpext(fptrunc(μ))``
    to 0, which would silently drop the part of the mean below float32 resolution (0.06 at
    an offset of 1e6). LLVM keeps per-instruction flags when it inlines this into a kernel.
    """
    hi = x.dtype.type(mu)
    return hi, mu - np.float64(hi)


with _cache_dir_override():
    split_mean = njit(cache=CACHE, nogil=True)(_split_mean)
