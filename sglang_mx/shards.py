"""Mixed parallel layouts: how a rank's tensors are cut out of the model, and reshard plans. Pure functions.

A seed publishes, per tensor, a `ShardSpec` read from SGLang's own parallel
layers (sglang_mx.sglang.shard_facts): the split dimension, the sizes of the
fused parts of the whole tensor (QKV is q, k, v; gate_up is gate, up), and the
spans of the whole tensor this rank holds. Replicated tensors say so (dim -1).
A target of another layout computes the same facts for its own ranks and
`plan_reshard` turns both into reads, or refuses with the tensor and the reason.

How bytes move:

- dim 0 (column splits, vocab splits, fused QKV/gate_up): a span is whole rows,
  contiguous on both sides: one read straight into place per (seed rank, span).
- dim >= 1 (row splits: o_proj, down_proj): a span is one short run per row on
  at least one side. Mooncake's tcp transport opens a connection per request,
  so a read per row would cost more than the bytes: the seed rank's whole tensor
  is read (contiguous) into a staging buffer and the columns are copied into
  place locally. A target of a larger TP reads more of these tensors than it
  keeps (TP 1 -> 2: twice the row-split bytes).
- replicated tensors: whole, from the seed rank nearest to ours.

How what was read is verified (digests of the seed's bytes, sglang_mx.digest):

- a staged tensor is the seed rank's whole tensor: its published whole-tensor digest;
- a replicated tensor: likewise, read whole;
- a dim-0 span reads part of a seed tensor, so seeds also publish `pieces`: the
  digests of their dim-0 spans cut at multiples of part/PIECE_WAYS within each
  fused part (`piece_cuts`). Where a target reads rows [a, b) of part p, a and b
  are multiples of size(p)/TP for its TP and the seed's, so for TP sizes dividing
  PIECE_WAYS they fall on those cuts: the rows read are exactly a run of
  published pieces, and each piece is checked against its digest. Every byte
  the target keeps is covered by exactly one check against the bytes the seed
  hashed; a range that is not a run of pieces is refused, never half-verified.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from sglang_mx.errors import MxError
from sglang_mx.records import ShardSpec, Span, TensorDescriptor
from sglang_mx.transfer.plan import Read, merge_reads

# Dim-0 spans are digested in pieces of part/PIECE_WAYS rows: TP sizes dividing it verify piecewise.
PIECE_WAYS = 8


class ReshardRefused(MxError):
    """The planner cannot prove a mixed-layout pull correct: no byte is read."""

    def __init__(self, message: str, *, tensor: str = "", seed: str = "") -> None:
        self.tensor = tensor
        self.seed = seed
        where = f"tensor {tensor!r}: " if tensor else ""
        super().__init__(f"cannot reshard from {seed or 'the seed'}: {where}{message}")


def replicated(shape: Sequence[int]) -> ShardSpec:
    return ShardSpec(dim=-1, shape=tuple(shape))


def split(shape: Sequence[int], dim: int, parts: Sequence[int], spans: Sequence[Span]) -> ShardSpec:
    """A split spec, checked: spans inside their parts, laid end to end locally, filling `shape[dim]`."""
    spec = ShardSpec(dim=dim, shape=tuple(shape), parts=tuple(parts), spans=tuple(spans))
    problem = check_spec(spec)
    if problem:
        raise ValueError(problem)
    return spec


def check_spec(spec: ShardSpec) -> str:
    """"" when `spec` is self-consistent, else what is wrong with it."""
    if spec.replicated:
        return ""
    if not 0 <= spec.dim < len(spec.shape):
        return f"split dim {spec.dim} is outside shape {spec.shape}"
    if not spec.parts or any(p <= 0 for p in spec.parts):
        return f"parts {spec.parts} must be positive"
    local = 0
    for s in spec.spans:
        if s.length <= 0 or s.local_start != local:
            return f"spans {spec.spans} must be laid end to end from local row 0"
        if _part_of(spec, s) is None:
            return f"span {s} crosses a part boundary of parts {spec.parts}"
        local += s.length
    if local != spec.shape[spec.dim]:
        return f"spans cover {local} rows but the tensor has {spec.shape[spec.dim]} along dim {spec.dim}"
    return ""


def _part_of(spec: ShardSpec, s: Span) -> int | None:
    start = 0
    for i, size in enumerate(spec.parts):
        if start <= s.global_start and s.global_start + s.length <= start + size:
            return i
        start += size
    return None


def piece_cuts(parts: Sequence[int], ways: int = PIECE_WAYS) -> list[int]:
    """Global row positions where pieces are cut: multiples of size/k inside each part, with k the
    largest divisor of `ways` that divides the part's size."""
    cuts, start = [], 0
    for size in parts:
        k = max(d for d in range(1, ways + 1) if ways % d == 0 and size % d == 0)
        cuts += [start + size * i // k for i in range(k)]
        start += size
    cuts.append(start)
    return cuts


def pieces_of(spec: ShardSpec) -> list[tuple[int, int, int]]:
    """(local_start, global_start, length) of the pieces a seed digests: its dim-0 spans cut at `piece_cuts`."""
    if spec.replicated or spec.dim != 0:
        return []
    cuts = piece_cuts(spec.parts)
    out = []
    for s in spec.spans:
        inner = [c for c in cuts if s.global_start < c < s.global_start + s.length]
        bounds = [s.global_start, *inner, s.global_start + s.length]
        for a, b in zip(bounds, bounds[1:]):
            out.append((s.local_start + a - s.global_start, a, b - a))
    return out


# --- the plan ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PieceCheck:
    """Once read from seed rank `rank`: bytes [offset, +length) of local tensor `name` must have `digest`."""

    rank: int
    name: str
    offset: int
    length: int
    digest: str


@dataclasses.dataclass(frozen=True)
class Copy:
    """Rows [src_start, +length) along dim of the staged seed tensor go to local rows [dst_start, +length)."""

    src_start: int
    dst_start: int
    length: int


@dataclasses.dataclass(frozen=True)
class Staged:
    """A seed rank's whole tensor read into staging, checked against `digest`, then copied in place."""

    rank: int
    name: str
    remote_addr: int
    size: int
    digest: str
    # Views as (outer, rows along dim, inner bytes): the seed's and ours.
    src_view: tuple[int, int, int]
    dst_view: tuple[int, int, int]
    copies: tuple[Copy, ...]


@dataclasses.dataclass(frozen=True)
class ReshardPlan:
    direct: Mapping[int, tuple[Read, ...]]  # seed rank -> reads straight into our tensors
    staged: tuple[Staged, ...]
    checks: tuple[PieceCheck, ...]  # for the direct reads ("" digests only when verify is off)
    unverified: tuple[str, ...]  # tensors read without a digest to check (verify if_present)
    total_bytes: int  # bytes that land in our tensors
    read_bytes: int  # bytes read from seeds (staged tensors whole)

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.direct) | {s.rank for s in self.staged})


