"""Chaos: seeds SIGKILLed at random moments before and during pulls; never a served mismatch.

Each trial starts a victim seed (the newest READY record, so tried first) beside,
in most trials, a surviving seed, and kills the victim at a random moment between
just before the pull and well into it.
Every trial must end with bytes equal to the checkpoint (checked by the target's
digests and again here, byte for byte) or with a clear NoSourceError; a report of
success over wrong bytes fails the test. Bounded: a fixed number of trials with a
fixed random seed, each pull bounded by its wait timeout. Reads are cut into 1 MiB
batches, all in flight at once.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from sglang_mx.client import MetadataClient
from sglang_mx.errors import NoSourceError
from sglang_mx.records import SourceIdentity
from sglang_mx.target import PullOptions, digest_verifier, pull_weights
from sglang_mx.transfer import engine as engine_module
from sglang_mx.transfer.tensors import describe
from tests.procs import SeedProcess, weights

pytestmark = pytest.mark.slow

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1, dtype="mixed")
SIZE_MB = 256
TRIALS = 6


@pytest.fixture(scope="module")
def expected():
    return weights.build(SIZE_MB)


def test_random_kills_end_verified_or_clearly_failed(make_server, engine, expected, monkeypatch):
    monkeypatch.setattr(engine_module, "CHUNK_BYTES", 1 << 20)  # many batches in flight per plan
    # A killed seed leaves READY listings within a second, so each trial sees only its own seeds.
    server = make_server(heartbeat_timeout_s=1.0, reaper_interval_s=0.2)
    client = MetadataClient(server.address, timeout_s=5)
    rng = random.Random(20261128)
    outcomes = []
    survivor = None
    try:
        for trial in range(TRIALS):
            with_survivor = trial % 3 != 2  # every third trial: the victim is the only seed
            if with_survivor and survivor is None:
                survivor = SeedProcess(server.address, size_mb=SIZE_MB, heartbeat=0.3)
            if not with_survivor and survivor is not None:
                survivor.kill()
                survivor = None
            victim = SeedProcess(server.address, size_mb=SIZE_MB, heartbeat=0.3)
            local = weights.build(SIZE_MB, filled=False)
            delay = rng.uniform(0.0, 0.25)
            killer = threading.Timer(delay, victim.kill)
            killer.start()
            try:
                report = pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                                      options=PullOptions(wait_timeout_s=3, poll_interval_s=0.2, verify="require"),
                                      verifier=digest_verifier(local))
            except NoSourceError as e:
                assert not with_survivor, f"trial {trial}: a live seed was there: {e}"
                assert victim.worker_id in str(e) or "no READY seed" in str(e), str(e)
                outcomes.append(("failed clearly", delay))
            else:
                assert report.verified > 0
                for name, tensor in expected.items():
                    assert torch.equal(weights.as_bytes(local[name]), weights.as_bytes(tensor)), (trial, name)
                source = "victim" if report.seed_worker_id == victim.worker_id else "survivor"
                outcomes.append((f"verified from the {source}", delay))
            finally:
                killer.join()
                victim.kill()
    finally:
        if survivor is not None:
            survivor.kill()
        client.close()
    print("chaos outcomes:", outcomes)
    assert len(outcomes) == TRIALS
