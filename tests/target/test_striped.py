"""Striped pulls from real seed processes: one seed killed mid-pull, only its unfinished part moves."""

import threading

import pytest
import torch

from sglang_mx.records import SourceIdentity
from sglang_mx.target import PullOptions, digest_verifier, pull_weights
from sglang_mx.transfer.tensors import describe
from tests.procs import SeedProcess, weights

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1, dtype="mixed")
SIZE_MB = 32


class KillMidRead:
    """The real engine; the first read of `victim_session` does half its reads, then the victim is SIGKILLed."""

    def __init__(self, engine, victim: SeedProcess) -> None:
        self.engine = engine
        self.victim = victim
        self.sessions: list[str] = []
        self.lock = threading.Lock()

    def register(self, ranges):
        return self.engine.register(ranges)

    def unregister(self, regions):
        self.engine.unregister(regions)

    def read(self, session, reads, prepare=None, on_done=None, window_bytes=None):
        with self.lock:
            self.sessions.append(session)
        offset = 0
        if session == self.victim.info["session"] and self.victim.proc.poll() is None:
            half = max(1, len(reads) // 2)
            self.engine.read(session, reads[:half], prepare=prepare, on_done=on_done)
            self.victim.kill()
            reads, offset = reads[half:], half
        shifted = None if on_done is None else (lambda i: on_done(i + offset))  # indices into the whole list
        self.engine.read(session, reads, prepare=prepare, on_done=shifted)


@pytest.fixture
def seeds(server):
    started = [SeedProcess(server.address, size_mb=SIZE_MB) for _ in range(3)]
    yield started
    for seed in started:
        seed.kill()


def test_three_seeds_one_killed_mid_pull_ends_verified(server, client, engine, seeds):
    victim = seeds[1]
    spy = KillMidRead(engine, victim)
    local = weights.build(SIZE_MB, filled=False)
    report = pull_weights(client, spy, IDENTITY, worker_rank=0, tensors=describe(local),
                          options=PullOptions(wait_timeout_s=10, max_seeds=3, verify="require"),
                          verifier=digest_verifier(local))
    assert victim.proc.poll() is not None  # it really died during the pull
    assert [f.seed for f in report.failures] == [f"worker {victim.worker_id} (rank 0)"]
    assert "Mooncake return code" in report.failures[0].reason
    assert report.rounds == 2
    survivors = {s.worker_id for s in seeds if s is not victim}
    assert survivors <= set(report.served)  # both others served a stripe (and the victim's leftovers)
    assert sum(report.served.values()) == report.bytes
    assert report.served.get(victim.worker_id, 0) < report.bytes // 3  # only what it finished before dying
    assert report.verified == len({t.name for t in describe(local) if t.size})
    for name, tensor in weights.build(SIZE_MB).items():
        assert torch.equal(weights.as_bytes(local[name]), weights.as_bytes(tensor)), name
    assert len(spy.sessions) >= 4  # three stripes, then the victim's unfinished part from the others
