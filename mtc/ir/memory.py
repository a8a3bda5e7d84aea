"""Give freed heap back to the operating system.

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
import sys


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
