"""Registered regions follow allocations; reads never straddle a region's edge. Pure functions.

Mooncake's RDMA and intra-node NVLink transports register (or export as a CUDA IPC
handle) only the CUDA allocation that holds a region's first byte, and a read must
lie inside one registered buffer on either side. Two tensors can touch in the
address space yet belong to two cudaMalloc allocations, so on CUDA a region is
cut at every allocation boundary and never merged across one (`split_at_allocations`),
and every piece that is submitted is cut at the edges of the regions registered on
our side and on the seed's (`pieces`). Host memory has no allocation map here and
keeps one region per run of touching ranges (tcp copies through host memory and
tolerates that).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

from sglang_mx.errors import MxError
from sglang_mx.transfer.plan import Read, coalesce_ranges


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One device allocation: [base, base + size). `virtual`: made through CUDA's virtual-memory
    API (cuMemCreate: expandable segments, memory savers), which has no legacy CUDA IPC handle."""

    base: int
    size: int
    virtual: bool = False

    @property
    def end(self) -> int:
        return self.base + self.size


# addr -> the allocation holding it, or None for memory no device allocator knows (host memory).
AllocationLookup = Callable[[int], "Allocation | None"]


def lookup_in(allocations: Iterable[Allocation | tuple[int, int]]) -> AllocationLookup:
    """An AllocationLookup over a known list of allocations (tests, allocator snapshots)."""
    spans = sorted((a if isinstance(a, Allocation) else Allocation(*a) for a in allocations), key=lambda a: a.base)
    starts = [a.base for a in spans]

    def lookup(addr: int) -> Allocation | None:
        i = bisect.bisect_right(starts, addr) - 1
        return spans[i] if i >= 0 and addr < spans[i].end else None
    return lookup


def split_at_allocations(ranges: Iterable[tuple[int, int]], allocations: AllocationLookup | None
                         ) -> list[tuple[tuple[int, int], Allocation | None]]:
    """The union of `ranges` (coalesced as `coalesce_ranges` does), cut at every allocation boundary:
    ((addr, length), the allocation holding it, or None for host memory) in address order.

    A region starting in host memory (the lookup answers None) stays whole. A region
    starting in device memory that runs past its allocation's end into memory no
    allocation holds is refused: no single registration could cover it.
    """
    out: list[tuple[tuple[int, int], Allocation | None]] = []
    for addr, length in coalesce_ranges(ranges):
        end = addr + length
        alloc = allocations(addr) if allocations is not None else None
        if alloc is None:
            out.append(((addr, length), None))
            continue
        while True:
            cut = min(end, alloc.end)
            out.append(((addr, cut - addr), alloc))
            if cut == end:
                break
            addr = cut
            alloc = allocations(addr)
            if alloc is None:
                raise MxError(f"memory 0x{addr:x}..0x{end:x} follows a device allocation but lies in none: "
                              "a tensor must lie inside one allocation")
    return out


def edges(regions: Iterable[tuple[int, int]]) -> list[int]:
    """Sorted start and end addresses of `regions`: the places a piece must not straddle."""
    return sorted({a for addr, length in regions for a in (addr, addr + length)})


def pieces(read: Read, local_edges: Sequence[int], remote_edges: Sequence[int], max_bytes: int
           ) -> Iterator[tuple[int, int, int]]:
    """(local, remote, length) pieces of `read`, each at most `max_bytes`, none straddling an
    edge of a registered region on our side (`local_edges`) or the seed's (`remote_edges`)."""
    cuts = set()
    for base, edge_list in ((read.local_addr, local_edges), (read.remote_addr, remote_edges)):
        lo = bisect.bisect_right(edge_list, base)
        hi = bisect.bisect_left(edge_list, base + read.length)
        cuts.update(e - base for e in edge_list[lo:hi])
    offset = 0
    for stop in sorted(cuts) + [read.length]:
        while offset < stop:
            n = min(max_bytes, stop - offset)
            yield read.local_addr + offset, read.remote_addr + offset, n
            offset += n
