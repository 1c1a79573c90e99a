"""Make glibc's malloc return freed tensor memory to the system at once.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at
start) with its own ``mmap`` and unmaps it when freed. But it raises that
threshold to the size of every such block freed, up to 32 MiB on 64-bit
systems, so after the first large tensor is freed, tensors of that size come
from the heap. Freed heap memory stays resident until the top of the heap is
free, which let stage processes peak 10 to 20 MB above their live tensors.
Setting the threshold once turns that adjustment off (mallopt(3)).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["pin_mmap_threshold"]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 128 * 1024


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process; return whether it was set.

    On a C library other than glibc this does nothing and returns False.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.debug("no mallopt in the C library %r; the allocator keeps its own thresholds", name)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES))