def plan_reshard(
    local: Sequence[TensorDescriptor],
    seeds: Mapping[int, Sequence[TensorDescriptor]],
    *,
    near: int,
    verify: str,
    seed: str = "",
) -> ReshardPlan:
    """Plan reading our tensors (`local`, each with its ShardSpec) from a seed instance's ranks.

    `seeds`: seed rank -> its published descriptors. `near`: the seed rank to prefer
    (replicated tensors and ties). `verify` is MxConfig.verify: with "require" a read
    that no published digest covers is refused; with "if_present" it is listed in
    `unverified`; with "off" nothing is checked. Raises ReshardRefused naming the
    tensor and the reason for anything it cannot prove.
    """
    if not seeds:
        raise ReshardRefused("no seed ranks", seed=seed)
    by_rank = {r: {t.name: t for t in tensors} for r, tensors in seeds.items()}
    local_names = {t.name for t in local}
    for r, named in sorted(by_rank.items()):
        extra = sorted(set(named) - local_names)
        if extra:
            raise ReshardRefused(f"seed rank {r} publishes it and we have no such tensor "
                                 f"({len(extra)} such tensor(s))", tensor=extra[0], seed=seed)
    order = sorted(by_rank, key=lambda r: (abs(r - near), r))
    direct: dict[int, list[Read]] = {}
    staged: list[Staged] = []
    checks: list[PieceCheck] = []
    unverified: list[str] = []
    total = read = 0
    for t in local:
        spec = t.shard
        if spec is None:
            raise ReshardRefused("our layer publishes no split facts for it", tensor=t.name, seed=seed)
        remote = {}
        for r in order:
            d = by_rank[r].get(t.name)
            if d is None:
                raise ReshardRefused(f"seed rank {r} does not publish it", tensor=t.name, seed=seed)
            if d.shard is None:
                raise ReshardRefused(f"seed rank {r} publishes no split facts for it", tensor=t.name, seed=seed)
            problem = check_spec(d.shard) or _compatible(t, spec, d, d.shard)
            if problem:
                raise ReshardRefused(f"seed rank {r}: {problem}", tensor=t.name, seed=seed)
            remote[r] = d
        if t.size == 0:
            continue
        total += t.size
        if spec.replicated:
            r = order[0]
            d = remote[r]
            direct.setdefault(r, []).append(Read(t.addr, d.addr, t.size))
            read += t.size
            _check_or_note(checks, unverified, r, t.name, t.size, d.digest, verify, seed)
            continue
        segments = _cover(t.name, spec, {r: remote[r].shard for r in order}, seed)
        outer, rows, inner = _view(spec, t.size)
        if spec.dim == 0:
            for r, src_start, dst_start, length, g in segments:
                d = remote[r]
                direct.setdefault(r, []).append(Read(t.addr + dst_start * inner, d.addr + src_start * inner,
                                                     length * inner))
                read += length * inner
                for piece_start, piece_len, digest in _pieces_covering(t.name, d, g, length, verify, seed, r):
                    if digest:
                        checks.append(PieceCheck(r, t.name, (dst_start + piece_start - g) * inner,
                                                 piece_len * inner, digest))
                    elif verify != "off":
                        unverified.append(t.name)
        else:
            by_seed: dict[int, list[Copy]] = {}
            for r, src_start, dst_start, length, _ in segments:
                by_seed.setdefault(r, []).append(Copy(src_start, dst_start, length))
            for r, copies in by_seed.items():
                d = remote[r]
                if not d.digest and verify == "require":
                    raise ReshardRefused(f"seed rank {r} publishes no digest for it and verify is 'require'",
                                         tensor=t.name, seed=seed)
                if not d.digest and verify != "off":
                    unverified.append(t.name)
                staged.append(Staged(r, t.name, d.addr, d.size, d.digest if verify != "off" else "",
                                     _view(d.shard, d.size), (outer, rows, inner), tuple(copies)))
                read += d.size
    return ReshardPlan(direct={r: tuple(merge_reads(reads)) for r, reads in direct.items()}, staged=tuple(staged),
                       checks=tuple(checks) if verify != "off" else (), unverified=tuple(dict.fromkeys(unverified)),
                       total_bytes=total, read_bytes=read)


