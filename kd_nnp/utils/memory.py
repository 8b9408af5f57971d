"""Allocator settings for the derivative-cache builders.

Forward-mode Jacobian builds (:func:`kd_nnp.training.jacobian.compute_features`) allocate and
free tens of MB per layer and direction chunk. glibc returns such blocks to the kernel at once
(``mmap`` above its threshold, heap trimming below it), so every step page-faults and zeroes
fresh memory: measured 137k minor faults and 0.43 s of system time per 64-atom frame with
M = 4 force atoms + strain, 28 % of the build's CPU time. :func:`keep_freed_memory` raises the
thresholds (``mallopt``) so the process reuses what it freed (0.09 s of system time, 36k
faults). It only changes how a process holds on to freed memory, never a result.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit systems
_done = False


def keep_freed_memory(top_pad: int = 256 * 2**20) -> bool:
    """Make glibc keep freed blocks up to 32 MB in the heap and never trim it.

    Returns True when the settings were applied (glibc present), False otherwise (another C
    library: nothing changes). Idempotent."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, 2**31 - 1),
            (_M_TOP_PAD, int(top_pad)),
        )
    )
    _done = ok
    return ok
