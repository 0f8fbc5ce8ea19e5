"""pull_weights with several seeds: striping, re-reading only what failed, busy seeds (fakes, fake clock).

FakeClient and FakeEngine are stand-ins named as such; real processes are in
tests/target/test_striped.py and tests/test_fleet_scaleout.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from sglang_mx.errors import NoSourceError, TransferError
from sglang_mx.identity import mx_source_id
from sglang_mx.records import (TOPOLOGY_LEASES, SourceIdentity, SourceRef, SourceStatus, StoredWorker,
                               TensorDescriptor, WorkerRecord)
from sglang_mx.target import PullOptions, pull_weights
from tests.fakes import FakeClock

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1)
MB = 1 << 20
# Three 2 MiB tensors back to back: 6 MiB, so up to six 1 MiB stripes.
LOCAL = [TensorDescriptor(name=f"w{i}", addr=0x10_0000_0000 + i * 2 * MB, size=2 * MB, digest="") for i in range(3)]


def fake_digest(name: str) -> str:
    """A well-formed digest per tensor name (the fake verifier decides what matches)."""
    return f"xxh3-64:{int(name[1:]):016x}"


class FakeClient:
    """Every listed worker publishes the same layout at its own base address, with digests."""

    url = "fake:1"

    def __init__(self, workers: list[str], loads: dict[str, float] | None = None,
                 digests: dict[str, str] | None = None) -> None:
        self.workers = workers
        self.loads = loads or {}
        self.digests = digests or {}  # worker -> the digest it publishes for every tensor instead

    def list_sources(self, identity, *, status, worker_rank):
        return [SourceRef(mx_source_id=mx_source_id(IDENTITY), worker_id=w, model_name="test/model", worker_rank=0,
                          status=SourceStatus.READY, updated_at_ms=1, source_load=self.loads.get(w))
                for w in self.workers]

    def get_metadata(self, mx_source_id, worker_id):
        base = 0x70_0000_0000 + 0x1_0000_0000 * self.workers.index(worker_id)
        tensors = tuple(TensorDescriptor(name=t.name, addr=base + (t.addr - LOCAL[0].addr), size=t.size,
                                         digest=self.digests.get(worker_id, fake_digest(t.name))) for t in LOCAL)
        record = WorkerRecord(worker_rank=0, transfer_engine_session_id=f"{worker_id}:1", tensors=tensors,
                              worker_grpc_endpoint=f"{worker_id}:2")
        return StoredWorker(mx_source_id=mx_source_id, worker_id=worker_id, identity=IDENTITY, worker=record)


class FakeEngine:
    """Records the bytes read per session; sessions in `failing` fail their reads."""

    def __init__(self, failing=()) -> None:
        self.failing = set(failing)
        self.bytes: dict[str, int] = {}

    def register(self, ranges):
        return [("region",)]

    def unregister(self, regions):
        self.unregistered = getattr(self, "unregistered", 0) + 1

    def read(self, session, reads, **callbacks):  # prepare/on_done are the real engine's business
        self.bytes[session] = self.bytes.get(session, 0) + sum(r.length for r in reads)
        if session in self.failing:
            raise TransferError("batch_transfer_sync_read failed", seed=session, code=-1)


def pull(client, engine, clock, verifier=None, **options):
    options = {"wait_timeout_s": 5, "poll_interval_s": 1.0, "spread": False, **options}
    return pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=LOCAL, options=PullOptions(**options),
                        clock=clock, sleep=clock.sleep, verifier=verifier)


def test_three_seeds_serve_a_third_each(fake_leases):
    engine = FakeEngine()
    report = pull(FakeClient(["a", "b", "c"]), engine, FakeClock(), max_seeds=3)
    assert engine.bytes == {"a:1": 2 * MB, "b:1": 2 * MB, "c:1": 2 * MB}
    assert report.served == {"a": 2 * MB, "b": 2 * MB, "c": 2 * MB} and report.rounds == 1
    assert sorted(fake_leases.granted) == sorted(fake_leases.released) == ["a", "b", "c"]


def test_a_failed_stripe_is_read_again_from_the_others_only(fake_leases):
    engine = FakeEngine(failing={"b:1"})
    report = pull(FakeClient(["a", "b", "c"]), engine, FakeClock(), max_seeds=3)
    assert report.rounds == 2 and [f.seed for f in report.failures] == ["worker b (rank 0)"]
    # Round 2 cut b's 2 MiB over a and c: 1 MiB each, nothing else again.
    assert engine.bytes == {"a:1": 3 * MB, "b:1": 2 * MB, "c:1": 3 * MB}
    assert report.served == {"a": 3 * MB, "c": 3 * MB}
    assert sorted(fake_leases.released) == ["a", "b", "c"]


def test_a_tensor_failing_its_digest_blames_its_seed_and_is_read_again(fake_leases):
    engine = FakeEngine()
    wrong_once = {"w2"}

    def verifier(expected):
        assert expected == {n: fake_digest(n) for n in expected}
        bad = [n for n in expected if n in wrong_once]
        wrong_once.clear()
        return bad

    report = pull(FakeClient(["a", "b", "c"]), engine, FakeClock(), verifier=verifier, max_seeds=3,
                  verify="require")
    assert [f.seed for f in report.failures] == ["worker c (rank 0)"] and "w2" in report.failures[0].reason
    assert report.served == {"a": 3 * MB, "b": 3 * MB}
    assert report.verified == 3


def test_least_loaded_seeds_are_taken_first(fake_leases):
    engine = FakeEngine()
    pull(FakeClient(["a", "b", "c"], loads={"a": 4.0, "b": 0.0, "c": 1.0}), engine, FakeClock(), max_seeds=2)
    assert set(engine.bytes) == {"b:1", "c:1"}


def test_busy_seeds_are_skipped_and_waited_for(fake_leases):
    fake_leases.busy = {"a"}
    clock = FakeClock()
    report = pull(FakeClient(["a", "b"]), FakeEngine(), clock)
    assert report.served == {"b": 6 * MB} and clock.sleeps == []
    fake_leases.busy = {"a", "b"}
    with pytest.raises(NoSourceError, match=r"within 2 s \(the READY seeds were all at max_readers\)"):
        pull(FakeClient(["a", "b"]), FakeEngine(), clock, wait_timeout_s=2)
    assert clock.sleeps == [1.0, 1.0]


def test_a_seed_found_busy_is_asked_for_its_lease_before_its_record_is_fetched_again(fake_leases):
    """Waiting among many, a target asks the busy seed (its lease endpoint), not the metadata server."""
    fetched: list[str] = []

    class Counting(FakeClient):
        def get_metadata(self, mx_source_id, worker_id):
            fetched.append(worker_id)
            return super().get_metadata(mx_source_id, worker_id)

    fake_leases.busy = {"a"}
    clock = FakeClock()
    asked_while_busy = []

    def sleep(seconds):  # the seed frees a slot after the target's third wait
        clock.sleep(seconds)
        asked_while_busy.append(len(fetched))
        if len(clock.sleeps) == 3:
            fake_leases.busy = set()

    report = pull_weights(Counting(["a"]), FakeEngine(), IDENTITY, worker_rank=0, tensors=LOCAL,
                          options=PullOptions(wait_timeout_s=10, poll_interval_s=1.0, spread=False, watch=False),
                          clock=clock, sleep=sleep)
    assert report.served == {"a": 6 * MB}
    assert asked_while_busy == [1, 1, 1]  # refused three more times without a GetMetadata
    assert fetched == ["a", "a"]  # once to learn where to ask, once (checked afresh) when it granted
    assert fake_leases.granted == ["a"] and fake_leases.released == ["a"]


def test_a_seed_listing_its_lease_endpoint_is_fetched_only_once_it_grants(fake_leases):
    fetched: list[str] = []

    class Listing(FakeClient):
        def list_sources(self, identity, *, status, worker_rank):
            return [dataclasses.replace(r, topology={TOPOLOGY_LEASES: f"{r.worker_id}:2"})
                    for r in super().list_sources(identity, status=status, worker_rank=worker_rank)]

        def get_metadata(self, mx_source_id, worker_id):
            fetched.append(worker_id)
            return super().get_metadata(mx_source_id, worker_id)

    fake_leases.busy = {"a"}
    clock = FakeClock()

    def sleep(seconds):
        clock.sleep(seconds)
        if len(clock.sleeps) == 2:
            fake_leases.busy = set()

    report = pull_weights(Listing(["a"]), FakeEngine(), IDENTITY, worker_rank=0, tensors=LOCAL,
                          options=PullOptions(wait_timeout_s=10, poll_interval_s=1.0, spread=False, watch=False),
                          clock=clock, sleep=sleep)
    assert report.served == {"a": 6 * MB} and fetched == ["a"]


@pytest.mark.parametrize("digest, why", [
    ("xxh3-128:00112233445566778899aabbccddeeff", "unknown digest algorithm 'xxh3-128'"),
    ("xxh3-64:nothex", "malformed digest"),
])
def test_a_digest_the_target_cannot_check_fails_that_seed_only(fake_leases, digest, why):
    """Checked when the seed becomes a candidate, before any byte moves: never inside a read's callback,
    where one record would abort the whole pull."""
    engine = FakeEngine()
    report = pull(FakeClient(["odd", "a"], digests={"odd": digest}), engine, FakeClock(),
                  verifier=lambda expected: [], verify="require")
    assert [f.seed for f in report.failures] == ["worker odd (rank 0)"] and why in report.failures[0].reason
    assert engine.bytes == {"a:1": 6 * MB} and report.served == {"a": 6 * MB} and report.verified == 3


def test_a_tensor_striped_over_seeds_that_disagree_on_its_digest_is_refused_and_read_again(fake_leases):
    """w1 is cut between the stripes of a and b, which publish different digests for it: neither is
    believed (the bytes may match either), both are refused, and c serves what they left."""
    engine = FakeEngine()
    report = pull(FakeClient(["a", "b", "c"], digests={"b": "xxh3-64:00000000000000ff"}), engine, FakeClock(),
                  verifier=lambda expected: [], max_seeds=2, verify="require")
    assert sorted(f.seed for f in report.failures) == ["worker a (rank 0)", "worker b (rank 0)"]
    assert all("publishes other digests" in f.reason and "w1" in f.reason for f in report.failures)
    assert report.digests["w1"] == fake_digest("w1") and report.served.get("c", 0) >= 2 * MB


def test_a_successful_pull_keeps_its_registration_for_the_seed_and_a_failed_one_lets_go(fake_leases):
    engine = FakeEngine()
    pull(FakeClient(["a"]), engine, FakeClock(), keep_registered=True)
    assert getattr(engine, "unregistered", 0) == 0
    pull(FakeClient(["a"]), engine, FakeClock())
    assert engine.unregistered == 1
    failing = FakeEngine(failing={"a:1"})
    with pytest.raises(NoSourceError):
        pull(FakeClient(["a"]), failing, FakeClock(), keep_registered=True, max_candidates=1)
    assert failing.unregistered == 1


def test_a_record_whose_identity_does_not_hash_to_the_id_asked_for_is_refused(fake_leases):
    """The server answers GetMetadata with the identity it stored: a target checks it is the one it asked for."""

    class LyingClient(FakeClient):
        def get_metadata(self, mx_source_id, worker_id):
            stored = super().get_metadata(mx_source_id, worker_id)
            if worker_id == "liar":
                other = SourceIdentity(model_name="another/model", tensor_parallel_size=1)
                return dataclasses.replace(stored, identity=other)
            return stored

    engine = FakeEngine()
    report = pull(LyingClient(["liar", "a"]), engine, FakeClock(), verifier=lambda expected: [])
    [failure] = report.failures
    assert failure.seed == "worker liar (rank 0)" and "an identity that hashes to" in failure.reason
    assert engine.bytes == {"a:1": 6 * MB}
