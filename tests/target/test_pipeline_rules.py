"""The pipelined cascade's rules, pure: the tree plan (order_parents), whole destinations to the
sources that hold them (assign), the verified bitmap, the engine's window (a fake binding, named
as such), and the config's checks."""

from __future__ import annotations

import ctypes
import dataclasses
import random
import threading

import pytest

from sglang_mx.config import ConfigError, parse_config
from sglang_mx.records import TOPOLOGY_DEPTH, TOPOLOGY_PIPELINE, SourceRef, SourceStatus
from sglang_mx.target.choice import order_parents
from sglang_mx.target.pipeline import VerifiedSet, depth_of, is_partial
from sglang_mx.target.stripes import Destination, assign
from sglang_mx.transfer import engine as engine_module
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.plan import Read


def _ref(worker_id, *, depth=None, load=None):
    partial = depth is not None
    return SourceRef(mx_source_id="id", worker_id=worker_id, model_name="m", worker_rank=0,
                     status=SourceStatus.INITIALIZING if partial else SourceStatus.READY, updated_at_ms=1,
                     topology={TOPOLOGY_PIPELINE: "1", TOPOLOGY_DEPTH: str(depth)} if partial else {},
                     source_load=load)


def test_full_seeds_first_then_partial_seeds_shallowest_and_least_loaded_first():
    full = [_ref("busy", load=3), _ref("idle", load=0)]
    partial = [_ref("d2", depth=2), _ref("d1-busy", depth=1, load=1), _ref("d1", depth=1, load=0)]
    order = order_parents(full, partial, spread=False)
    assert [r.worker_id for r in order] == ["idle", "busy", "d1", "d1-busy", "d2"]


def test_a_target_in_the_tree_attaches_only_to_shallower_partial_seeds_and_never_to_itself():
    partial = [_ref("d1", depth=1), _ref("d2", depth=2), _ref("d3", depth=3), _ref("me", depth=2)]
    order = order_parents([_ref("root")], partial, own_depth=3, own_worker="me", spread=False)
    assert [r.worker_id for r in order] == ["root", "d1", "d2"]  # d3 could be our own child
    assert [r.worker_id for r in order_parents([], partial, own_worker="me", spread=False)] == ["d1", "d2", "d3"]


def test_parents_chosen_by_order_parents_never_form_a_cycle():
    """Random fleets attaching and re-attaching: every parent is strictly shallower than its child."""
    rng = random.Random(7)
    depth = {"root": 0}
    parent_of = {}
    for step in range(400):
        name = f"t{rng.randrange(40)}"
        refs = [_ref(w, depth=d) if d else _ref(w) for w, d in depth.items() if w != name]
        full = [r for r in refs if not is_partial(r)]
        partial = [r for r in refs if is_partial(r)]
        order = order_parents(full, partial, own_depth=depth.get(name), own_worker=name, rng=rng)
        parent = order[rng.randrange(len(order))]  # any allowed parent (some are busy)
        parent_of[name] = parent.worker_id
        depth.setdefault(name, depth_of(parent) + 1)
        assert depth_of(parent) < depth[name]
    for start in parent_of:  # following parents always reaches the root
        seen, node = set(), start
        while node != "root":
            assert node not in seen
            seen.add(node)
            node = parent_of.get(node, "root")


def test_a_malformed_depth_is_never_shallower_than_anyone():
    odd = SourceRef(mx_source_id="id", worker_id="x", model_name="m", worker_rank=0,
                    status=SourceStatus.INITIALIZING, updated_at_ms=1, topology={TOPOLOGY_PIPELINE: "1",
                                                                                   TOPOLOGY_DEPTH: "deep"})
    assert order_parents([], [odd], own_depth=5) == []
    assert depth_of(_ref("r")) == 0 and not is_partial(_ref("r"))


def test_assign_gives_whole_destinations_to_sources_that_hold_them_balanced_by_bytes():
    dests = [Destination(100 * i, 10 + i, (f"t{i}",)) for i in range(6)]
    holds_even = lambda d: int(d.names[0][1:]) % 2 == 0  # noqa: E731
    stripes = assign(dests, [lambda d: True, holds_even, lambda d: False])
    assert stripes[2] == []
    given = {s.dest.names[0]: i for i, stripe in enumerate(stripes) for s in stripe}
    assert set(given) == {d.names[0] for d in dests}  # every destination once
    assert all(s.offset == 0 and s.length == s.dest.size for stripe in stripes for s in stripe)
    # In address order, each to the holder given the fewest bytes so far (the odd ones only source 0 holds).
    assert given == {"t0": 0, "t1": 0, "t2": 1, "t3": 0, "t4": 1, "t5": 0}


def test_assign_leaves_out_what_no_source_holds():
    dests = [Destination(0, 8, ("a",)), Destination(8, 8, ("b",))]
    stripes = assign(dests, [lambda d: d.names == ("a",)])
    assert [[s.dest.names for s in stripe] for stripe in stripes] == [[("a",)]]


def test_the_verified_bitmap_sets_bits_once_counts_bytes_and_wakes_waiters():
    vs = VerifiedSet(["a", "b", "empty", "c"], [4, 8, 0, 16])
    snap = vs.snapshot()
    assert snap.bits == bytes([0b0100]) and snap.verified_bytes == 0 and not snap.complete  # empty: verified
    woke = []
    t = threading.Thread(target=lambda: woke.append(vs.wait_newer(snap.version, 10)))
    t.start()
    assert vs.add(["b", "b", "unknown"]) == 1
    t.join(5)
    assert woke and woke[0].bits == bytes([0b0110]) and woke[0].verified_bytes == 8
    vs.add(["a", "c"])
    assert vs.snapshot().complete and vs.snapshot().verified_bytes == 28
    vs.fail()  # too late: complete stays complete
    assert not vs.snapshot().failed


