"""pull_weights' waiting and failover policy with a fake clock (unit test of our logic only).

FakeClient and FakeEngine are stand-ins named as such; the real server,
Mooncake and seed processes are exercised in tests/target/test_pull.py.
"""

from __future__ import annotations

import pytest

from sglang_mx.errors import NoSourceError, TransferError
from sglang_mx.identity import mx_source_id
from sglang_mx.records import SourceIdentity, SourceRef, SourceStatus, StoredWorker, TensorDescriptor, WorkerRecord
from sglang_mx.target import PullOptions, pull_weights
from tests.fakes import FakeClock

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1)
LOCAL = [TensorDescriptor(name="w", addr=0x1000, size=64)]


class FakeClient:
    """Answers ListSources from a script: one list of worker ids per poll (the last one repeats)."""

    url = "fake:1"

    def __init__(self, polls: list[list[str]]) -> None:
        self.polls = polls
        self.listed = 0

    def list_sources(self, identity, *, status, worker_rank):
        assert status == SourceStatus.READY and worker_rank == 0
        workers = self.polls[min(self.listed, len(self.polls) - 1)]
        self.listed += 1
        return [SourceRef(mx_source_id=mx_source_id(IDENTITY), worker_id=w, model_name="test/model", worker_rank=0,
                          status=SourceStatus.READY, updated_at_ms=1) for w in workers]

    def get_metadata(self, mx_source_id, worker_id):
        record = WorkerRecord(worker_rank=0, transfer_engine_session_id=f"{worker_id}:1",
                              tensors=(TensorDescriptor(name="w", addr=0x9000, size=64),))
        return StoredWorker(mx_source_id=mx_source_id, worker_id=worker_id, identity=IDENTITY, worker=record)


class FakeEngine:
    """Records reads; sessions in `failing` fail like a dead seed."""

    def __init__(self, failing=()) -> None:
        self.failing = set(failing)
        self.reads: list[str] = []
        self.registered = 0

    def register(self, ranges):
        self.registered += 1
        return [("region",)]

    def unregister(self, regions):
        self.registered -= 1

    def read(self, session, reads, **callbacks):
        self.reads.append(session)
        if session in self.failing:
            raise TransferError("batch_transfer_sync_read failed", seed=session, code=-1)


def pull(client, engine, clock, **options):
    return pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=LOCAL,
                        options=PullOptions(spread=False, **options), clock=clock, sleep=clock.sleep)


def test_waits_polling_until_a_seed_appears():
    clock, engine = FakeClock(), FakeEngine()
    client = FakeClient([[], [], [], ["late"]])
    report = pull(client, engine, clock, wait_timeout_s=10, poll_interval_s=0.5)
    assert report.seed_worker_id == "late"
    assert clock.sleeps == [0.5, 0.5, 0.5] and client.listed == 4
    assert engine.registered == 0  # our memory is unregistered on every path


def test_gives_up_at_the_wait_timeout_with_the_last_sleep_shortened():
    clock, engine = FakeClock(), FakeEngine()
    with pytest.raises(NoSourceError, match=r"within 2\.2 s"):
        pull(FakeClient([[]]), engine, clock, wait_timeout_s=2.2, poll_interval_s=1.0)
    assert clock.sleeps == pytest.approx([1.0, 1.0, 0.2])
    assert engine.registered == 0


def test_fails_over_to_the_next_candidate_and_reports_the_failure():
    clock, engine = FakeClock(), FakeEngine(failing={"dead:1"})
    report = pull(FakeClient([["dead", "live"]]), engine, clock, wait_timeout_s=5)
    assert engine.reads == ["dead:1", "live:1"]
    assert report.seed_worker_id == "live"
    assert [f.seed for f in report.failures] == ["worker dead (rank 0)"]
    assert clock.sleeps == []


def test_a_failed_candidate_is_never_retried_and_the_cap_ends_the_wait():
    clock, engine = FakeClock(), FakeEngine(failing={"a:1", "b:1"})
    with pytest.raises(NoSourceError, match="all 2 candidate seed") as info:
        pull(FakeClient([["a"], ["a", "b"], ["a", "b", "c"]]), engine, clock, wait_timeout_s=60,
             poll_interval_s=1.0, max_candidates=2)
    assert engine.reads == ["a:1", "b:1"]
    assert len(info.value.attempts) == 2
    assert clock.now == 1.0  # one poll interval: the cap, not the wait, ended it


# --- load_with_fallback: the disk load never sees the dummy model alive --------------------------------

import gc  # noqa: E402
import weakref  # noqa: E402

import torch  # noqa: E402

from sglang_mx.roles import load_with_fallback  # noqa: E402


def test_fallback_frees_the_built_model_before_loading_from_disk():
    built = []

    def build():
        model = torch.nn.Linear(64, 64)
        built.append(weakref.ref(model))
        return model

    def pull(model):
        tensors = dict(model.state_dict())  # a frame holding the tensors, as pull_into's does
        raise NoSourceError(f"no READY seed for {len(tensors)} tensors")

    def from_disk():
        gc.collect()
        assert built[0]() is None, "the dummy model is still alive while the disk load allocates"
        return "from disk"

    assert load_with_fallback(build, pull, from_disk, fall_back=True, what="m") == "from disk"


def test_without_fallback_the_error_propagates_and_disk_is_not_touched():
    def from_disk():
        raise AssertionError("must not load from disk")

    with pytest.raises(NoSourceError, match="no READY seed"):
        load_with_fallback(lambda: object(), lambda m: (_ for _ in ()).throw(NoSourceError("no READY seed")),
                           from_disk, fall_back=False, what="m")


def test_a_successful_pull_returns_the_pulled_model():
    assert load_with_fallback(lambda: "built", lambda m: m + " and pulled", lambda: "disk", fall_back=True,
                              what="m") == "built and pulled"
