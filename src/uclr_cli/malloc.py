"""Keep freed memory in the process instead of returning it to the OS (glibc only).

glibc serves large allocations (>= 128 KB by default, adjusted dynamically) with
fresh ``mmap`` pages and unmaps them on free, so a tensor allocated in every
training step page-faults on every first touch. At the Amazon shape that made a
row-wise PGE step ~1.5x slower on the CPU (``sqrt``/``div`` on a few MB of
fresh output were 3-4x slower than on reused memory). Raising the mmap and
trim thresholds keeps such memory in the heap for reuse. The CLI calls this
once at start; a library user may call it too. It changes the whole process,
so the library never calls it on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap ...
_TRIM_THRESHOLD = 1 << 30  # ... and up to 1 GiB of freed heap is kept for reuse
_TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds; True if applied. A no-op off Linux/glibc or when MALLOC_* is set."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    ok &= mallopt(_M_TOP_PAD, _TOP_PAD) == 1
    return bool(ok)
