"""Transfer planning: which local bytes read which remote bytes. Pure functions.

Everything is in bytes: a seed's tensor matches ours when the names and byte
sizes agree, whatever the dtype strings say, so FP8 and mixed-dtype models
(whose scales and weights differ in dtype) pair up as long as the bytes do.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

from sglang_mx.errors import LayoutMismatchError, SizeMismatch
from sglang_mx.records import TensorDescriptor


@dataclasses.dataclass(frozen=True)
class Read:
    """Copy `length` bytes from the seed's `remote_addr` into our `local_addr`."""

    local_addr: int
    remote_addr: int
    length: int


@dataclasses.dataclass(frozen=True)
class TransferPlan:
    reads: tuple[Read, ...]
    tensor_count: int  # tensors matched, zero-size and aliases included
    total_bytes: int  # bytes that move (each distinct destination once)


def coalesce_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of (addr, length) ranges as sorted, disjoint, non-adjacent ranges.

    Zero-length ranges vanish; ranges that overlap (shared storage) or touch
    (address-contiguous tensors) merge into one.
    """
    merged: list[list[int]] = []
    for addr, length in sorted(r for r in ranges if r[1] > 0):
        if merged and addr <= merged[-1][0] + merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], addr + length - last[0])
        else:
            merged.append([addr, length])
    return [(a, n) for a, n in merged]


def build_plan(
    local: Sequence[TensorDescriptor],
    remote: Sequence[TensorDescriptor],
    *,
    seed: str,
) -> TransferPlan:
    """Match `local` to `remote` by name and size, or raise LayoutMismatchError.

    Every difference is reported at once: tensors we have that the seed lacks
    (missing), tensors only the seed has (unexpected), and byte-size
    mismatches. Nothing is read unless the layouts agree exactly.
    """
    remote_by_name: Mapping[str, TensorDescriptor] = {t.name: t for t in remote}
    local_names = {t.name for t in local}
    missing = [t.name for t in local if t.name not in remote_by_name]
    unexpected = [t.name for t in remote if t.name not in local_names]
    mismatched = [
        SizeMismatch(t.name, t.size, remote_by_name[t.name].size)
        for t in local
        if t.name in remote_by_name and remote_by_name[t.name].size != t.size
    ]
    invalid = [t.name for t in remote if t.size > 0 and t.addr == 0]
    if missing or unexpected or mismatched or invalid:
        raise LayoutMismatchError(
            seed=seed, missing=missing, unexpected=unexpected, mismatched=mismatched, invalid=invalid
        )

    # Tensors sharing storage (tied weights) are one destination: read it once.
    by_destination: dict[tuple[int, int], Read] = {}
    for t in local:
        if t.size == 0:
            continue
        by_destination.setdefault((t.addr, t.size), Read(t.addr, remote_by_name[t.name].addr, t.size))
    reads = merge_reads(by_destination.values())
    return TransferPlan(
        reads=tuple(reads),
        tensor_count=len(local),
        total_bytes=sum(r.length for r in by_destination.values()),
    )


def merge_reads(reads: Iterable[Read]) -> list[Read]:
    """Merge reads that are address-contiguous on both sides into larger ones."""
    merged: list[Read] = []
    for r in sorted(reads, key=lambda r: r.local_addr):
        if merged:
            last = merged[-1]
            if (
                r.local_addr == last.local_addr + last.length
                and r.remote_addr == last.remote_addr + last.length
            ):
                merged[-1] = Read(last.local_addr, last.remote_addr, last.length + r.length)
                continue
        merged.append(r)
    return merged
