"""Chunk digests: a large tensor verified, and served on, a piece at a time (pipelined cascade).

A target serves a tensor to its children only once it verified it. Verified whole, a
chain of targets forwards whole tensors, and each hop lags its parent by one tensor's
time on the link: the last of H hops ends at (sum + (H - 1) x largest tensor), whatever
the order. A seed that publishes chunk digests (`TensorDescriptor.chunk_bytes` and
`chunks`: the digests of the tensor's bytes cut every `chunk_bytes`, the last one shorter)
lets each hop lag by one chunk instead.

- A seed cuts every tensor larger than its `chunk_bytes` (SeedOptions); a target that
  verified chunks republishes the very digests it checked them against.
- A chunked pull's unit is a chunk: its own destination, named `unit_name(tensor, offset,
  length)` ("<tensor>#<offset>+<length>", a name no parameter has), read, checked against its
  chunk digest, and served on as soon as it lands. The tensor's whole digest is checked too,
  once its last chunk is in, before the pull ends.
- A partial seed's bitmap has one bit per unit (`units`): a whole tensor, or each chunk of a
  chunked one, in record order, so parent and child derive the same bits from the record.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Sequence

import torch

from sglang_mx.digest import byte_view, digest_many
from sglang_mx.records import TensorDescriptor

__all__ = ["UnitTensors", "chunk_digests_of", "chunk_units", "chunks_of", "parse_unit", "spans", "unit_name",
           "unit_views", "units"]

_UNIT = re.compile(r"(.+)#(\d+)\+(\d+)")


def spans(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of a `size`-byte tensor cut every `chunk_bytes`."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be > 0")
    return [(offset, min(chunk_bytes, size - offset)) for offset in range(0, size, chunk_bytes)]


def unit_name(name: str, offset: int, length: int) -> str:
    return f"{name}#{offset}+{length}"


def parse_unit(key: str) -> tuple[str, int, int] | None:
    """(tensor, offset, length) of a chunk's unit name; None for a plain tensor name."""
    match = _UNIT.fullmatch(key)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def chunk_units(name: str, size: int, chunk_bytes: int, digests: Sequence[str]) -> Iterator[tuple[str, int, int, str]]:
    """(unit name, offset, length, digest) of each chunk of tensor `name`, cut every `chunk_bytes`."""
    for (offset, length), digest in zip(spans(size, chunk_bytes), digests):
        yield unit_name(name, offset, length), offset, length, digest


def chunks_of(digests: Mapping[str, str]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Name -> (chunk_bytes, digests in offset order) of the chunks whose unit names are among `digests`
    (plain names are left out); the first chunk's length is the chunk size."""
    by_name: dict[str, list[tuple[int, int, str]]] = {}
    for key, digest in digests.items():
        unit = parse_unit(key)
        if unit is not None:
            by_name.setdefault(unit[0], []).append((unit[1], unit[2], digest))
    return {name: (min(got)[1], tuple(d for _, _, d in sorted(got))) for name, got in by_name.items()}


def units(tensors: Sequence[TensorDescriptor]) -> Iterator[tuple[str, int, str]]:
    """(unit name, bytes, digest) of each unit of a record, in order: a tensor, or each of its chunks."""
    for t in tensors:
        if t.chunks:
            for unit, _, length, digest in chunk_units(t.name, t.size, t.chunk_bytes, t.chunks):
                yield unit, length, digest
        else:
            yield t.name, t.size, t.digest


def chunk_digests_of(tensors: Mapping[str, torch.Tensor], chunk_bytes: int, algorithm: str = "",
                     known: Mapping[str, str] | None = None) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Name -> (chunk_bytes, digests) for every tensor larger than `chunk_bytes`, hashed together;
    a tensor whose every chunk is in `known` (unit name -> digest, as a chunked pull checked them)
    keeps those, at the chunk size they were cut at."""
    out: dict[str, tuple[int, tuple[str, ...]]] = {}
    known = known or {}
    had = chunks_of(known)
    views: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        cut = had.get(name, (0, ()))[0]
        names = [unit_name(name, offset, length) for offset, length in spans(size, cut)] if cut else []
        if cut and size > cut and len(names) == len(had[name][1]) and all(n in known for n in names):
            out[name] = (cut, tuple(known[n] for n in names))
        elif chunk_bytes > 0 and size > chunk_bytes:
            views.update(unit_views(name, t, chunk_bytes))
    digests = digest_many(views, algorithm) if views else {}
    by_name: dict[str, list[str]] = {}
    for key, digest in digests.items():  # in order: views were added chunk by chunk
        by_name.setdefault(parse_unit(key)[0], []).append(digest)
    out.update((name, (chunk_bytes, tuple(d))) for name, d in by_name.items())
    return out


def unit_views(name: str, t: torch.Tensor, chunk_bytes: int) -> dict[str, torch.Tensor]:
    """Unit name -> a uint8 view of that chunk of `t` (contiguous), for every chunk."""
    flat = byte_view(name, t)
    return {unit_name(name, offset, length): flat[offset:offset + length]
            for offset, length in spans(flat.numel(), chunk_bytes)}


class UnitTensors(Mapping[str, torch.Tensor]):
    """A name -> tensor mapping that also resolves unit names to views of those bytes (for a verifier)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._tensors.get(key)
        if t is not None:
            return t
        unit = parse_unit(key)
        if unit is None or unit[0] not in self._tensors:
            raise KeyError(key)
        name, offset, length = unit
        return byte_view(name, self._tensors[name])[offset:offset + length]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
