"""The pipelined cascade's rules, pure: the tree plan (order_parents), whole destinations to the
sources that hold them (assign), the verified bitmap, the engine's window (a fake binding, named
as such), and the config's checks."""

from __future__ import annotations

import ctypes
import dataclasses
import random
import threading
import time

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


def _engine(monkeypatch, binding) -> MooncakeEngine:
    """The real MooncakeEngine over a fake `binding`, with no registered regions to cut reads at."""
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=None)
    monkeypatch.setattr(engine, "_remote_edges", lambda session: [])
    return engine


def _reads(n, size, buf):
    base = ctypes.addressof(buf)
    return [Read(base + i * size, 1000 + i * size, size) for i in range(n)]


def test_a_window_keeps_few_reads_in_flight_and_hands_each_one_over_as_it_lands(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    buf = ctypes.create_string_buffer(8 * 64)
    binding = FakeBinding()
    engine = _engine(monkeypatch, binding)
    done_while_submitting = []
    engine.read("seed:1", _reads(8, 64, buf), window_bytes=128,
                on_done=lambda i: done_while_submitting.append((i, len(binding.batches))))
    assert binding.peak == 2
    assert [i for i, _ in done_while_submitting] == list(range(8))
    assert done_while_submitting[0][1] < 8  # the first read was handed over before the last was submitted

    unwindowed = FakeBinding()
    engine = _engine(monkeypatch, unwindowed)
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
    engine = _engine(monkeypatch, binding)
    submitted_when_verified = []
    engine.read("seed:1", _reads(6, 256, buf), window_bytes=128,
                on_done=lambda i: submitted_when_verified.append(len(binding.batches)))
    assert binding.peak == 2
    assert submitted_when_verified[0] == 3  # read 0 landed: read 2 went out before read 0 was verified


def test_more_reads_are_asked_for_while_the_window_has_room_and_the_read_ends_when_an_idle_ask_finds_none(
        monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    buf = ctypes.create_string_buffer(6 * 64)
    binding = FakeBinding()
    engine = _engine(monkeypatch, binding)
    reads = _reads(6, 64, buf)
    later, asked, done = list(reads[2:]), [], []

    def more(idle, room, may_wait):
        asked.append((idle, room, may_wait))
        assert not may_wait or idle
        return [later.pop(0)] if later and (idle or later[0].length <= room) else []

    engine.read("seed:1", reads[:2], window_bytes=128, on_done=done.append, more=more)
    assert done == list(range(6))  # the fed reads are indexed after the first ones
    assert binding.landed == [r.local_addr for r in reads]
    assert binding.peak == 2  # 128 bytes: two reads of 64
    assert asked[-1] == (True, 128, True)  # nothing in flight or to verify, nothing given: the call ended
    assert all(0 <= room <= 128 for _, room, _ in asked)


def test_a_fed_read_larger_than_the_room_waits_for_the_one_in_flight(monkeypatch):
    """What the source verified while a large read moves does not share its link: it goes next."""
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    buf = ctypes.create_string_buffer(4 * 256)
    binding = FakeBinding()
    engine = _engine(monkeypatch, binding)
    reads = _reads(4, 256, buf)
    later = list(reads[1:])

    def more(idle, room, may_wait):
        return [later.pop(0)] if later and (idle or later[0].length <= room) else []

    submitted_when_verified = []
    engine.read("seed:1", reads[:1], window_bytes=128, more=more,
                on_done=lambda i: submitted_when_verified.append(len(binding.batches)))
    assert binding.peak == 1
    assert binding.landed == [r.local_addr for r in reads]
    assert submitted_when_verified[:3] == [2, 3, 4]  # each next read went out before the last was verified


class FakeWatch:
    """What a child sees of its partial parent (a fake VerifiedWatch): the test says what is verified."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.version = 0
        self.broken = ""
        self.complete = False
        self._cond = threading.Condition()

    def verify(self, *names: str) -> None:
        with self._cond:
            self.names.update(names)
            self.version += 1
            self._cond.notify_all()

    def holder(self):
        held = frozenset(self.names)
        return lambda names: all(n in held for n in names)

    def wait(self, version: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.version != version, timeout=timeout_s)

    def close(self) -> None:
        pass


def _pipelined_pull(monkeypatch, watch: FakeWatch, n: int, on_submit=lambda i: None):
    """A StripedPull of `n` 64-byte tensors t0.. whose one source is a partial parent seen through `watch`,
    read by the real engine over a fake binding that calls `on_submit(i)` as tensor i's read is submitted."""
    from sglang_mx.records import TensorDescriptor
    from sglang_mx.target.striped import StripedPull, _Source
    from sglang_mx.target.verify import VerifyMode

    buf = ctypes.create_string_buffer(n * 64)
    base = ctypes.addressof(buf)

    class Binding(FakeBinding):
        def batch_transfer_async_read(self, session, locals_, remotes, lengths):
            on_submit((locals_[0] - base) // 64)
            return super().batch_transfer_async_read(session, locals_, remotes, lengths)

    binding = Binding()
    engine = _engine(monkeypatch, binding)
    tensors = [TensorDescriptor(name=f"t{i}", addr=base + i * 64, size=64) for i in range(n)]
    final: list[str] = []
    pull = StripedPull(tensors, verify=VerifyMode.OFF, verifier=None, clock=time.monotonic,
                       on_final=lambda dest, checked: final.append(dest.names[0]), window_bytes=128)
    pull.sources.append(_Source(_ref("parent", depth=1), "seed:1", "parent", {f"t{i}": 1 << 20 | i * 64 for i in range(n)},
                                {}, None, watch, 1))
    pull.checked = True
    return pull, engine, binding, final, buf


def test_a_pipelined_round_takes_in_what_its_parent_verifies_while_it_reads(monkeypatch):
    """The parent verifies tensor i+1 only as the child's read of tensor i starts: one round reads them all,
    in order, each only once the parent held it."""
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    watch = FakeWatch()
    held_at_submit = []

    def parent_goes_on(i):
        held_at_submit.append(f"t{i}" in watch.names)
        watch.verify(f"t{i + 1}")

    watch.verify("t0")
    pull, engine, binding, final, _buf = _pipelined_pull(monkeypatch, watch, 6, parent_goes_on)
    assert pull.round(engine)
    assert pull.rounds == 1 and pull.done
    assert all(held_at_submit) and len(held_at_submit) == 6
    assert sorted(final) == [f"t{i}" for i in range(6)]
    assert binding.landed == sorted(binding.landed)  # in order


def test_a_pipelined_round_ends_when_its_parent_stalls_and_leaves_the_rest_pending(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    from sglang_mx.target import striped

    monkeypatch.setattr(striped, "FEED_WAIT_S", 0.05)
    watch = FakeWatch()
    watch.verify("t0", "t1")
    pull, engine, binding, final, _buf = _pipelined_pull(monkeypatch, watch, 4)
    started = time.monotonic()
    assert pull.round(engine)
    assert time.monotonic() - started < 5
    assert sorted(final) == ["t0", "t1"] and [d.names[0] for d in pull.pending] == ["t2", "t3"]
    assert not pull.round(engine) or pull.pending  # nothing new: no read of an unverified tensor
    assert len(binding.batches) == 2


def test_the_deadline_counts_from_the_last_piece_that_landed(monkeypatch):
    """Eight reads, each well within the deadline, all of them together well past it: not cut."""
    import time as time_module

    monkeypatch.setattr(engine_module, "POLL_S", 0.001)
    buf = ctypes.create_string_buffer(8 * 64)

    class Slow(FakeBinding):
        def transfer_check_status(self, bid):
            time_module.sleep(0.002)
            return super().transfer_check_status(bid)

    engine = _engine(monkeypatch, Slow(polls=10))
    started = time_module.monotonic()
    engine.read("seed:1", _reads(8, 64, buf), window_bytes=64, timeout_s=0.1)
    assert time_module.monotonic() - started > 0.1  # longer than the deadline in all, yet no error


def test_a_seed_listed_at_its_published_cap_is_skipped_unasked():
    from sglang_mx.records import TOPOLOGY_MAX_READERS
    from sglang_mx.target.choice import order_candidates
    from sglang_mx.tree import at_cap

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
