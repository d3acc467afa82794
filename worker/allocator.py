"""The worker process's memory allocator: keep freed memory for the next render.

glibc's malloc serves a large block with its own mmap() and unmaps it on free(), and trims the
top of its heap once enough is free; a render allocates and frees the same large tensors at
every step, so each step faults its pages in again and the kernel zeroes them (measured with
the tiny model at 128², 8 steps: about 2,300 minor page faults and 10-15 ms of system time per
job, none with the settings below). A warm worker renders the same shapes all day: it keeps
what it freed instead. Called once, before the models load; glibc only (musl has no mallopt).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# blocks below this come from the heap and are reused; above it, mmap() as before (a block
# this large is rare, and its page faults are small against its own work)
MMAP_THRESHOLD = 256 * 1024 * 1024
# free memory at the heap's top is given back to the system only beyond this
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Fixed mmap and trim thresholds (no dynamic adjustment); False where malloc is not
    glibc's."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
