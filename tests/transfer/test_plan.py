"""Planning is pure: matching, size checks, merging, registration ranges."""

import pytest

from sglang_mx.errors import LayoutMismatchError
from sglang_mx.transfer.plan import Read, build_plan, coalesce_ranges, merge_reads
from sglang_mx.records import TensorDescriptor as T


def test_coalesce_merges_contiguous_and_overlapping_and_skips_empty():
    ranges = [(100, 10), (110, 5), (200, 10), (205, 10), (300, 0), (50, 10), (100, 10)]
    assert coalesce_ranges(ranges) == [(50, 10), (100, 15), (200, 15)]


def test_coalesce_keeps_gaps():
    assert coalesce_ranges([(0x1000, 16), (0x1011, 16)]) == [(0x1000, 16), (0x1011, 16)]


def test_merge_reads_only_when_both_sides_are_contiguous():
    reads = [Read(100, 1000, 10), Read(110, 1010, 10), Read(120, 2000, 10), Read(130, 2010, 5)]
    assert merge_reads(reads) == [Read(100, 1000, 20), Read(120, 2000, 15)]


def test_merge_reads_sorts_by_local_address():
    assert merge_reads([Read(110, 1010, 10), Read(100, 1000, 10)]) == [Read(100, 1000, 20)]


def test_plan_matches_by_name_and_bytes_not_dtype():
    local = [T("w", 100, 64, "float8_e4m3fn"), T("scale", 164, 4, "float32")]
    remote = [T("scale", 9164, 4, "float32"), T("w", 9100, 64, "uint8")]
    plan = build_plan(local, remote, seed="s")
    assert plan.reads == (Read(100, 9100, 68),)
    assert plan.total_bytes == 68
    assert plan.tensor_count == 2


def test_plan_skips_zero_size_and_reads_tied_storage_once():
    local = [T("embed", 100, 32), T("lm_head", 100, 32), T("empty", 0, 0)]
    remote = [T("embed", 500, 32), T("lm_head", 500, 32), T("empty", 0, 0)]
    plan = build_plan(local, remote, seed="s")
    assert plan.reads == (Read(100, 500, 32),)
    assert plan.total_bytes == 32
    assert plan.tensor_count == 3


def test_plan_reports_every_difference_at_once():
    local = [T("a", 100, 8), T("b", 200, 16), T("c", 300, 4)]
    remote = [T("a", 1100, 8), T("b", 1200, 32), T("d", 1400, 4)]
    with pytest.raises(LayoutMismatchError) as info:
        build_plan(local, remote, seed="worker-x@127.0.0.1:1")
    e = info.value
    assert e.missing == ("c",)
    assert e.unexpected == ("d",)
    assert [(m.name, m.local_bytes, m.remote_bytes) for m in e.mismatched] == [("b", 16, 32)]
    text = str(e)
    assert "worker-x@127.0.0.1:1" in text
    assert "missing on the seed: c" in text
    assert "only on the seed: d" in text
    assert "b (local 16 B, seed 32 B)" in text


def test_plan_rejects_seed_descriptor_with_bytes_at_address_zero():
    with pytest.raises(LayoutMismatchError, match="invalid descriptor"):
        build_plan([T("a", 100, 8)], [T("a", 0, 8)], seed="s")


def test_long_lists_are_truncated_in_the_message():
    local = [T(f"t{i}", 100 + i * 8, 8) for i in range(30)]
    with pytest.raises(LayoutMismatchError) as info:
        build_plan(local, [], seed="s")
    assert len(info.value.missing) == 30
    assert "and 20 more" in str(info.value)
