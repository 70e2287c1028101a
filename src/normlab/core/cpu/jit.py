"""Compilation of the numba kernels: flags, on-disk cache location, the decorators.

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
    without any fast-math flag (``strict``; see ``shared.split_mean``).

Decorators
    ``kernel``: the parallel entry points (one per family and direction). ``helper``: serial
    building blocks called inside the parallel loops on a range of rows (a call per range, so
    the call itself costs nothing). ``inline``: the small shared pieces of ``shared`` that sit
    inside inner loops; they are inlined into the caller's numba IR (``inline="always"``), so
    LLVM sees (and vectorizes) the same loop as if it were written out in place, with the
    caller's flags. ``strict``: no fast-math flags at all, never inlined at the IR level (LLVM
    keeps per-instruction flags when it inlines the compiled function).

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
    numba invalidates a kernel's cache when the kernel's source file changes; the decorators
    also tie it to the source of this module and of ``shared`` (flags, block sizes, the inlined
    helpers), which numba does not track.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile

import numba
from numba import njit

__all__ = ["FASTMATH", "CACHE", "CACHE_DIR", "kernel", "helper", "inline", "strict"]

FASTMATH = {"reassoc", "nsz"}


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


# The modules every kernel's machine code depends on besides its own source file.
_SHARED_SOURCES = ("jit.py", "shared.py")


def _common_stamp() -> str:
    digest = hashlib.sha256()
    for name in _SHARED_SOURCES:
        with open(os.path.join(os.path.dirname(__file__), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


_COMMON_STAMP = _common_stamp()


def _stamp_with_common(dispatcher) -> None:
    """Make the on-disk cache also depend on ``_SHARED_SOURCES`` (flags, block sizes, helpers).

    numba keys a kernel's cache on its own source file only, so a change there would otherwise
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


def inline(fn):
    """Decorator of the small shared pieces used inside inner loops: inlined into the caller's
    numba IR, so they compile (and vectorize) with the caller as if written out in place."""
    return njit(inline="always", fastmath=FASTMATH, nogil=True)(fn)


def strict(fn):
    """Decorator of the serial helpers that must not get any fast-math flag (never IR-inlined)."""
    with _cache_dir_override():
        disp = njit(cache=CACHE, nogil=True)(fn)
    _stamp_with_common(disp)
    return disp
