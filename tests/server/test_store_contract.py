"""The one contract every SourceStore backend must honour (see sglang_mx/server/store.py).

A backend gets the whole suite by subclassing `StoreContract` and implementing
`make_store()`. The suite only uses the public SourceStore interface, and passes
every time explicitly, so it never sleeps.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import pytest

from sglang_mx import wire
from sglang_mx.server import MemoryStore, ReapStats, SourceStore
from sglang_mx.server.framing import get_response_bytes
from sglang_mx.server.store import Capacity, CapacityError, NotOwnerError, QuotaError
from sglang_mx.records import (
    TOPOLOGY_VERIFIED_BYTES,
    EncodedWorker,
    SourceIdentity,
    SourceQuery,
    SourceStatus,
    StoredWorker,
    TensorDescriptor,
    WorkerBytes,
    WorkerRecord,
)

SRC_A = "aaaaaaaaaaaaaaaa"
SRC_B = "bbbbbbbbbbbbbbbb"
ID_A = SourceIdentity(model_name="org/model-a", tensor_parallel_size=2, dtype="bfloat16")
ID_B = SourceIdentity(model_name="org/model-b", tensor_parallel_size=1, dtype="float16")
T0 = 1_700_000_000_000  # a fixed "now" in unix ms
HB = 90_000  # heartbeat timeout, ms
GC = 3_600_000  # STALE -> deleted, ms


def _tensors(prefix: str, n: int, size: int = 256) -> tuple[TensorDescriptor, ...]:
    return tuple(TensorDescriptor(name=f"{prefix}.{i}", addr=0x1000 + i * size, size=size, dtype="u8")
                 for i in range(n))


def _worker(rank: int = 0, *, status: SourceStatus = SourceStatus.READY, at: int = T0, prefix: str = "t",
            n: int = 3, session: str = "127.0.0.1:1", **kw) -> WorkerRecord:
    return WorkerRecord(worker_rank=rank, transfer_engine_session_id=session, tensors=_tensors(prefix, n),
                        status=status, updated_at_ms=at, **kw)


def _encoded(worker_id: str, *, source: str = SRC_A, owner: str = "", worker_bytes: bytes = b"\x08\x00",
             status: SourceStatus = SourceStatus.READY, model: str = "org/model-a", at: int = T0) -> EncodedWorker:
    """A record as the servicer hands it to a store; the bytes are opaque to the store."""
    return EncodedWorker(mx_source_id=source, worker_id=worker_id, model_name=model, worker_rank=0,
                         status=status, updated_at_ms=at, identity_bytes=IDENTITY_BYTES,
                         worker_bytes=worker_bytes, owner=owner)


IDENTITY_BYTES = b"\x1a\x0borg/model-a"  # what every _encoded record's identity adds to its size


def _sized(worker_id: str, size: int, **kw) -> EncodedWorker:
    """A record of `size` bytes as quotas count them (identity + worker bytes)."""
    return _encoded(worker_id, worker_bytes=b"\x08" * (size - len(IDENTITY_BYTES)), **kw)


class RecordingListener:
    """A ChangeListener that notes what it is told, in order (our own protocol: a recorder, not a fake
    of a real component)."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str]] = []
        self.missed_count = 0
        self._cond = threading.Condition()

    def changed(self, mx_source_id: str, worker_id: str) -> None:
        with self._cond:
            self.told.append((mx_source_id, worker_id))
            self._cond.notify_all()

    def missed(self) -> None:
        with self._cond:
            self.missed_count += 1
            self._cond.notify_all()

    def wait_for(self, key: tuple[str, str], timeout_s: float = 10.0) -> list[tuple[str, str]]:
        """Wait until `key` is told; return (and forget) everything told up to and including it."""
        with self._cond:
            assert self._cond.wait_for(lambda: key in self.told, timeout_s), f"{key} never told: {self.told}"
            upto = self.told.index(key) + 1
            told, self.told = self.told[:upto], self.told[upto:]
            return told


MARKER = "mmmmmmmmmmmmmmmm"  # a source of its own: a write to it shows that the writes before it were told


