"""Mixed parallel layouts: how a rank's tensors are cut out of the whole model. Pure functions.

A seed publishes, per tensor, a `ShardSpec` read from SGLang's own parallel
layers (sglang_mx.sglang.shard_facts): the split dimension, the sizes of the
fused parts of the whole tensor (QKV is q, k, v; gate_up is gate, up), and the
spans of the whole tensor this rank holds. Replicated tensors say so (dim -1).
A target of another layout computes the same facts for its own ranks and
`target.reshard_plan.plan_reshard` turns both into reads, or refuses with the
tensor and the reason.

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

from typing import Sequence

from sglang_mx.records import ShardSpec, Span

# Dim-0 spans are digested in pieces of part/PIECE_WAYS rows: TP sizes dividing it verify piecewise.
PIECE_WAYS = 8


def replicated(shape: Sequence[int]) -> ShardSpec:
    return ShardSpec(dim=-1, shape=tuple(shape))


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