def _compatible(t: TensorDescriptor, ours: ShardSpec, d: TensorDescriptor, theirs: ShardSpec) -> str:
    """"" when the seed's tensor is the same whole tensor as ours, cut along the same dim."""
    if ours.replicated != theirs.replicated:
        kind = {True: "replicated", False: "split"}
        return f"it is {kind[theirs.replicated]} on the seed and {kind[ours.replicated]} here"
    if ours.replicated:
        if theirs.shape != ours.shape or d.size != t.size:
            return f"replicated tensor of shape {theirs.shape} ({d.size} bytes) vs ours {ours.shape} ({t.size} bytes)"
        return ""
    if theirs.dim != ours.dim:
        return f"split along dim {theirs.dim} on the seed, dim {ours.dim} here"
    if theirs.parts != ours.parts:
        return f"the whole tensor's parts are {theirs.parts} on the seed, {ours.parts} here"
    if len(theirs.shape) != len(ours.shape) or any(
            a != b for i, (a, b) in enumerate(zip(theirs.shape, ours.shape)) if i != ours.dim):
        return f"shape {theirs.shape} on the seed vs {ours.shape} here differ outside the split dim {ours.dim}"
    ours_n, theirs_n = math.prod(ours.shape), math.prod(theirs.shape)
    if not ours_n or not theirs_n or t.size % ours_n or d.size % theirs_n or t.size // ours_n != d.size // theirs_n:
        return f"element size differs ({d.size} bytes for shape {theirs.shape} vs {t.size} for {ours.shape})"
    return ""


