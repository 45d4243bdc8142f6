"""`keep_freed_memory()`: the C heap keeps the large blocks a training step frees, for the next step to reuse.

glibc's malloc serves a block of 32 MiB and more (the tiny scale's logits, their log-softmax and gradients,
[4096, 2048] fp32 each) with a fresh mmap and returns it to the kernel on free, so every step touches its
largest tensors' pages for the first time again: a page fault per 4 KiB, about 14 ms per 32 MiB, which
cost a fifth to a quarter of a tiny CPU step (docs/benchmark.md#step-overhead). With mmap off and trimming raised,
those blocks come from the heap and stay there between steps; the arithmetic is unchanged (the same values
in other memory). The price: freed memory is kept by the process (up to `TRIM_BYTES` at the top of the
heap) instead of going back to the system at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_BYTES = 1 << 30  # free memory at the heap's top kept before it is returned to the system

# A setting of the user's own for glibc's malloc (its environment variables) wins over this one.
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks (no mmap, trim above `TRIM_BYTES`) for the rest of this
    process and the processes it forks; True when set. A no-op (False) off glibc or when the environment
    sets malloc options of its own."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
