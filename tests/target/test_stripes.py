"""Striping plans: stripes balanced by bytes, cut inside tensors when needed (pure)."""

import pytest

from sglang_mx.records import TensorDescriptor
from sglang_mx.target.stripes import Destination, cut, destinations, reads_for, stripe_count
from sglang_mx.transfer.plan import Read

LOCAL = [
    TensorDescriptor("a", 0x1000, 100),
    TensorDescriptor("b", 0x1064, 50),  # right after a
    TensorDescriptor("tied", 0x1000, 100),  # shares a's storage
    TensorDescriptor("empty", 0x5000, 0),
    TensorDescriptor("c", 0x9000, 250),
]


def test_destinations_group_shared_storage_and_skip_empty_tensors():
    assert destinations(LOCAL) == [
        Destination(0x1000, 100, ("a", "tied")), Destination(0x1064, 50, ("b",)), Destination(0x9000, 250, ("c",)),
    ]


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_stripes_cover_every_byte_once_and_differ_by_at_most_one_byte(parts):
    dests = destinations(LOCAL)
    stripes = cut(dests, parts)
    assert len(stripes) == parts
    sizes = [sum(p.length for p in s) for s in stripes]
    assert sum(sizes) == 400 and max(sizes) - min(sizes) <= 1
    covered = sorted((p.dest.addr + p.offset, p.length) for s in stripes for p in s)
    pos = {d.addr: 0 for d in dests}
    for addr, length in covered:  # contiguous, no overlap, within each destination
        base = max(a for a in pos if a <= addr)
        assert addr - base == pos[base]
        pos[base] += length
    assert pos == {d.addr: d.size for d in dests}


def test_a_cut_inside_a_tensor_puts_it_in_two_stripes():
    first, second = cut(destinations(LOCAL), 2)
    assert {n for s in first for n in s.dest.names} == {"a", "tied", "b", "c"}
    assert {n for s in second for n in s.dest.names} == {"c"}
    assert [(p.dest.names[0], p.offset, p.length) for p in second] == [("c", 50, 200)]


def test_reads_for_one_seed_use_its_own_addresses_and_merge_contiguous_slices():
    first, _ = cut(destinations(LOCAL), 2)
    remote = {"a": 0x70000, "tied": 0x70000, "b": 0x70064, "c": 0x80000}
    assert reads_for(first, remote) == [Read(0x1000, 0x70000, 150), Read(0x9000, 0x80000, 50)]


def test_stripe_count_leaves_no_stripe_under_the_minimum():
    assert stripe_count(10 << 20, 3) == 3
    assert stripe_count(2 << 20, 3) == 2
    assert stripe_count(100, 3) == 1
    assert stripe_count(0, 3) == 1


def test_cut_rejects_zero_parts():
    with pytest.raises(ValueError, match="parts=0"):
        cut([], 0)
