"""Reshard planning (sglang_mx.target.reshard_plan) and its execution (target.reshard._execute), TP 1/2/4 both ways.

The layouts below follow SGLang's rules for a Llama layer (fused QKV with
key/value heads replicated once TP exceeds them, fused gate_up, row-split
o_proj and down_proj, a vocab-split embedding, replicated norms and a
replicated row-parallel bias). Every seed rank holds its cut of random whole
tensors; the plan runs against `MemmoveEngine`, a stand-in for Mooncake in
one process (named as such: reads are memmoves between real tensors), and the
target's tensors must equal its cut of the whole tensors byte for byte.
"""

from __future__ import annotations

import ctypes
import dataclasses
import time

import pytest
import torch

from sglang_mx.digest import digest_many
from sglang_mx.errors import VerificationError
from sglang_mx.records import Span
from sglang_mx.target.reshard import _execute
from sglang_mx.seed import piece_digests_of
from sglang_mx.shards import piece_cuts, pieces_of
from sglang_mx.target.reshard_plan import ReshardRefused, plan_reshard
from sglang_mx.transfer.tensors import describe
from tests.procs.layouts import INTER, cut, specs_for, split, whole_tensors

class MemmoveEngine:
    """Stand-in for MooncakeEngine in one process: a read is a memmove between real tensors' memory."""

    def __init__(self) -> None:
        self.sessions: list[str] = []
        self.registered: list[tuple[int, int]] = []

    def register(self, ranges):
        regions = list(ranges)
        self.registered += regions
        return regions

    def unregister(self, regions) -> None:
        for r in regions:
            self.registered.remove(r)

    def read(self, session, reads, *, prepare=None, on_done=None, timeout_s=None, window_bytes=None) -> None:
        self.sessions.append(session)
        for i, r in enumerate(reads):
            ctypes.memmove(r.local_addr, r.remote_addr, r.length)
            if on_done:
                on_done(i)


def seed_rank(whole, tp, rank, kv_heads, *, pieces=True, digests=True):
    specs = specs_for(tp, rank, kv_heads)
    tensors = {n: cut(whole[n], spec) for n, spec in specs.items()}
    published = digest_many(tensors) if digests else {}
    piece = piece_digests_of(tensors, specs) if pieces else {}
    return tensors, describe(tensors, published, specs, piece)


def target_rank(tp, rank, kv_heads):
    specs = specs_for(tp, rank, kv_heads)
    tensors = {n: torch.zeros(spec.shape, dtype=torch.bfloat16) for n, spec in specs.items()}
    return tensors, describe(tensors, shards=specs)


def run(seed_tp, target_tp, target_r, kv_heads=4, verify="require", tamper=None):
    whole = whole_tensors(kv_heads)
    seeds = {r: seed_rank(whole, seed_tp, r, kv_heads) for r in range(seed_tp)}
    if tamper:
        rank, name, index = tamper
        seeds[rank][0][name].view(-1)[index] += 1
    tensors, local = target_rank(target_tp, target_r, kv_heads)
    plan = plan_reshard(local, {r: d for r, (_, d) in seeds.items()}, near=target_r * seed_tp // target_tp,
                        verify=verify, seed="test")
    engine = MemmoveEngine()
    _execute(engine, plan, {r: f"seed{r}" for r in seeds}, tensors, None, time.monotonic, "test")
    assert engine.registered == [], "staging left registered"
    return whole, tensors, plan


