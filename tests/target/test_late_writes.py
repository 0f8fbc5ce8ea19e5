"""Late writes (#20 point 5): a read Mooncake reports timed out is still in flight. The next candidate
is not read, and no staging memory is freed, while it may still write. LateBinding (a stand-in for the
Mooncake binding, from tests/transfer) completes its batches late, writing into our memory then.
"""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

from sglang_mx.records import TensorDescriptor
from sglang_mx.target import PullOptions, pull_weights
from sglang_mx.target.reshard import _execute
from sglang_mx.target.reshard_plan import ReshardPlan, Staged
from sglang_mx.transfer import engine as engine_module
from sglang_mx.transfer.engine import MooncakeEngine, ReadsInFlightError
from tests.fakes import FakeClock
from tests.target.test_policy import IDENTITY, FakeClient
from tests.transfer.test_engine_gpu_rules import LateBinding


def pull(binding, buf, **options):
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=None)
    engine._engine.register_memory = lambda addr, length: 0
    engine._engine.unregister_memory = lambda addr: 0
    clock = FakeClock()
    return pull_weights(FakeClient([["slow", "good"]]), engine, IDENTITY, worker_rank=0,
                        tensors=[TensorDescriptor(name="w", addr=ctypes.addressof(buf), size=64)],
                        options=PullOptions(spread=False, max_seeds=1, wait_timeout_s=5, **options),
                        clock=clock, sleep=clock.sleep)


class TwoSeeds(LateBinding):
    """The seed "slow" times out and lands late; "good" completes at once."""

    def batch_transfer_async_read(self, session, locals_, remotes, lengths):
        self.timed_out_polls = self.slow_polls if session == "slow:1" else 0
        return super().batch_transfer_async_read(session, locals_, remotes, lengths)


def test_the_next_candidate_is_read_only_after_the_timed_out_read_landed(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    buf = ctypes.create_string_buffer(64)
    binding = TwoSeeds(timed_out_polls=0)
    binding.slow_polls = 30
    report = pull(binding, buf, verify="off")
    assert report.seed_worker_id == "good" and len(report.failures) == 1 and "timed out" in report.failures[0].reason
    assert binding.events == [("submit", "slow:1"), ("landed", "slow:1"), ("submit", "good:1"), ("landed", "good:1")]


def test_a_read_that_never_ends_stops_the_pull_and_no_other_candidate_is_tried(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0.001)
    monkeypatch.setattr(engine_module, "DRAIN_S", 0.05)
    buf = ctypes.create_string_buffer(64)
    binding = TwoSeeds(timed_out_polls=0)
    binding.slow_polls = None
    with pytest.raises(ReadsInFlightError) as info:
        pull(binding, buf, verify="off")
    assert info.value.ranges == ((ctypes.addressof(buf), 64),)
    assert [e for e in binding.events if e[0] == "submit"] == [("submit", "slow:1")]


class InFlightEngine:
    """Stand-in for MooncakeEngine whose read gives up on reads still in flight."""

    def __init__(self):
        self.quarantined, self.registered = [], []

    def register(self, ranges):
        self.registered += list(ranges)
        return list(ranges)

    def unregister(self, regions):
        for r in regions:
            self.registered.remove(r)

    def quarantine(self, obj):
        self.quarantined.append(obj)

    def read(self, session, reads, **_):
        raise ReadsInFlightError("still writing", seed=session, ranges=[(r.local_addr, r.length) for r in reads])


def test_reshard_staging_is_quarantined_not_freed_while_reads_may_write_into_it():
    tensors = {"w": torch.zeros(4, 8, dtype=torch.uint8)}
    staged = Staged(rank=0, name="w", remote_addr=0x9000, size=32, digest="", src_view=(1, 4, 8),
                    dst_view=(1, 4, 8), copies=())
    plan = ReshardPlan(direct={}, staged=(staged,), checks=(), unverified=(), total_bytes=32, read_bytes=32)
    engine = InFlightEngine()
    with pytest.raises(ReadsInFlightError):
        _execute(engine, plan, {0: "seed:1"}, tensors, None, time.monotonic, "test")
    assert len(engine.quarantined) == 1 and engine.quarantined[0].numel() == 32
