"""The C heap of a training process: keep freed memory for the next step.

Each training step allocates activations of tens to hundreds of MB. glibc serves
blocks above its mmap threshold with fresh ``mmap`` pages and unmaps them on free, so
every step pays for zeroing new pages: a one-epoch ``ildseg train`` run on a 2-core
CPU made 20 million minor page faults, system time 36 % of all CPU time. With mmap
off and trimming deferred, freed blocks are reused: that run took 62.5 s instead of
86 s (1.38x), at a higher peak memory (3.3 -> 5.9 GB for batches of 4).

This is a setting of a whole process, so only the training commands call it, first
thing: never the library at import, which also runs inside 3D Slicer.
"""
from __future__ import annotations

import ctypes
import sys

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory for reuse (glibc);
    True when it took effect, False elsewhere (another libc, another OS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:  # pragma: no cover
        return False
    if mallopt is None:  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
