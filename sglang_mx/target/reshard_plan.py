"""Reshard plans: which reads fill a rank of one TP layout from the ranks of a seed instance of
another, and which digest checks cover every byte it keeps. Pure functions.

The split facts both sides publish, and how bytes move and are checked, are
described in sglang_mx.shards. What is checked follows the one verify rule
(`target.verify.expect`): a range the seed published a digest for is checked
against it; one it did not is refused under require, read unchecked (and listed
in `unverified`) under if_present.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from sglang_mx.errors import MxError
from sglang_mx.records import ShardSpec, TensorDescriptor
from sglang_mx.shards import check_spec
from sglang_mx.target.verify import VerifyMode, expect
from sglang_mx.transfer.plan import Read, merge_reads


class ReshardRefused(MxError):
    """The planner cannot prove a mixed-layout pull correct: no byte is read."""

    def __init__(self, message: str, *, tensor: str = "", seed: str = "") -> None:
        self.tensor = tensor
        self.seed = seed
        where = f"tensor {tensor!r}: " if tensor else ""
        super().__init__(f"cannot reshard from {seed or 'the seed'}: {where}{message}")


@dataclasses.dataclass(frozen=True)
class RangeCheck:
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
    checks: tuple[RangeCheck, ...]  # for the direct reads (none when verify is off)
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
    verify: VerifyMode,
    seed: str = "",
) -> ReshardPlan:
    """Plan reading our tensors (`local`, each with its ShardSpec) from a seed instance's ranks.

    `seeds`: seed rank -> its published descriptors. `near`: the seed rank to prefer
    (replicated tensors and ties). `verify`: the mode `target.verify.expect` applies
    to every range read. Raises ReshardRefused naming the tensor and the reason for
    anything it cannot prove.
    """
    verify = VerifyMode(verify)
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
    checks: list[RangeCheck] = []
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
            _check_or_note(checks, unverified, r, t.name, t.size, d.digest, verify, seed, d.digest_origin)
            continue
        segments = _cover(t.name, spec, {r: remote[r].shard for r in order}, seed)
        outer, rows, inner = _view(spec, t.size)
        by_seed: dict[int, list[Copy]] = {}  # seed rank -> rows read whole into staging, then copied
        if spec.dim == 0:
            for r, src_start, dst_start, length, g in segments:
                d = remote[r]
                pieces = _pieces_covering(d, g, length) if verify.checks else []
                if pieces is None and (d.digest or expect(verify, "") is None):
                    # Not a run of published pieces: read the seed rank's whole tensor and check it whole
                    # (under require with no whole digest either, `_whole` below refuses the plan).
                    by_seed.setdefault(r, []).append(Copy(src_start, dst_start, length))
                    continue
                direct.setdefault(r, []).append(Read(t.addr + dst_start * inner, d.addr + src_start * inner,
                                                     length * inner))
                read += length * inner
                if pieces is None:  # if_present and nothing published for these rows
                    unverified.append(t.name)
                for piece_start, piece_len, digest in pieces or ():
                    checks.append(RangeCheck(r, t.name, (dst_start + piece_start - g) * inner, piece_len * inner,
                                             _whole(verify, digest, t.name, seed, r, d.digest_origin)))
        else:
            for r, src_start, dst_start, length, _ in segments:
                by_seed.setdefault(r, []).append(Copy(src_start, dst_start, length))
        if by_seed:
            for r, copies in by_seed.items():
                d = remote[r]
                digest = _whole(verify, d.digest, t.name, seed, r, d.digest_origin)
                if not digest and verify.checks:
                    unverified.append(t.name)
                staged.append(Staged(r, t.name, d.addr, d.size, digest, _view(d.shard, d.size), (outer, rows, inner),
                                     tuple(copies)))
                read += d.size
    return ReshardPlan(direct={r: tuple(merge_reads(reads)) for r, reads in direct.items()}, staged=tuple(staged),
                       checks=tuple(checks), unverified=tuple(dict.fromkeys(unverified)),
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


def _pieces_covering(d: TensorDescriptor, start: int, length: int) -> list[tuple[int, int, str]] | None:
    """(global start, rows, digest) of the seed's published pieces that make up rows [start, +length),
    or None when they are not a run of its pieces."""
    published = {p.global_start: p for p in d.pieces}
    out, pos = [], start
    while pos < start + length:
        p = published.get(pos)
        if p is None or p.length <= 0 or pos + p.length > start + length:
            return None
        out.append((p.global_start, p.length, p.digest))
        pos += p.length
    return out


def _whole(verify: VerifyMode, digest: str, name: str, seed: str, rank: int, origin: str = "") -> str:
    """The digest bytes read from seed rank `rank` are checked against ("" unchecked), per the rule."""
    expected = expect(verify, digest, origin)
    if expected is None:
        raise ReshardRefused(f"seed rank {rank} publishes no digest for it (or one computed over bytes it never "
                             "checked) and verify is 'require'", tensor=name, seed=seed)
    return expected


def _check_or_note(checks: list[RangeCheck], unverified: list[str], rank: int, name: str, size: int,
                   digest: str, verify: VerifyMode, seed: str, origin: str = "") -> None:
    """A whole tensor read from seed rank `rank`: check it against its digest, or note it unchecked."""
    expected = _whole(verify, digest, name, seed, rank, origin)
    if expected:
        checks.append(RangeCheck(rank, name, 0, size, expected))
    elif verify.checks:
        unverified.append(name)
