"""MooncakeEngine.read against a scripted stand-in for the Mooncake binding (FakeBinding):
pieces, callbacks, and draining every read in flight before an error propagates.

The real binding on loopback is exercised in test_p2p_transfer.py and tests/test_chaos.py.
"""

from __future__ import annotations

import pytest

from sglang_mx.errors import TransferError
from sglang_mx.transfer import engine as engine_module
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.plan import Read


class FakeBinding:
    """Each batch reports in flight for `polls` checks, then its scripted status (1 done by default)."""

    def __init__(self, *, polls: int = 2, fail_local: set[int] = frozenset(), reject_local: set[int] = frozenset()):
        self.polls = polls
        self.fail_local, self.reject_local = fail_local, reject_local
        self.batches: dict[int, list] = {}  # id -> [local, length, polls left, final status]
        self.submitted: list[tuple[int, int]] = []
        self.checks_after_terminal = 0

    def batch_transfer_async_read(self, session, locals_, remotes, lengths):
        assert len(locals_) == len(remotes) == len(lengths) == 1  # one request per batch: check_status is exact
        if locals_[0] in self.reject_local:
            return 0
        bid = len(self.batches) + 1
        status = -1 if locals_[0] in self.fail_local else 1
        self.batches[bid] = [locals_[0], lengths[0], self.polls, status]
        self.submitted.append((locals_[0], lengths[0]))
        return bid

    def transfer_check_status(self, bid):
        batch = self.batches[bid]
        if batch[2] is None:
            self.checks_after_terminal += 1  # the binding frees a batch once it reported it
        if batch[2]:
            batch[2] -= 1
            return 0
        batch[2] = None
        return batch[3]

    def in_flight(self) -> int:
        return sum(1 for b in self.batches.values() if b[2] is not None)


def engine_with(binding) -> MooncakeEngine:
    return MooncakeEngine.wrap(binding, "fake:1", segments=None, allocations=None)


def test_large_reads_go_in_chunks_and_on_done_runs_once_per_whole_read(monkeypatch):
    monkeypatch.setattr(engine_module, "CHUNK_BYTES", 100)
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    binding = FakeBinding()
    reads = [Read(1000, 5000, 250), Read(2000, 6000, 100), Read(3000, 7000, 1)]
    prepared, done = [], []
    engine_with(binding).read("fake:1", reads, prepare=prepared.append,
                              on_done=lambda i: done.append((i, binding.in_flight())))
    assert binding.submitted == [(1000, 100), (1100, 100), (1200, 50), (2000, 100), (3000, 1)]
    assert prepared == reads
    assert sorted(i for i, _ in done) == [0, 1, 2]
    assert binding.checks_after_terminal == 0


def test_a_failed_read_stops_submitting_and_drains_the_rest_before_raising(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    binding = FakeBinding(polls=3, fail_local={1000})
    reads = [Read(1000 * (i + 1), 9000 + i * 10, 10) for i in range(3)]
    done = []
    with pytest.raises(TransferError, match=r"Mooncake read 0 of 3 .* failed .*Mooncake return code -1") as info:
        engine_with(binding).read("fake:1", reads, on_done=done.append)
    assert binding.in_flight() == 0  # nothing still writing into our memory
    assert info.value.seed == "fake:1" and info.value.code == -1 and info.value.nbytes == 10
    assert done == []  # a failed candidate's bytes are not verified


def test_a_rejected_submission_drains_what_was_submitted(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    binding = FakeBinding(polls=5, reject_local={2000})
    reads = [Read(1000, 9000, 10), Read(2000, 9100, 10), Read(3000, 9200, 10)]
    with pytest.raises(TransferError, match="could not be submitted"):
        engine_with(binding).read("fake:1", reads)
    assert binding.submitted == [(1000, 10)] and binding.in_flight() == 0


def test_an_error_in_on_done_propagates_after_the_drain(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    binding = FakeBinding(polls=1)

    def on_done(index):
        raise RuntimeError(f"hash of read {index} blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        engine_with(binding).read("fake:1", [Read(1000 * (i + 1), 9000, 10) for i in range(4)], on_done=on_done)
    assert binding.in_flight() == 0


def test_the_deadline_fails_the_read_but_only_after_the_reads_in_flight_ended(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0.001)
    binding = FakeBinding(polls=60)  # about 60 ms in flight, well past a 10 ms deadline
    with pytest.raises(TransferError, match="deadline"):
        engine_with(binding).read("fake:1", [Read(1000, 9000, 10)], timeout_s=0.01)
    assert binding.in_flight() == 0


def test_a_zero_length_read_is_done_at_once(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    binding, done = FakeBinding(), []
    engine_with(binding).read("fake:1", [Read(1000, 9000, 0), Read(2000, 9100, 10)], on_done=done.append)
    assert sorted(done) == [0, 1] and binding.submitted == [(2000, 10)]