class StoreContract:
    """Subclass with `make_store()` returning a fresh, empty store, and `poison()`."""

    def make_store(self) -> SourceStore:
        raise NotImplementedError

    def poison(self, store: SourceStore, mx_source_id: str, worker_id: str) -> None:
        """Make every later read of that record raise: a listing that touches it fails."""
        raise NotImplementedError

    @pytest.fixture
    def store(self):
        store = self.make_store()
        assert isinstance(store, SourceStore)
        yield store
        store.close()

    # --- publish / get ------------------------------------------------------------------------------

    def test_publish_then_get_returns_the_record(self, store):
        worker = _worker(rank=1, accelerator="h100", topology={"node": "n1"}, metadata_endpoint="m:1")
        store.publish(SRC_A, "w1", ID_A, worker)
        assert store.get(SRC_A, "w1") == StoredWorker(mx_source_id=SRC_A, worker_id="w1", identity=ID_A, worker=worker)

    def test_get_unknown_is_none(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker())
        assert store.get(SRC_A, "nope") is None
        assert store.get(SRC_B, "w1") is None

    def test_publish_stores_status_and_time_as_given(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(status=SourceStatus.INITIALIZING, at=T0 - 5))
        got = store.get(SRC_A, "w1").worker
        assert (got.status, got.updated_at_ms) == (SourceStatus.INITIALIZING, T0 - 5)

    def test_publish_replaces_the_whole_record(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(prefix="old", n=5, session="h:1", accelerator="a100",
                                                  topology={"x": "1"}))
        new = _worker(prefix="new", n=2, session="h:2", status=SourceStatus.INITIALIZING, at=T0 + 1)
        store.publish(SRC_A, "w1", ID_A, new)
        assert store.get(SRC_A, "w1").worker == new

    def test_publish_keeps_other_workers(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(rank=0, prefix="one"))
        store.publish(SRC_A, "w2", ID_A, _worker(rank=1, prefix="two"))
        store.publish(SRC_A, "w1", ID_A, _worker(rank=0, prefix="uno"))
        assert store.get(SRC_A, "w2").worker.tensors[0].name == "two.0"

    # --- update_status ------------------------------------------------------------------------------

    def test_update_status_by_worker_id(self, store):
        worker = _worker(rank=1, status=SourceStatus.INITIALIZING, at=T0)
        store.publish(SRC_A, "w1", ID_A, worker)
        store.publish(SRC_A, "w2", ID_A, _worker(rank=1, status=SourceStatus.INITIALIZING, at=T0))
        assert store.update_status(SRC_A, "w1", 1, SourceStatus.READY, T0 + 10) == 1
        got = store.get(SRC_A, "w1").worker
        assert got == dataclasses.replace(worker, status=SourceStatus.READY, updated_at_ms=T0 + 10)
        other = store.get(SRC_A, "w2").worker
        assert (other.status, other.updated_at_ms) == (SourceStatus.INITIALIZING, T0)

    def test_update_status_rank_mismatch_changes_nothing(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(rank=1, status=SourceStatus.INITIALIZING))
        assert store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 10) == 0
        got = store.get(SRC_A, "w1").worker
        assert (got.status, got.updated_at_ms) == (SourceStatus.INITIALIZING, T0)

    def test_update_status_with_an_empty_worker_id_changes_nothing(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(rank=0, status=SourceStatus.INITIALIZING))
        assert store.update_status(SRC_A, "", 0, SourceStatus.READY, T0 + 1) == 0
        assert store.get(SRC_A, "w1").worker.status == SourceStatus.INITIALIZING

    def test_update_status_never_creates(self, store):
        assert store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0) == 0
        assert store.update_status(SRC_A, "", 0, SourceStatus.READY, T0) == 0
        store.publish(SRC_A, "w1", ID_A, _worker(rank=0))
        assert store.update_status(SRC_A, "w9", 0, SourceStatus.READY, T0) == 0
        assert store.update_status(SRC_B, "w1", 0, SourceStatus.READY, T0) == 0
        assert store.get(SRC_A, "w9") is None and store.get(SRC_B, "w1") is None
        assert [r.worker_id for r in store.list(SourceQuery())] == ["w1"]

    def test_update_status_keeps_tensors_and_session(self, store):
        worker = _worker(rank=0, prefix="keep", n=50, session="10.0.0.1:7")
        store.publish(SRC_A, "w1", ID_A, worker)
        store.update_status(SRC_A, "w1", 0, SourceStatus.STALE, T0 + 1)
        got = store.get(SRC_A, "w1")
        assert got.worker.tensors == worker.tensors
        assert got.worker.transfer_engine_session_id == "10.0.0.1:7"
        assert got.identity == ID_A

    def test_update_status_records_source_load(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(rank=0))
        store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 1, source_load=0.25)
        [ref] = store.list(SourceQuery(mx_source_id=SRC_A))
        assert ref.source_load == pytest.approx(0.25)

    # --- progress: verified bytes (pipelined cascade) ------------------------------------------------

    def test_verified_bytes_are_listed_over_the_records_topology(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(status=SourceStatus.INITIALIZING,
                                                  topology={"node": "n1", TOPOLOGY_VERIFIED_BYTES: "5"}))
        [ref] = store.list(SourceQuery(mx_source_id=SRC_A))
        assert dict(ref.topology) == {"node": "n1", TOPOLOGY_VERIFIED_BYTES: "5"}  # its own, as published
        assert store.update_status(SRC_A, "w1", 0, SourceStatus.INITIALIZING, T0 + 1, verified_bytes=1234) == 1
        [ref] = store.list(SourceQuery(mx_source_id=SRC_A))
        assert dict(ref.topology) == {"node": "n1", TOPOLOGY_VERIFIED_BYTES: "1234"}
        assert (ref.status, ref.updated_at_ms) == (SourceStatus.INITIALIZING, T0 + 1)
        assert store.get_bytes(SRC_A, "w1").verified_bytes == 1234
        assert store.get(SRC_A, "w1").worker.topology[TOPOLOGY_VERIFIED_BYTES] == "1234"

    def test_verified_bytes_never_rewrite_the_stored_bytes(self, store):
        record = _encoded("w1", worker_bytes=b"\x08\x05opaque", status=SourceStatus.INITIALIZING)
        store.put(record)
        store.update_status(SRC_A, "w1", 0, SourceStatus.INITIALIZING, T0 + 1, verified_bytes=2**40)
        got = store.get_bytes(SRC_A, "w1")
        assert got == WorkerBytes(record.identity_bytes, record.worker_bytes, SourceStatus.INITIALIZING, T0 + 1,
                                  verified_bytes=2**40)

    def test_verified_bytes_are_framed_in_get_metadata_answers(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(status=SourceStatus.INITIALIZING, topology={"node": "n1"}))
        store.update_status(SRC_A, "w1", 0, SourceStatus.INITIALIZING, T0 + 1, verified_bytes=768)
        answer = wire.messages.GetMetadataResponse.FromString(
            get_response_bytes(store.get_bytes(SRC_A, "w1"), mx_source_id=SRC_A, worker_id="w1"))
        assert dict(answer.worker.topology) == {"node": "n1", TOPOLOGY_VERIFIED_BYTES: "768"}
        assert (answer.worker.status, answer.worker.updated_at) == (SourceStatus.INITIALIZING, T0 + 1)

    def test_a_republish_resets_verified_bytes(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(status=SourceStatus.INITIALIZING))
        store.update_status(SRC_A, "w1", 0, SourceStatus.INITIALIZING, T0 + 1, verified_bytes=100)
        store.publish(SRC_A, "w1", ID_A, _worker(status=SourceStatus.READY, at=T0 + 2))
        [ref] = store.list(SourceQuery(mx_source_id=SRC_A))
        assert TOPOLOGY_VERIFIED_BYTES not in ref.topology
        assert store.get_bytes(SRC_A, "w1").verified_bytes is None

    def test_plain_heartbeats_keep_verified_bytes(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(status=SourceStatus.INITIALIZING))
        store.update_status(SRC_A, "w1", 0, SourceStatus.INITIALIZING, T0 + 1, verified_bytes=100)
        store.update_status(SRC_A, "w1", 0, SourceStatus.INITIALIZING, T0 + 2)
        store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 3, source_load=0.5)
        [ref] = store.list(SourceQuery(mx_source_id=SRC_A))
        assert (ref.topology[TOPOLOGY_VERIFIED_BYTES], ref.status, ref.updated_at_ms) == ("100", SourceStatus.READY,
                                                                                          T0 + 3)
        assert store.get_bytes(SRC_A, "w1").verified_bytes == 100

    # --- what watches read: states and change listeners ----------------------------------------------

    def test_states_are_the_listed_refs_with_a_generation_new_at_every_publish(self, store):
        store.publish(SRC_A, "w1", ID_A, _worker(rank=1, topology={"wid": "w1"}))
        store.publish(SRC_A, "w2", ID_A, _worker(rank=2))
        store.publish(SRC_B, "b1", ID_B, _worker())
        store.update_status(SRC_A, "w1", 1, SourceStatus.INITIALIZING, T0 + 1, verified_bytes=7)
        states = store.states(SRC_A)
        assert sorted(states) == ["w1", "w2"]
        assert [states[r.worker_id].ref for r in store.list(SourceQuery(mx_source_id=SRC_A))] == \
            store.list(SourceQuery(mx_source_id=SRC_A))
        assert sorted(store.states(SRC_A, ["w2", "gone", "w2"])) == ["w2"]
        before = states["w1"].generation
        store.update_status(SRC_A, "w1", 1, SourceStatus.READY, T0 + 2)
        assert store.states(SRC_A, ["w1"])["w1"].generation == before  # an update: the same bytes
        store.publish(SRC_A, "w1", ID_A, _worker(rank=1, topology={"wid": "w1"}))
        assert store.states(SRC_A, ["w1"])["w1"].generation != before
        assert store.states("cccccccccccccccc") == {}

    @pytest.fixture
    def listener(self, store):
        """A listener subscribed to `store`, told of the writes made after the fixture returns."""
        listener = RecordingListener()
        store.subscribe(listener)
        store.put(_encoded("probe", source=MARKER))
        listener.wait_for((MARKER, "probe"))
        yield listener
        store.unsubscribe(listener)

    def _told_before_marker(self, store, listener, name: str) -> list[tuple[str, str]]:
        """What the listener was told of up to a marker written now (so that what was not told shows)."""
        store.put(_encoded(name, source=MARKER))
        return listener.wait_for((MARKER, name))[:-1]

    def test_listeners_are_told_of_publishes_and_changes(self, store, listener):
        store.put(_encoded("w1", status=SourceStatus.INITIALIZING))
        assert self._told_before_marker(store, listener, "m1") == [(SRC_A, "w1")]
        for change in (dict(status=SourceStatus.READY), dict(status=SourceStatus.READY, source_load=1.0),
                       dict(status=SourceStatus.READY, verified_bytes=10)):
            store.update_status(SRC_A, "w1", 0, now_ms=T0 + 1, **change)
            assert self._told_before_marker(store, listener, f"m{change}") == [(SRC_A, "w1")], change

    def test_listeners_are_not_told_of_plain_heartbeats(self, store, listener):
        store.put(_encoded("w1"))
        store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 1, source_load=1.0, verified_bytes=5)
        self._told_before_marker(store, listener, "m0")
        for i in range(3):  # the same status, load and progress again: only updated_at changes
            store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 2 + i, source_load=1.0, verified_bytes=5)
            store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 2 + i)
        store.update_status(SRC_A, "nope", 0, SourceStatus.STALE, T0 + 9)  # no such record: no change
        assert self._told_before_marker(store, listener, "m1") == []

    def test_listeners_are_told_of_what_the_reaper_marks_and_deletes(self, store, listener):
        store.put(_encoded("silent", at=T0 - HB - 1))
        store.put(_encoded("old", status=SourceStatus.STALE, at=T0 - GC - 1))
        store.put(_encoded("fresh", at=T0))
        self._told_before_marker(store, listener, "m0")
        store.reap(T0, HB, GC)
        assert sorted(self._told_before_marker(store, listener, "m1")) == [(SRC_A, "old"), (SRC_A, "silent")]
        store.reap(T0, HB, GC)  # nothing left to do: nothing told
        assert self._told_before_marker(store, listener, "m2") == []

    def test_an_unsubscribed_listener_is_told_nothing(self, store, listener):
        other = RecordingListener()
        store.subscribe(other)
        store.put(_encoded("probe2", source=MARKER))
        other.wait_for((MARKER, "probe2"))
        store.unsubscribe(listener)
        store.put(_encoded("after"))
        store.put(_encoded("m", source=MARKER))
        assert other.wait_for((MARKER, "m")) == [(SRC_A, "after"), (MARKER, "m")]
        assert listener.told == [(MARKER, "probe2")]
        store.unsubscribe(other)

    # --- stored bytes, owners, capacity ----------------------------------------------------------------

    def test_heartbeat_cost_is_flat_in_the_tensor_count(self, store):
        """A heartbeat sets small fields only: the same cost for a 10 MB record as for a tiny one."""
        big = _encoded("big", worker_bytes=bytes(range(256)) * 40_000)  # 10 MB, as 100,000 tensors take
        small = _encoded("small", worker_bytes=b"\x08\x00")
        store.put(big)
        store.put(small)

        def median_beat_s(worker_id: str) -> float:
            times = []
            for i in range(41):
                start = time.perf_counter()
                assert store.update_status(SRC_A, worker_id, 0, SourceStatus.READY, T0 + i, owner="") == 1
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        median_beat_s("small")  # warm up (Redis: the script's first load)
        small_s, big_s = min(median_beat_s("small") for _ in range(3)), min(median_beat_s("big") for _ in range(3))
        assert big_s < 3 * small_s + 0.0005, f"heartbeat of a 10 MB record {big_s * 1e6:.0f} us, small " \
                                             f"{small_s * 1e6:.0f} us"
        got = store.get_bytes(SRC_A, "big")
        assert got.worker_bytes == big.worker_bytes and got.identity_bytes == big.identity_bytes
        assert (got.status, got.updated_at_ms) == (SourceStatus.READY, T0 + 40)

    def test_get_bytes_serves_what_was_put_with_the_current_status(self, store):
        record = _encoded("w1", worker_bytes=b"\x08\x05opaque", status=SourceStatus.INITIALIZING)
        store.put(record)
        store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 7)
        got = store.get_bytes(SRC_A, "w1")
        assert got == WorkerBytes(record.identity_bytes, record.worker_bytes, SourceStatus.READY, T0 + 7)
        assert store.get_bytes(SRC_A, "nope") is None

    def test_only_the_owner_may_replace_or_update_a_record(self, store):
        store.put(_encoded("w1", owner="alice", worker_bytes=b"\x08\x00alice"))
        with pytest.raises(NotOwnerError, match="'w1' of source aaaaaaaaaaaaaaaa was published by another writer"):
            store.put(_encoded("w1", owner="mallory", worker_bytes=b"\x08\x00mallory"))
        with pytest.raises(NotOwnerError):
            store.update_status(SRC_A, "w1", 0, SourceStatus.STALE, T0 + 1, owner="mallory")
        got = store.get_bytes(SRC_A, "w1")
        assert (got.worker_bytes, got.status, got.updated_at_ms) == (b"\x08\x00alice", SourceStatus.READY, T0)
        assert store.update_status(SRC_A, "w1", 0, SourceStatus.STALE, T0 + 2, owner="alice") == 1
        assert store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 3) == 1  # no owner given: no check
        store.put(_encoded("w1", owner="alice", worker_bytes=b"\x08\x00again"))
        assert store.get_bytes(SRC_A, "w1").worker_bytes == b"\x08\x00again"

    def test_a_record_without_owner_may_be_claimed(self, store):
        store.put(_encoded("w1", owner=""))
        assert store.update_status(SRC_A, "w1", 0, SourceStatus.READY, T0 + 1, owner="bob") == 1
        store.put(_encoded("w1", owner="bob", worker_bytes=b"\x08\x00bob"))
        with pytest.raises(NotOwnerError):
            store.put(_encoded("w1", owner=""))

    def test_capacity_limits_refuse_new_records_only(self, store):
        capacity = Capacity(max_workers_per_source=2, max_sources=2)
        store.put(_encoded("a0"), capacity)
        store.put(_encoded("a1"), capacity)
        with pytest.raises(CapacityError, match="max-workers-per-source 2"):
            store.put(_encoded("a2"), capacity)
        store.put(_encoded("a1", worker_bytes=b"\x08\x00new"), capacity)  # a replacement is not a new record
        store.put(_encoded("b0", source=SRC_B), capacity)
        with pytest.raises(CapacityError, match="max-sources 2"):
            store.put(_encoded("c0", source="cccccccccccccccc"), capacity)
        assert sorted(r.worker_id for r in store.list(SourceQuery())) == ["a0", "a1", "b0"]
        assert store.get_bytes(SRC_A, "a1").worker_bytes == b"\x08\x00new"

    # --- per-principal quotas ------------------------------------------------------------------------

    def test_records_quota_is_per_principal(self, store):
        capacity = Capacity(max_records_per_principal=2)
        store.put(_encoded("a0", owner="alice"), capacity)
        store.put(_encoded("a1", owner="alice", source=SRC_B), capacity)
        with pytest.raises(QuotaError, match=r"^writer 'alice' holds 2 records; 1 more would pass the limit of 2 per "
                                             r"writer \(raise it with --max-records-per-principal\)$"):
            store.put(_encoded("a2", owner="alice"), capacity)
        store.put(_encoded("a1", owner="alice", source=SRC_B, worker_bytes=b"\x08\x00new"), capacity)  # replacing
        store.put(_encoded("b0", owner="bob"), capacity)
        store.put(_encoded("b1", owner="bob"), capacity)
        with pytest.raises(QuotaError, match="writer 'bob' holds 2 records"):
            store.put(_encoded("b2", owner="bob"), capacity)
        assert sorted(r.worker_id for r in store.list(SourceQuery())) == ["a0", "a1", "b0", "b1"]
        assert store.get_bytes(SRC_B, "a1").worker_bytes == b"\x08\x00new"

    def test_bytes_quota_counts_what_a_principal_stores(self, store):
        capacity = Capacity(max_bytes_per_principal=250)
        store.put(_sized("a0", 100, owner="alice"), capacity)
        store.put(_sized("a1", 100, owner="alice"), capacity)
        with pytest.raises(QuotaError, match=r"^writer 'alice' holds 200 bytes of records; 100 more would pass the "
                                             r"limit of 250 per writer \(raise it with --max-mb-per-principal\)$"):
            store.put(_sized("a2", 100, owner="alice"), capacity)
        with pytest.raises(QuotaError, match="holds 200 bytes of records; 60 more"):  # growing a record counts
            store.put(_sized("a1", 160, owner="alice"), capacity)
        assert store.get_bytes(SRC_A, "a1").worker_bytes == _sized("a1", 100).worker_bytes
        store.put(_sized("a1", 150, owner="alice"), capacity)  # 250: at the limit is allowed
        store.put(_sized("a0", 40, owner="alice"), capacity)  # shrinking frees 60 ...
        store.put(_sized("a2", 60, owner="alice"), capacity)  # ... for a new record
        store.put(_sized("b0", 250, owner="bob"), capacity)  # another principal: its own quota
        with pytest.raises(QuotaError, match="^the server's writers \\(no tokens: one shared quota\\) holds 0 bytes"):
            store.put(_sized("anon", 251), capacity)

    def test_a_publish_that_does_not_grow_passes_a_lowered_quota(self, store):
        store.put(_sized("a0", 100, owner="alice"))
        store.put(_sized("a1", 100, owner="alice"))
        lowered = Capacity(max_records_per_principal=1, max_bytes_per_principal=50)
        store.put(_sized("a1", 100, owner="alice", status=SourceStatus.INITIALIZING), lowered)  # a seed's restart
        with pytest.raises(QuotaError, match="holds 2 records"):
            store.put(_sized("a2", 10, owner="alice"), lowered)

    def test_reaped_and_claimed_records_move_out_of_a_principals_quota(self, store):
        capacity = Capacity(max_records_per_principal=1, max_bytes_per_principal=100)
        store.put(_sized("old", 100, owner="alice", status=SourceStatus.STALE, at=T0 - GC - 1), capacity)
        with pytest.raises(QuotaError, match="writer 'alice' holds 1 records"):
            store.put(_sized("new", 100, owner="alice"), capacity)
        assert store.reap(T0, HB, GC) == ReapStats(marked_stale=0, deleted=1)
        store.put(_sized("new", 100, owner="alice"), capacity)
        # a record published without a token counts for "" until a writer claims it
        store.put(_sized("shared", 100), capacity)
        with pytest.raises(QuotaError, match="no tokens: one shared quota\\) holds 1 records"):
            store.put(_sized("shared2", 100), capacity)
        store.put(_sized("shared", 100, owner="bob"), capacity)
        store.put(_sized("shared2", 100), capacity)  # "" holds none now
        with pytest.raises(QuotaError, match="writer 'bob' holds 1 records"):
            store.put(_sized("bob2", 10, owner="bob"), capacity)

    # --- list ---------------------------------------------------------------------------------------

    @pytest.fixture
    def populated(self, store):
        rows = [  # (source, worker_id, identity, rank, status, updated_at)
            (SRC_A, "a0", ID_A, 0, SourceStatus.READY, T0 + 50),
            (SRC_A, "a1", ID_A, 1, SourceStatus.READY, T0 + 40),
            (SRC_A, "a2", ID_A, 0, SourceStatus.INITIALIZING, T0 + 30),
            (SRC_B, "b0", ID_B, 0, SourceStatus.READY, T0 + 60),
            (SRC_B, "b1", ID_B, 1, SourceStatus.STALE, T0 + 10),
        ]
        for source, wid, identity, rank, status, at in rows:
            store.publish(source, wid, identity, _worker(rank=rank, status=status, at=at, accelerator=f"acc-{wid}",
                                                          topology={"wid": wid}))
        return store

    @staticmethod
    def _ids(refs) -> list[str]:
        return [r.worker_id for r in refs]

    def test_list_everything_newest_first(self, populated):
        assert self._ids(populated.list(SourceQuery())) == ["b0", "a0", "a1", "a2", "b1"]

    def test_list_ref_fields(self, populated):
        [ref] = [r for r in populated.list(SourceQuery()) if r.worker_id == "a1"]
        assert (ref.mx_source_id, ref.model_name, ref.worker_rank, ref.status, ref.updated_at_ms, ref.accelerator,
                dict(ref.topology)) == (SRC_A, "org/model-a", 1, SourceStatus.READY, T0 + 40, "acc-a1", {"wid": "a1"})

    def test_list_by_source(self, populated):
        assert self._ids(populated.list(SourceQuery(mx_source_id=SRC_A))) == ["a0", "a1", "a2"]
        assert populated.list(SourceQuery(mx_source_id="cccccccccccccccc")) == []

    def test_list_by_status(self, populated):
        assert self._ids(populated.list(SourceQuery(status=SourceStatus.READY))) == ["b0", "a0", "a1"]
        assert self._ids(populated.list(SourceQuery(status=SourceStatus.STALE))) == ["b1"]
        assert populated.list(SourceQuery(status=SourceStatus.UNKNOWN)) == []

    def test_list_by_model_name(self, populated):
        assert self._ids(populated.list(SourceQuery(model_name="org/model-b"))) == ["b0", "b1"]
        assert populated.list(SourceQuery(model_name="org/other")) == []

    def test_list_by_worker_rank(self, populated):
        assert self._ids(populated.list(SourceQuery(worker_rank=1))) == ["a1", "b1"]
        assert self._ids(populated.list(SourceQuery(mx_source_id=SRC_A, worker_rank=0))) == ["a0", "a2"]

    def test_list_min_updated_at_is_inclusive(self, populated):
        assert self._ids(populated.list(SourceQuery(min_updated_at_ms=T0 + 40))) == ["b0", "a0", "a1"]

    def test_list_limit_applies_after_sorting(self, populated):
        assert self._ids(populated.list(SourceQuery(limit=2))) == ["b0", "a0"]
        assert self._ids(populated.list(SourceQuery(status=SourceStatus.READY, mx_source_id=SRC_A, limit=1))) == ["a0"]
        assert populated.list(SourceQuery(limit=0)) == []

    def test_list_sees_status_updates(self, populated):
        populated.update_status(SRC_A, "a2", 0, SourceStatus.READY, T0 + 100)
        assert self._ids(populated.list(SourceQuery(status=SourceStatus.READY)))[0] == "a2"

    def test_list_on_empty_store(self, store):
        assert store.list(SourceQuery()) == []

    def test_list_by_model_name_reads_that_models_records_only(self, store):
        """The model index: a listing by model never touches another model's records (here poisoned,
        so that reading one fails), however many there are."""
        for i in range(3):
            source = f"{i:016x}"
            for w in range(20):
                store.put(_encoded(f"crowd{w}", source=source, model="org/crowd"))
                self.poison(store, source, f"crowd{w}")
            store.put(_encoded(f"lone{i}", source=source, model="org/lone", at=T0 + i))
        assert self._ids(store.list(SourceQuery(model_name="org/lone"))) == ["lone2", "lone1", "lone0"]
        assert self._ids(store.list(SourceQuery(model_name="org/lone", min_updated_at_ms=T0 + 1, limit=1))) == ["lone2"]
        assert store.list(SourceQuery(model_name="org/none")) == []

    def test_the_model_index_follows_republishes_and_reaps(self, store):
        store.put(_encoded("w0", model="org/first"))
        store.put(_encoded("w1", model="org/first", status=SourceStatus.STALE, at=T0 - GC - 1))
        store.put(_encoded("w0", model="org/second", at=T0 + 1))  # the same worker, now another model
        assert self._ids(store.list(SourceQuery(model_name="org/first"))) == ["w1"]
        assert self._ids(store.list(SourceQuery(model_name="org/second"))) == ["w0"]
        assert store.reap(T0, HB, GC) == ReapStats(marked_stale=0, deleted=1)
        assert store.list(SourceQuery(model_name="org/first")) == []
        store.put(_encoded("w1", model="org/first"))
        assert self._ids(store.list(SourceQuery(model_name="org/first"))) == ["w1"]

    # --- reap ---------------------------------------------------------------------------------------

    @pytest.mark.parametrize("status", [SourceStatus.UNKNOWN, SourceStatus.INITIALIZING, SourceStatus.READY])
    def test_reap_marks_silent_records_stale(self, store, status):
        old = T0 - HB - 1
        store.publish(SRC_A, "old", ID_A, _worker(status=status, at=old))
        store.publish(SRC_A, "edge", ID_A, _worker(status=status, at=T0 - HB))  # exactly at the limit: kept
        store.publish(SRC_A, "fresh", ID_A, _worker(status=status, at=T0))
        stats = store.reap(T0, HB, GC)
        assert stats == ReapStats(marked_stale=1, deleted=0)
        got = store.get(SRC_A, "old").worker
        assert (got.status, got.updated_at_ms) == (SourceStatus.STALE, old), "updated_at must not change"
        assert store.get(SRC_A, "edge").worker.status == status
        assert store.get(SRC_A, "fresh").worker.status == status
        assert store.get(SRC_A, "old").worker.tensors == _tensors("t", 3)

    def test_reap_deletes_old_stale_records(self, store):
        store.publish(SRC_A, "gone", ID_A, _worker(status=SourceStatus.STALE, at=T0 - GC - 1))
        store.publish(SRC_A, "kept", ID_A, _worker(status=SourceStatus.STALE, at=T0 - GC))
        store.publish(SRC_B, "gone2", ID_B, _worker(status=SourceStatus.STALE, at=T0 - GC - 5))
        stats = store.reap(T0, HB, GC)
        assert stats == ReapStats(marked_stale=0, deleted=2)
        assert store.get(SRC_A, "gone") is None and store.get(SRC_B, "gone2") is None
        assert store.get(SRC_A, "kept").worker.status == SourceStatus.STALE
        assert self._ids(store.list(SourceQuery())) == ["kept"]
        assert store.list(SourceQuery(mx_source_id=SRC_B)) == []

    def test_reap_removes_a_long_silent_ready_record_within_two_passes(self, store):
        store.publish(SRC_A, "w", ID_A, _worker(status=SourceStatus.READY, at=T0 - GC - 1))
        store.reap(T0, HB, GC)
        store.reap(T0, HB, GC)
        assert store.get(SRC_A, "w") is None

    def test_reap_leaves_fresh_records_alone(self, store):
        for i, status in enumerate(SourceStatus):
            store.publish(SRC_A, f"w{i}", ID_A, _worker(rank=i, status=status, at=T0 - 1))
        before = store.list(SourceQuery())
        assert store.reap(T0, HB, GC) == ReapStats(0, 0)
        assert store.list(SourceQuery()) == before

    def test_reap_twice_is_idempotent(self, store):
        store.publish(SRC_A, "a", ID_A, _worker(status=SourceStatus.READY, at=T0 - HB - 1))
        store.publish(SRC_A, "b", ID_A, _worker(status=SourceStatus.STALE, at=T0 - GC - 1))
        store.publish(SRC_A, "c", ID_A, _worker(status=SourceStatus.READY, at=T0))
        first = store.reap(T0, HB, GC)
        after_first = store.list(SourceQuery())
        assert first == ReapStats(marked_stale=1, deleted=1)
        assert store.reap(T0, HB, GC) == ReapStats(0, 0)
        assert store.list(SourceQuery()) == after_first

    def test_heartbeat_after_stale_revives(self, store):
        store.publish(SRC_A, "w", ID_A, _worker(status=SourceStatus.READY, at=T0 - HB - 1))
        store.reap(T0, HB, GC)
        assert store.update_status(SRC_A, "w", 0, SourceStatus.READY, T0) == 1
        assert store.reap(T0, HB, GC) == ReapStats(0, 0)
        assert store.get(SRC_A, "w").worker.status == SourceStatus.READY

    # --- concurrency --------------------------------------------------------------------------------

    def test_concurrent_publish_and_read_never_mix_records(self, store):
        version_a = _worker(rank=0, prefix="alpha", n=40, session="10.0.0.1:1111", accelerator="A")
        version_b = _worker(rank=0, prefix="beta", n=7, session="10.0.0.2:2222", accelerator="B")
        expected = {v.transfer_engine_session_id: v for v in (version_a, version_b)}
        store.publish(SRC_A, "w", ID_A, version_a)
        writes, reads_per_reader = 300, 300
        errors: list[str] = []
        start = threading.Barrier(5)

        def writer(first: WorkerRecord, second: WorkerRecord) -> None:
            start.wait()
            for i in range(writes):
                store.publish(SRC_A, "w", ID_A, first if i % 2 else second)

        def heartbeater() -> None:
            start.wait()
            for i in range(writes):
                store.update_status(SRC_A, "w", 0, SourceStatus.READY, T0 + i)

        def reader() -> None:
            start.wait()
            for _ in range(reads_per_reader):
                got = store.get(SRC_A, "w")
                if got is None:
                    errors.append("record vanished")
                    return
                want = expected.get(got.worker.transfer_engine_session_id)
                if want is None or got.worker.tensors != want.tensors or got.worker.accelerator != want.accelerator:
                    errors.append(f"mixed record: session {got.worker.transfer_engine_session_id} with "
                                  f"{len(got.worker.tensors)} tensors ({got.worker.tensors[:1]})")
                    return

        threads = [threading.Thread(target=writer, args=(version_a, version_b)),
                   threading.Thread(target=writer, args=(version_b, version_a)),
                   threading.Thread(target=heartbeater),
                   threading.Thread(target=reader), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not errors, errors[0]
        final = store.get(SRC_A, "w").worker
        assert final.tensors in (version_a.tensors, version_b.tensors)


class _Poisoned:
    def __getattr__(self, name):
        raise AssertionError(f"read {name} of a poisoned record")


class TestMemoryStore(StoreContract):
    def make_store(self) -> SourceStore:
        return MemoryStore()

    def poison(self, store, mx_source_id, worker_id):
        store._sources[mx_source_id][worker_id] = _Poisoned()


class TestRedisStore(StoreContract):
    """The same contract against a real redis-server (each test under a fresh key prefix)."""

    @pytest.fixture(autouse=True)
    def _redis(self, redis_server, redis_prefix):
        self.redis_url, self.redis_prefix = redis_server.url, redis_prefix

    def make_store(self) -> SourceStore:
        from sglang_mx.server.redis_store import RedisStore

        return RedisStore(self.redis_url, prefix=self.redis_prefix, record_ttl_s=3600)

    def poison(self, store, mx_source_id, worker_id):
        """A string where the record's hash was: Redis refuses HMGET on it, failing the whole call."""
        import redis

        key = store._record_key(mx_source_id, worker_id)
        with redis.Redis.from_url(self.redis_url) as r:
            r.delete(key)
            r.set(key, b"poison")
