"""Seed choice: least-loaded first, equal loads spread at random (pure)."""

import collections
import random

from sglang_mx.target.choice import order_candidates
from sglang_mx.records import SourceRef, SourceStatus


def _ref(worker_id, load=None):
    return SourceRef(mx_source_id="id", worker_id=worker_id, model_name="m", worker_rank=0,
                     status=SourceStatus.READY, updated_at_ms=1, source_load=load)


def test_least_loaded_first_and_unreported_load_counts_as_idle():
    refs = [_ref("busy", 3.0), _ref("quiet", 1.0), _ref("legacy"), _ref("idle", 0.0)]
    order = [r.worker_id for r in order_candidates(refs, rng=random.Random(1))]
    assert order[2:] == ["quiet", "busy"]
    assert set(order[:2]) == {"legacy", "idle"}


def test_without_spread_ties_keep_the_listing_order():
    refs = [_ref("newest", 0.0), _ref("older", 0.0), _ref("loaded", 2.0)]
    assert [r.worker_id for r in order_candidates(refs, spread=False)] == ["newest", "older", "loaded"]


def test_equal_loads_spread_eight_targets_over_the_seeds():
    refs = [_ref(f"s{i}", 0.0) for i in range(4)]
    rng = random.Random(20261128)
    firsts = collections.Counter(order_candidates(refs, rng=rng)[0].worker_id for _ in range(800))
    assert set(firsts) == {"s0", "s1", "s2", "s3"}
    assert all(150 < n < 250 for n in firsts.values()), firsts
