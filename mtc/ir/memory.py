"""Memory for weights: populated pages for new large arrays, and freed heap given back to the OS.

Building a model allocates and frees hundreds of megabytes in blocks that glibc's allocator keeps
in its arenas (its mmap threshold rises after large frees, so later large blocks come from the
heap): importing deeplab_resnet34 left ~170 MB of freed memory resident, and the search module
built from it held 1.7x the bytes of its tensors. ``malloc_trim`` returns those pages; elsewhere
(macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import numpy as np


@functools.cache
def _trim() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_freed_memory() -> None:
    """Return the allocator's free pages to the OS (after a build step that freed large blocks)."""
    fn = _trim()
    if fn is not None:
        fn(0)  # type: ignore[operator]


#: Arrays at least this large are mapped and populated in one call (smaller ones: np.empty).
POPULATE_MIN_BYTES = 1 << 20


def _populated_buffer(nbytes: int) -> mmap.mmap | None:
    """``nbytes`` of zeroed anonymous memory whose pages are already mapped, or None."""
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if not flags or not sys.platform.startswith("linux"):
        return None
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    except (OSError, ValueError):
        return None
    return m


def empty(shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """An uninitialised writeable C-contiguous array for new weights.

    A large new array would otherwise take one page fault per 4 KB page when first written; on a
    virtual machine each fault exits to the hypervisor, which made those faults most of the cost
    of copying a weight (copying 80 MB into fresh memory: 0.14 s; into a populated mapping: 0.05 s).
    The mapping is returned to the OS as soon as the last array (or tensor) on it is freed.
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes >= POPULATE_MIN_BYTES:
        buf = _populated_buffer(nbytes)
        if buf is not None:
            return np.frombuffer(buf, dtype=dt).reshape(shape)
    return np.empty(shape, dtype=dt)


def copy(arr: np.ndarray) -> np.ndarray:
    """A writeable C-contiguous copy of ``arr`` in memory from :func:`empty`."""
    out = empty(tuple(arr.shape), arr.dtype)
    np.copyto(out, arr, casting="no")
    return out