@pytest.mark.parametrize("seed_tp,target_tp", [(1, 2), (2, 1), (1, 4), (4, 1), (2, 4), (4, 2), (2, 2)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_target_rank_gets_its_cut_of_the_whole_tensors(seed_tp, target_tp, kv_heads):
    for target_r in range(target_tp):
        whole, tensors, plan = run(seed_tp, target_tp, target_r, kv_heads)
        for name, spec in specs_for(target_tp, target_r, kv_heads).items():
            assert torch.equal(tensors[name], cut(whole[name], spec)), (name, seed_tp, target_tp, target_r)
        # Every byte that landed was checked: pieces for the direct reads, whole digests for the staged ones.
        checked = sum(c.length for c in plan.checks) + sum(
            sum(c.length for c in s.copies) * s.dst_view[0] * s.dst_view[2] for s in plan.staged)
        assert checked == plan.total_bytes
        assert plan.unverified == ()


def test_row_split_tensors_are_staged_whole_and_column_splits_read_in_place():
    _, _, plan = run(2, 1, 0)
    assert sorted({s.name for s in plan.staged}) == ["down.weight", "o.weight"]
    assert sorted(s.rank for s in plan.staged if s.name == "o.weight") == [0, 1]
    assert set(plan.direct) == {0, 1}
    assert plan.read_bytes == plan.total_bytes  # TP 2 -> 1 reads nothing twice
    _, _, plan = run(1, 2, 1)
    staged = sum(s.size for s in plan.staged)
    assert plan.read_bytes - plan.total_bytes == staged // 2  # TP 1 -> 2 reads the row splits whole


def test_replicated_tensors_come_from_the_nearest_seed_rank():
    _, _, plan = run(4, 2, 1)  # target rank 1 of 2 sits over seed ranks 2 and 3
    norm_reads = [r for rank, reads in plan.direct.items() for r in reads if rank == 2]
    assert norm_reads, "nothing read from seed rank 2"
    assert 0 not in plan.direct and 1 not in plan.direct


@pytest.mark.parametrize("name,index", [("qkv.weight", 5), ("o.weight", 3), ("norm.weight", 0), ("embed.weight", 400)])
def test_a_changed_byte_on_any_seed_rank_is_caught(name, index):
    with pytest.raises(VerificationError) as e:
        run(2, 1, 0, tamper=(1 if name != "norm.weight" else 0, name, index))
    assert name in str(e.value)


def test_piece_cuts_fall_on_every_tp_boundary():
    cuts = set(piece_cuts([32, 16, 16]))
    for tp in (1, 2, 4, 8):
        for start, size in ((0, 32), (32, 16), (48, 16)):
            assert {start + size * i // tp for i in range(tp + 1)} <= cuts
    spec = specs_for(2, 1, 4)["qkv.weight"]
    assert [(g, n) for _, g, n in pieces_of(spec)][:2] == [(16, 4), (20, 4)]


def test_refusals_name_the_tensor_and_the_reason():
    whole = whole_tensors(4)
    seeds = {r: seed_rank(whole, 2, r, 4)[1] for r in range(2)}
    tensors, local = target_rank(1, 0, 4)
    # A tensor of ours without facts.
    bare = [d if d.name != "down.weight" else type(d)(d.name, d.addr, d.size, d.dtype) for d in local]
    with pytest.raises(ReshardRefused, match="'down.weight': our layer publishes no split facts"):
        plan_reshard(bare, seeds, near=0, verify="require")
    # The seed's whole tensor is another one (other parts).
    other = {r: [d if d.name != "gate_up.weight" else type(d)(**{**d.__dict__, "shard": split(
        d.shard.shape, 0, [INTER // 2, INTER * 3 // 2], [Span(0, 0, INTER // 2), Span(INTER // 2, INTER, INTER // 2)])})
        for d in ds] for r, ds in seeds.items()}
    with pytest.raises(ReshardRefused, match="'gate_up.weight'.*parts"):
        plan_reshard(local, other, near=0, verify="require")
    # A rank missing: rows nobody holds.
    with pytest.raises(ReshardRefused, match="no seed rank holds"):
        plan_reshard(local, {0: seeds[0]}, near=0, verify="require")
    # A tensor only the seed has.
    extra = {r: [*ds, type(ds[0])("extra.weight", 1 << 20, 8)] for r, ds in seeds.items()}
    with pytest.raises(ReshardRefused, match="'extra.weight'"):
        plan_reshard(local, extra, near=0, verify="require")


def test_rows_that_are_no_run_of_piece_digests_are_staged_whole_and_checked_in_every_mode_but_off():
    """No unchecked reads: a dim-0 range the seed published no pieces for (here none at all, as for
    a TP that does not divide PIECE_WAYS) is read as the seed rank's whole tensor and checked against
    its whole digest, under require and if_present alike."""
    whole = whole_tensors(4)
    seeds = {r: seed_rank(whole, 1, r, 4, pieces=False)[1] for r in range(1)}
    _, local = target_rank(2, 0, 4)
    for verify in ("require", "if_present"):
        plan = plan_reshard(local, seeds, near=0, verify=verify)
        assert plan.unverified == ()
        assert {s.name for s in plan.staged} == {"embed.weight", "qkv.weight", "qkv.bias", "o.weight",
                                                 "gate_up.weight", "down.weight"}
        assert all(s.digest for s in plan.staged) and all(c.digest for c in plan.checks)
        # every tensor is either staged (checked whole) or read whole and checked (the replicated norms)
        assert {c.name for c in plan.checks} | {s.name for s in plan.staged} == {t.name for t in local if t.size}
    plan = plan_reshard(local, seeds, near=0, verify="off")
    assert plan.checks == () and all(s.digest == "" for s in plan.staged)


def test_with_no_digests_at_all_require_refuses_and_if_present_reads_unchecked():
    whole = whole_tensors(4)
    seeds = {r: seed_rank(whole, 1, r, 4, pieces=False, digests=False)[1] for r in range(1)}
    _, local = target_rank(2, 0, 4)
    with pytest.raises(ReshardRefused, match="no digest for it.*require"):
        plan_reshard(local, seeds, near=0, verify="require")
    plan = plan_reshard(local, seeds, near=0, verify="if_present")
    assert "qkv.weight" in plan.unverified and "o.weight" in plan.unverified


def test_digests_computed_over_unchecked_bytes_are_no_proof_under_require():
    from sglang_mx.records import DIGEST_UNVERIFIED

    whole = whole_tensors(4)
    _, published = seed_rank(whole, 1, 0, 4)
    relayed = [dataclasses.replace(t, digest_origin=DIGEST_UNVERIFIED) for t in published]
    _, local = target_rank(2, 0, 4)
    with pytest.raises(ReshardRefused, match="never checked"):
        plan_reshard(local, {0: relayed}, near=0, verify="require")
    assert plan_reshard(local, {0: relayed}, near=0, verify="if_present").checks
