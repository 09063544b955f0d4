"""Keep freed memory in the process instead of handing it back to the OS after every tensor.

glibc's malloc serves blocks above its mmap threshold (128 KB, raised on the fly up to 32 MB) with
fresh mappings and unmaps them on free, and trims the heap top above 128 KB. A LeNet-5 step on the
CPU allocates and frees activation and gradient tensors of a few MB every layer, so each one comes
back as new pages that fault in on first touch: a third of a step's system time, and 10-25% of a
1-thread LeNet-5 training step here (benchmarks/bench_trainer.py measures it). Fixing the mmap
threshold at 32 MB and the trim threshold at 128 MB lets those blocks be reused; peak memory is
unchanged (measured), at most 128 MB of freed heap stays resident. A no-op without glibc, or with
the environment variable BIGBATCH_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20

_done = False


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; returns whether glibc accepted them."""
    global _done
    if _done:
        return True
    if os.environ.get("BIGBATCH_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl, Windows): their allocators behave differently anyway
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
