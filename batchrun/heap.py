"""The C heap's handling of large blocks, for the command line's process.

glibc serves blocks of 128 KiB and more with ``mmap`` and gives them back to
the system when freed, but it raises that threshold each time such a block is
freed (up to 32 MiB). Large answers (hundreds of KB each, allocated and freed
by the thousand) then come from the heap, whose free space is fragmented and
never returned: a run holding 256 MiB of results grew about 80 MB more than
that. Pinning the threshold keeps large blocks mapped and returned at once.
Only the ``batchrun`` command does this: a library must not change its host
process's allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from now on


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 128 KiB; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
