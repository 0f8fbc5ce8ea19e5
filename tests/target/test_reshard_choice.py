"""Which seed instances of another layout a target may take (sglang_mx.target.reshard.instances). Pure."""

import random

from sglang_mx.records import SourceRef, SourceStatus
from sglang_mx.layout import seed_topology
from sglang_mx.target.reshard import MixedLayout, instances

MIXED = MixedLayout(model_id="m1", model_name="llama", tp_size=1, tp_rank=0, tensors={}, descriptors=())


def ref(instance, rank, *, tp=2, source="s2", model_id="m1", status=SourceStatus.READY, load=None, pp=1, at=1):
    return SourceRef(mx_source_id=source, worker_id=f"{instance}-rank{rank}", model_name="llama", worker_rank=rank,
                     status=status, updated_at_ms=at, source_load=load,
                     topology=seed_topology(model_id=model_id, tp_size=tp, pp_size=pp, instance=instance))


def ids(groups):
    return [[r.worker_id for r in g] for g in groups]


def test_only_whole_instances_of_our_model_in_another_layout():
    refs = [
        ref("a", 1), ref("a", 0),  # whole, listed out of order
        ref("b", 0),  # rank 1 missing
        ref("c", 0, model_id="other"), ref("c", 1, model_id="other"),  # another model
        ref("d", 0, source="ours", tp=1),  # our own identity (the same-layout path serves it)
        ref("e", 0, pp=2, tp=1), ref("e", 1, pp=2, tp=1),  # pipeline stages are not resharded
        ref("f", 0, status=SourceStatus.STALE), ref("f", 1),
    ]
    assert ids(instances(refs, MIXED, exclude_source_id="ours")) == [["a-rank0", "a-rank1"]]


def test_least_loaded_first_and_random_among_equals():
    refs = [ref("busy", 0, load=2.0), ref("busy", 1, load=1.0), ref("idle", 0, load=0.0), ref("idle", 1),
            ref("also", 0, tp=4, source="s4"), *[ref("also", r, tp=4, source="s4") for r in (1, 2, 3)]]
    firsts = {ids(instances(refs, MIXED, exclude_source_id="x", rng=random.Random(seed)))[0][0] for seed in range(20)}
    assert firsts == {"idle-rank0", "also-rank0"}  # both unloaded, either first; the busy one never
    last = ids(instances(refs, MIXED, exclude_source_id="x", rng=random.Random(0)))[-1]
    assert last == ["busy-rank0", "busy-rank1"]


def test_a_rank_published_twice_keeps_its_newest_record():
    refs = [ref("a", 0, at=5), ref("a", 1), ref("a", 0, at=9, load=0.5)]
    [group] = instances(refs, MIXED, exclude_source_id="x")
    assert group[0].updated_at_ms == 9
