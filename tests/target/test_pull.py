"""The target puller against real seed processes: waiting, failover, bounded failure."""

import threading
import time

import pytest
import torch

from sglang_mx.errors import NoSourceError
from sglang_mx.target import PullOptions, pull_weights
from sglang_mx.transfer.tensors import describe
from sglang_mx.records import SourceIdentity
from tests.procs import SeedProcess, weights

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1, dtype="mixed")
SIZE_MB = 8


def _assert_exact(local):
    for name, tensor in weights.build(SIZE_MB).items():
        assert torch.equal(weights.as_bytes(local[name]), weights.as_bytes(tensor)), name


def test_fails_over_from_a_killed_seed_to_a_live_one(server, client, engine, seeds):
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB))
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB))
    live, dead = seeds
    dead.kill()  # the newest READY record: tried first, now gone without a word
    local = weights.build(SIZE_MB, filled=False)
    report = pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                          options=PullOptions(wait_timeout_s=5, spread=False))  # newest first
    assert report.seed_worker_id == live.worker_id
    assert [f.seed for f in report.failures] == [f"worker {dead.worker_id} (rank 0)"]
    assert "Mooncake return code" in report.failures[0].reason
    _assert_exact(local)


def test_only_seed_killed_fails_clearly_within_bounded_time(server, client, engine, seeds):
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB))
    seeds[0].kill()
    local = weights.build(SIZE_MB, filled=False)
    start = time.monotonic()
    with pytest.raises(NoSourceError) as info:
        pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                     options=PullOptions(wait_timeout_s=2, poll_interval_s=0.2))
    assert time.monotonic() - start < 20
    text = str(info.value)
    assert "no READY seed could serve 'test/model'" in text
    assert server.address in text
    assert seeds[0].worker_id in text and "batch_transfer_async_read" in text
    assert len(info.value.attempts) == 1


def test_waits_for_a_seed_that_starts_later(server, client, engine, seeds):
    local = weights.build(SIZE_MB, filled=False)
    result = {}
    listed_empty = threading.Event()

    class ListingSpy:
        """The real client; sets an event once a listing came back empty (the puller is waiting)."""

        url = client.url

        def list_sources(self, *args, **kwargs):
            refs = client.list_sources(*args, **kwargs)
            if not refs:
                listed_empty.set()
            return refs

        def get_metadata(self, *args):
            return client.get_metadata(*args)

    def pull():
        try:
            result["report"] = pull_weights(ListingSpy(), engine, IDENTITY, worker_rank=0, tensors=describe(local),
                                            options=PullOptions(wait_timeout_s=60, poll_interval_s=0.2))
        except Exception as e:  # surfaced by the assertion below
            result["error"] = e

    puller = threading.Thread(target=pull)
    puller.start()
    assert listed_empty.wait(30), result
    assert puller.is_alive(), result  # still waiting: no seed yet
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB))
    puller.join(timeout=60)
    assert "error" not in result, result.get("error")
    assert result["report"].seed_worker_id == seeds[0].worker_id
    _assert_exact(local)


def test_never_pairs_another_rank_or_identity(server, client, engine, seeds):
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB, rank=1, tp=2))
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB, model="test/other"))
    local = weights.build(SIZE_MB, filled=False)
    rank0_tp2 = SourceIdentity(model_name="test/model", tensor_parallel_size=2, dtype="mixed")
    for identity in (rank0_tp2, IDENTITY):
        with pytest.raises(NoSourceError, match="no READY seed"):
            pull_weights(client, engine, identity, worker_rank=0, tensors=describe(local),
                         options=PullOptions(wait_timeout_s=0.5, poll_interval_s=0.1))
    assert not any(weights.as_bytes(t).any() for t in local.values())


def test_stops_after_max_candidates(server, client, engine, seeds):
    for _ in range(2):
        seeds.append(SeedProcess(server.address, size_mb=SIZE_MB))
    for seed in seeds:
        seed.kill()
    local = weights.build(SIZE_MB, filled=False)
    with pytest.raises(NoSourceError, match="all 1 candidate seed") as info:
        pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                     options=PullOptions(wait_timeout_s=30, max_candidates=1))
    assert len(info.value.attempts) == 1
