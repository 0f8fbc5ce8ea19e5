"""Striping: cut one rank's bytes into parts read from different seeds at once. Pure functions.

The unit is a destination: one distinct (addr, size) of our memory, with every
tensor name that lives there (tied weights share one). Destinations are laid
end to end in address order and the byte line is cut into `parts` stripes of
nearly equal bytes (`cut`); a cut may fall inside a tensor, so one tensor can be read
from two seeds. Each stripe then becomes Mooncake reads against one seed's own
addresses (`reads_for`), since every seed keeps its tensors elsewhere.

What is good after a striped pull is decided per tensor by its digest: a
destination whose slices all completed is checked; one with any slice on a seed
that failed is read again from the others.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from sglang_mx.chunks import spans, unit_name
from sglang_mx.records import TensorDescriptor
from sglang_mx.transfer.plan import Read, merge_reads

# Below this a stripe is not worth a seed of its own (a lease, a Mooncake session).
MIN_STRIPE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Destination:
    """One distinct region of our memory and the names of the tensors stored there."""

    addr: int
    size: int
    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Slice:
    """Bytes [offset, offset + length) of one destination."""

    dest: Destination
    offset: int
    length: int


def destinations(local: Sequence[TensorDescriptor]) -> list[Destination]:
    """Our tensors with bytes, grouped by identical (addr, size), in address order."""
    names: dict[tuple[int, int], list[str]] = {}
    for t in local:
        if t.size > 0:
            names.setdefault((t.addr, t.size), []).append(t.name)
    return [Destination(addr, size, tuple(n)) for (addr, size), n in sorted(names.items())]


def chunked(dests: Sequence[Destination], chunk_bytes: Mapping[str, int]) -> list[Destination]:
    """The destinations with each chunked tensor (`chunk_bytes`: name -> its seed's chunk size) cut into
    its chunks (sglang_mx.chunks), each a destination of its own named by its unit names."""
    out: list[Destination] = []
    for d in dests:
        names = [n for n in d.names if chunk_bytes.get(n, 0) > 0]
        size = chunk_bytes[names[0]] if names else 0
        if not size:
            out.append(d)
            continue  # (a tensor published as one chunk is cut too: its unit is what the bitmaps name)
        out.extend(Destination(d.addr + offset, length, tuple(unit_name(n, offset, length) for n in names))
                   for offset, length in spans(d.size, size))
    return out


def stripe_count(total_bytes: int, seeds: int, *, min_stripe_bytes: int = MIN_STRIPE_BYTES) -> int:
    """How many stripes to cut: one per seed, but none smaller than `min_stripe_bytes` (at least 1)."""
    return max(1, min(seeds, total_bytes // max(min_stripe_bytes, 1)))


def cut(dests: Sequence[Destination], parts: int) -> list[list[Slice]]:
    """Cut the destinations' bytes, in order, into `parts` stripes whose sizes differ by at most one byte.

    Returns exactly `parts` lists (some empty when there are fewer bytes than parts).
    """
    if parts < 1:
        raise ValueError(f"parts={parts} must be >= 1")
    total = sum(d.size for d in dests)
    bounds = [total * i // parts for i in range(parts + 1)]  # stripe i covers [bounds[i], bounds[i+1])
    stripes: list[list[Slice]] = [[] for _ in range(parts)]
    start = 0  # where the current destination begins on the byte line
    part = 0
    for dest in dests:
        end = start + dest.size
        pos = start
        while pos < end:
            while bounds[part + 1] <= pos:
                part += 1
            end_of_slice = min(end, bounds[part + 1])
            stripes[part].append(Slice(dest, pos - start, end_of_slice - pos))
            pos = end_of_slice
        start = end
    return stripes


def assign(dests: Sequence[Destination], has: Sequence[Callable[[Destination], bool]]) -> list[list[Slice]]:
    """Whole destinations to sources that hold them (a pipelined pull: partial seeds hold some).

    `has[i](dest)`: source i can serve `dest` now. Each destination, in address order, goes whole
    to the source that holds it and has been given the fewest bytes so far; one that no source
    holds is left out (read in a later round). One list per source.
    """
    given = [0] * len(has)
    out: list[list[Slice]] = [[] for _ in has]
    for dest in dests:
        holders = [i for i, holds in enumerate(has) if holds(dest)]
        if holders:
            i = min(holders, key=lambda i: given[i])
            given[i] += dest.size
            out[i].append(Slice(dest, 0, dest.size))
    return out


def reads_for(slices: Sequence[Slice], remote_addr: Mapping[str, int], *, merge: bool = True) -> list[Read]:
    """The reads that fill `slices` from one seed whose tensor `name` starts at `remote_addr[name]`.

    Contiguous slices are merged into larger reads, unless `merge` is False (a pipelined pull
    verifies, and serves on, each destination as soon as its own read lands)."""
    reads = [Read(s.dest.addr + s.offset, remote_addr[s.dest.names[0]] + s.offset, s.length) for s in slices]
    return merge_reads(reads) if merge else sorted(reads, key=lambda r: r.local_addr)