def test_a_failed_bitmap_says_so_and_finish_sets_every_bit():
    vs = VerifiedSet([f"t{i}" for i in range(10)], [1] * 10)
    vs.fail()
    assert vs.snapshot().failed
    other = VerifiedSet([f"t{i}" for i in range(10)], [1] * 10)
    other.finish()
    assert other.snapshot().bits == b"\xff\xff" and other.snapshot().complete


class FakeBinding:
    """Stand-in for Mooncake's binding (a fake): each batch completes after `polls` checks; records the
    most reads in flight at once and the order reads landed."""

    def __init__(self, polls: int = 20):
        self.polls = polls
        self.batches: dict[int, list] = {}
        self.peak = 0
        self.landed = []

    def batch_transfer_async_read(self, session, locals_, remotes, lengths):
        bid = len(self.batches) + 1
        self.batches[bid] = [self.polls, locals_[0]]
        self.peak = max(self.peak, sum(1 for b in self.batches.values() if b[0] > 0))
        return bid

    def transfer_check_status(self, bid):
        b = self.batches[bid]
        if b[0] > 0:
            b[0] -= 1
            if b[0] == 0:
                self.landed.append(b[1])
                return 1
            return 0
        return 1


def _reads(n, size, buf):
    base = ctypes.addressof(buf)
    return [Read(base + i * size, 1000 + i * size, size) for i in range(n)]


def test_a_window_keeps_few_reads_in_flight_and_hands_each_one_over_as_it_lands(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    buf = ctypes.create_string_buffer(8 * 64)
    binding = FakeBinding()
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=None)
    monkeypatch.setattr(engine, "_remote_edges", lambda session: [])
    done_while_submitting = []
    engine.read("seed:1", _reads(8, 64, buf), window_bytes=128,
                on_done=lambda i: done_while_submitting.append((i, len(binding.batches))))
    assert binding.peak == 2
    assert [i for i, _ in done_while_submitting] == list(range(8))
    assert done_while_submitting[0][1] < 8  # the first read was handed over before the last was submitted

    unwindowed = FakeBinding()
    engine = MooncakeEngine(unwindowed, "me:1", owned=False, transport="tcp", allocations=None)
    monkeypatch.setattr(engine, "_remote_edges", lambda session: [])
    engine.read("seed:1", _reads(8, 64, buf))
    assert unwindowed.peak == 8


def test_pipeline_config_needs_a_seeding_role_and_verification():
    assert parse_config({"pipeline": True}).pipeline
    with pytest.raises(ConfigError, match="needs source true or left out"):
        parse_config({"pipeline": True, "source": False})
    with pytest.raises(ConfigError, match="needs verify 'require' or 'if_present'"):
        parse_config({"pipeline": True, "verify": "off"})
    with pytest.raises(ConfigError, match="key 'pipeline' must be true or false"):
        parse_config({"pipeline": "yes"})


def test_reads_larger_than_the_window_still_keep_two_in_flight(monkeypatch):
    """A large tensor moves while the one before it is verified: the link never idles on the hash."""
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    buf = ctypes.create_string_buffer(6 * 256)
    binding = FakeBinding()
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=None)
    monkeypatch.setattr(engine, "_remote_edges", lambda session: [])
    engine.read("seed:1", _reads(6, 256, buf), window_bytes=128, on_done=lambda i: None)
    assert binding.peak == 2


def test_the_deadline_counts_from_the_last_piece_that_landed(monkeypatch):
    """Eight reads, each well within the deadline, all of them together well past it: not cut."""
    import time as time_module

    monkeypatch.setattr(engine_module, "POLL_S", 0.001)
    buf = ctypes.create_string_buffer(8 * 64)

    class Slow(FakeBinding):
        def transfer_check_status(self, bid):
            time_module.sleep(0.002)
            return super().transfer_check_status(bid)

    engine = MooncakeEngine(Slow(polls=10), "me:1", owned=False, transport="tcp", allocations=None)
    monkeypatch.setattr(engine, "_remote_edges", lambda session: [])
    started = time_module.monotonic()
    engine.read("seed:1", _reads(8, 64, buf), window_bytes=64, timeout_s=0.1)
    assert time_module.monotonic() - started > 0.1  # longer than the deadline in all, yet no error


def test_a_seed_listed_at_its_published_cap_is_skipped_unasked():
    from sglang_mx.records import TOPOLOGY_MAX_READERS
    from sglang_mx.target.choice import at_cap, order_candidates

    def seed(worker_id, load, cap):
        return SourceRef(mx_source_id="id", worker_id=worker_id, model_name="m", worker_rank=0,
                         status=SourceStatus.READY, updated_at_ms=1, source_load=load,
                         topology={TOPOLOGY_MAX_READERS: str(cap)} if cap is not None else {})

    full, room, uncapped, unknown = seed("full", 2, 2), seed("room", 1, 2), seed("uncapped", 9, None), seed("?", None, 2)
    assert [at_cap(r) for r in (full, room, uncapped, unknown)] == [True, False, False, False]
    assert [r.worker_id for r in order_candidates([full, room, uncapped, unknown], spread=False)] == [
        "?", "room", "uncapped"]
    partial = dataclasses.replace(_ref("p", depth=1), source_load=1, topology={
        TOPOLOGY_PIPELINE: "1", TOPOLOGY_DEPTH: "1", TOPOLOGY_MAX_READERS: "1"})
    assert order_parents([], [partial]) == []
