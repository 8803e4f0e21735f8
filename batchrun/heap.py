"""The C heap's handling of large blocks, for the command line's process.

glibc serves blocks of 128 KiB and more with ``mmap`` and gives them back to
the system when freed, but it raises that threshold each time such a block is
freed (up to 32 MiB). Large answers (hundreds of KB each, allocated and freed
by the thousand) then come from the heap, whose free space is fragmented and
never returned: a run holding 256 MiB of results grew about 80 MB more than
that. Pinning the threshold keeps large blocks mapped and returned at once.
Only the ``batchrun`` command does this: a library must not change its host
process's allocator. Nor its garbage collector: the command also lets the
cycle collector wait for more new objects (``space_out_collections``).
"""

from __future__ import annotations

import ctypes
import gc
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from now on
# New container objects between two runs of the youngest generation's cycle
# collection (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 128 KiB; False where there is no glibc."""
    if sys.platform == "win32":
        return False
    try:
        # The process's own symbols, C library included: no search for the
        # library's file (``ctypes.util.find_library`` runs ``ldconfig -p``).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))


def space_out_collections() -> None:
    """Run the cycle collector after GC_YOUNG_THRESHOLD new objects, not 700.

    A run makes and drops a few containers per row (parsed lines, records,
    tuples) and almost no cycles: with the default, a batch run of 1,000,000
    rows ran 4,206 collections, 0.87 s of its 31 s of CPU. Cycles are still
    collected, a little later.
    """
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)
