"""Which CUDA allocation holds an address: the driver's own answer (libcuda through ctypes).

`allocation_of(addr)` asks `cuPointerGetAttribute` for the memory type, the
allocation's range (the same base and size `cuMemGetAddressRange` gives, which is
what Mooncake's transports register) and whether a legacy CUDA IPC handle can be
made for it (virtual-memory allocations cannot have one). It answers None for
memory CUDA does not know as device memory (host memory, or no driver at all), so
a machine without CUDA keeps host behaviour. Nothing is loaded at import.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

from sglang_mx.transfer.regions import Allocation

log = logging.getLogger(__name__)

# cuda.h: CUpointer_attribute and CUmemorytype values (stable across CUDA releases).
_ATTR_MEMORY_TYPE = 2
_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE = 10
_ATTR_RANGE_START_ADDR = 11
_ATTR_RANGE_SIZE = 12
_MEMORYTYPE_DEVICE = 2
_ERROR_NOT_INITIALIZED = 3
_ERROR_INVALID_CONTEXT = 201


@functools.cache
def _driver():
    """libcuda's cuPointerGetAttribute, or None where there is no CUDA driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuPointerGetAttribute
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    fn.restype = ctypes.c_int
    return fn


def _attr(fn, attr: int, addr: int, ctype) -> tuple[int, int]:
    value = ctype(0)
    rc = fn(ctypes.byref(value), attr, addr)
    return rc, value.value


def _make_context_current() -> bool:
    """Make torch's current device's primary context current on this thread, where torch has
    initialised CUDA (the driver API needs a current context; the runtime sets one lazily)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    torch.cuda.set_device(torch.cuda.current_device())
    return True


def allocation_of(addr: int) -> Allocation | None:
    """The CUDA device allocation holding `addr`, or None (host memory, or no CUDA here)."""
    fn = _driver()
    if fn is None:
        return None
    rc, kind = _attr(fn, _ATTR_MEMORY_TYPE, addr, ctypes.c_uint)
    if rc in (_ERROR_INVALID_CONTEXT, _ERROR_NOT_INITIALIZED) and _make_context_current():
        rc, kind = _attr(fn, _ATTR_MEMORY_TYPE, addr, ctypes.c_uint)
    if rc != 0 or kind != _MEMORYTYPE_DEVICE:
        return None
    rc_base, base = _attr(fn, _ATTR_RANGE_START_ADDR, addr, ctypes.c_uint64)
    rc_size, size = _attr(fn, _ATTR_RANGE_SIZE, addr, ctypes.c_size_t)
    if rc_base != 0 or rc_size != 0 or not base <= addr < base + size:
        raise RuntimeError(f"cuPointerGetAttribute could not give the allocation of device address 0x{addr:x} "
                           f"(return codes {rc_base}, {rc_size})")
    rc, ipc = _attr(fn, _ATTR_IS_LEGACY_CUDA_IPC_CAPABLE, addr, ctypes.c_int)
    return Allocation(base, size, virtual=rc == 0 and not ipc)
