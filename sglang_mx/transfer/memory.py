"""Getting destination memory ready for a pull: `populate` (madvise MADV_POPULATE_WRITE).

A tensor that was allocated but never written has no pages yet. If the pull is
the first touch, Mooncake's single io thread takes every 4 KiB page fault inside
its recv and the pull runs at a third of its speed; filling the tensor first
(`fill_`) faults the pages and then writes them all again. MADV_POPULATE_WRITE
(Linux 5.14+) has the kernel map zeroed, writable pages for a range in one call,
without a write from user space and without holding the GIL. Host memory only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none to call (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_unsupported = False  # set once the kernel refused MADV_POPULATE_WRITE


def populate(addr: int, length: int) -> bool:
    """Map writable pages for the whole pages inside [addr, addr + length) of host memory.

    Returns False (and does nothing more in this process) where the kernel or
    platform lacks MADV_POPULATE_WRITE; the pull then takes the faults itself,
    slower but correct. The partial pages at either end are left to the pull.
    Never use it on device memory.
    """
    global _unsupported
    madvise = _madvise()
    if _unsupported or madvise is None:
        return False
    start = -(-addr // _PAGE) * _PAGE
    end = (addr + length) // _PAGE * _PAGE
    if end <= start:
        return True
    if madvise(start, end - start, MADV_POPULATE_WRITE) != 0:
        errno = ctypes.get_errno()
        _unsupported = True
        log.warning("madvise(MADV_POPULATE_WRITE) failed (%s): destinations are not populated before pulls",
                    os.strerror(errno))
        return False
    return True
