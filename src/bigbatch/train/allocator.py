"""Keep freed memory in the process (glibc), so that big-batch steps stop page-faulting their tensors.

glibc hands freed blocks above its mmap threshold (adaptive, at most 32 MB) back to the kernel. A step
whose activations are such blocks (ResNet-20 at batch 2048: 134 MB per conv output, and BatchNorm
models are not micro-batched) maps them afresh every step, and the kernel zero-fills each page on
first touch: a ResNet-20 epoch at batch 2048 ran 2.7x faster with freed memory kept, once steady
(BENCHMARKS.md). The price is resident memory: freed blocks stay mapped and torch's aligned
allocations fragment the heap (that run peaked at 6.4 GB instead of 3.5), hence an opt-in switch,
``run.retain_memory``.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and go back to it; the heap's free top stays mapped too.
RETAINED_BYTES = 1 << 30


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library: nothing to set
        return False
    # Both are needed: measured, either alone left most of the page faults in place.
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAINED_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, RETAINED_BYTES))