def _view(spec: ShardSpec, size: int) -> tuple[int, int, int]:
    """(outer, rows along dim, inner bytes) of a split tensor of `size` bytes."""
    outer = math.prod(spec.shape[: spec.dim])
    rows = spec.shape[spec.dim]
    per_row = size // max(outer * rows, 1)
    return outer, rows, per_row


def _cover(name: str, ours: ShardSpec, seeds: Mapping[int, ShardSpec], seed: str,
           ) -> list[tuple[int, int, int, int, int]]:
    """(seed rank, seed local start, our local start, rows, global start) covering every row we hold.

    At each position the seed span reaching furthest wins; ties go to the earlier rank in
    `seeds` (nearest first)."""
    out = []
    for span in ours.spans:
        pos, end = span.global_start, span.global_start + span.length
        while pos < end:
            best = None
            for r, spec in seeds.items():
                for s in spec.spans:
                    if s.global_start <= pos < s.global_start + s.length:
                        reach = s.global_start + s.length
                        if best is None or reach > best[0]:
                            best = (reach, r, s)
            if best is None:
                raise ReshardRefused(f"no seed rank holds its whole rows [{pos}, {end}) along dim {ours.dim}",
                                     tensor=name, seed=seed)
            reach, r, s = best
            length = min(reach, end) - pos
            out.append((r, s.local_start + pos - s.global_start, span.local_start + pos - span.global_start,
                        length, pos))
            pos += length
    return out


def _pieces_covering(name: str, d: TensorDescriptor, start: int, length: int, verify: str, seed: str,
                     rank: int) -> list[tuple[int, int, str]]:
    """(global start, rows, digest) of the seed's published pieces that make up rows [start, +length).

    "" digests when none covers them and verify allows it."""
    if verify == "off":
        return []
    published = {p.global_start: p for p in d.pieces}
    out, pos = [], start
    while pos < start + length:
        p = published.get(pos)
        if p is None or p.length <= 0 or pos + p.length > start + length:
            if verify == "require":
                reason = ("publishes no piece digests" if not d.pieces
                          else f"publishes no piece digests that make up rows [{start}, {start + length})")
                raise ReshardRefused(f"seed rank {rank} {reason} and verify is 'require'", tensor=name, seed=seed)
            return [(start, length, "")]
        out.append((p.global_start, p.length, p.digest))
        pos += p.length
    return out


def _check_or_note(checks: list[PieceCheck], unverified: list[str], rank: int, name: str, size: int,
                   digest: str, verify: str, seed: str) -> None:
    """A whole tensor read from seed rank `rank`: check it against `digest`, or note it (per `verify`)."""
    if verify == "off":
        return
    if digest:
        checks.append(PieceCheck(rank, name, 0, size, digest))
    elif verify == "require":
        raise ReshardRefused(f"seed rank {rank} publishes no digest for it and verify is 'require'", tensor=name,
                             seed=seed)
    else:
        unverified.append(name)

