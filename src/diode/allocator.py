"""Keep freed CPU memory in the process (glibc malloc tuning), so a training or synthesis loop
does not pay page faults for memory it gave back a moment ago.

glibc adapts two thresholds as a program runs: blocks larger than the *mmap threshold* are
mapped afresh for each allocation, and free memory at the top of the heap beyond the *trim
threshold* is returned to the kernel. A loop that allocates and frees the same activation-size
tensors every iteration can fall into returning memory at the end of an iteration and faulting
it back in (zero-filled by the kernel, page by page) in the next: measured on the synthesis
loop, 600-4,500 page faults and about 2-3 ms per iteration on the 2-core CPU, while the
teacher's bare forward + backward in the same process faulted none (results/perf.md, session 5).
`keep_freed_memory` fixes both thresholds high: blocks up to 32 MiB come from the heap and
freed memory stays mapped for reuse. The price is that the process keeps its peak heap, which
a CLI run does anyway. Linux with glibc only; elsewhere, or with ``DIODE_MALLOC_TUNING=0``, it
does nothing (jemalloc or tcmalloc via LD_PRELOAD are the other cure; see PyTorch's CPU tuning
guide).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set (now or
    by an earlier call). Disabled by the environment variable ``DIODE_MALLOC_TUNING=0``."""
    global _applied
    if _applied:
        return True
    if os.environ.get("DIODE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have no such thresholds  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both explicitly: setting either one turns off glibc's adaptation of both.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
