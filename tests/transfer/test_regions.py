"""Registration follows allocations (sglang_mx.transfer.regions), against a fake allocation map."""

from __future__ import annotations

import pytest

from sglang_mx.errors import MxError
from sglang_mx.transfer.plan import Read
from sglang_mx.transfer.regions import Allocation, edges, lookup_in, pieces, split_at_allocations

MiB = 1 << 20
# A fake allocation map: two cudaMalloc segments back to back, a third after a gap.
FAKE_ALLOCATIONS = [(0x10000000, 2 * MiB), (0x10200000, 2 * MiB), (0x20000000, 1 * MiB)]


def regions(ranges, allocations=FAKE_ALLOCATIONS):
    return [r for r, _ in split_at_allocations(ranges, lookup_in(allocations))]


def test_tensors_sharing_a_segment_become_one_region():
    a = 0x10000000
    assert regions([(a, 4096), (a + 4096, 8192), (a + 4096, 100)]) == [(a, 12288)]


def test_touching_tensors_in_adjacent_segments_are_never_merged():
    a, b = 0x10000000, 0x10200000
    # The last tensor of the first segment ends exactly where the second segment begins.
    got = regions([(b - 4096, 4096), (b, 4096)])
    assert got == [(b - 4096, 4096), (b, 4096)]
    # One range spanning both (as coalescing touching ranges used to make) is cut at the boundary.
    assert regions([(a, 4 * MiB)]) == [(a, 2 * MiB), (b, 2 * MiB)]


def test_each_region_reports_its_allocation():
    split = split_at_allocations([(0x10200000 - 10, 20), (0x20000000, 5)], lookup_in(FAKE_ALLOCATIONS))
    assert [a.base for _, a in split] == [0x10000000, 0x10200000, 0x20000000]


def test_host_memory_keeps_one_region_per_run_of_touching_ranges():
    assert regions([(5000, 100), (5100, 50), (9000, 10)], allocations=[]) == [(5000, 150), (9000, 10)]
    assert [r for r, a in split_at_allocations([(5000, 10)], None)] == [(5000, 10)]


def test_a_range_running_out_of_its_allocation_into_no_allocation_is_refused():
    with pytest.raises(MxError, match="lies in none"):
        regions([(0x20000000 + MiB - 16, 32)])


def test_virtual_memory_allocations_are_marked():
    lookup = lookup_in([Allocation(0x1000, 0x1000, virtual=True)])
    assert lookup(0x1800).virtual and lookup(0x2000) is None


def test_pieces_never_straddle_a_local_or_remote_edge_and_stay_within_the_chunk_size():
    read = Read(local_addr=1000, remote_addr=50_000, length=1000)
    local = edges([(900, 300), (1200, 2000)])  # a local edge at 1200 (offset 200)
    remote = edges([(49_000, 1_700), (50_700, 800)])  # a remote edge at 50_700 (offset 700)
    got = list(pieces(read, local, remote, 256))
    assert [(l_ - 1000, n) for l_, _, n in got] == [(0, 200), (200, 256), (456, 244), (700, 256), (956, 44)]
    assert all(r - 50_000 == l_ - 1000 for l_, r, _ in got)
    assert list(pieces(read, [], [], 1 << 30)) == [(1000, 50_000, 1000)]
