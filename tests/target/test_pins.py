"""Pinned weights: a target configured with `expect` uses only seeds whose manifest it lists.

Digests make a target catch bytes that differ from what the seed published; they say
nothing about who published. A rogue seed that publishes its corrupted bytes with
digests computed over them "verifies". Real seed processes over Mooncake here: an
unpinned target takes the rogue; a pinned one refuses it by its manifest and takes the
seed it was told to trust, and refuses digests a forger could match unless told otherwise.
"""

from __future__ import annotations

import pytest
import torch

from sglang_mx.errors import NoSourceError
from sglang_mx.identity import mx_source_id
from sglang_mx.manifest import manifest_id
from sglang_mx.records import SourceIdentity
from sglang_mx.target import PullOptions, digest_verifier, pull_weights
from sglang_mx.transfer.tensors import describe
from tests.procs import SeedProcess, weights

pytestmark = pytest.mark.slow  # seed processes

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1, dtype="mixed")
SIZE_MB = 4


def _pull(client, engine, local, **options):
    options = {"wait_timeout_s": 3, "poll_interval_s": 0.2, "spread": False, **options}  # newest first
    return pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                        options=PullOptions(**options), verifier=digest_verifier(local))


def _holds_the_real_weights(local) -> bool:
    return all(torch.equal(weights.as_bytes(local[n]), weights.as_bytes(t)) for n, t in weights.build(SIZE_MB).items())


def test_a_pinned_target_refuses_a_rogue_seed_whose_digests_match_its_corrupted_bytes(server, client, engine, seeds):
    real = SeedProcess(server.address, size_mb=SIZE_MB, digest="blake3")
    seeds.append(real)
    rogue = SeedProcess(server.address, size_mb=SIZE_MB, digest="blake3", corrupt="big.bf16")  # newest: asked first
    seeds.append(rogue)
    stored = client.get_metadata(real.info["mx_source_id"], real.worker_id)
    assert real.info["manifest"] == manifest_id(mx_source_id(IDENTITY), 0, stored.worker.tensors)
    assert rogue.info["manifest"] != real.info["manifest"]

    # Unpinned (verify require, the default): the rogue's digests match its bytes, so it is used.
    local = weights.build(SIZE_MB, filled=False)
    report = _pull(client, engine, local)
    assert report.seed_worker_id == rogue.worker_id and not _holds_the_real_weights(local)

    # Pinned: the rogue is a failed candidate naming its manifest; the real seed serves.
    local = weights.build(SIZE_MB, filled=False)
    report = _pull(client, engine, local, expect=(real.info["manifest"],))
    assert report.seed_worker_id == real.worker_id and _holds_the_real_weights(local)
    [failure] = report.failures
    assert failure.seed == f"worker {rogue.worker_id} (rank 0)"
    assert f"its manifest {rogue.info['manifest']} is not one of the 1 this target expects" in failure.reason


def test_a_pin_over_digests_a_forger_can_match_is_refused_unless_allowed(server, client, engine, seeds):
    seed = SeedProcess(server.address, size_mb=SIZE_MB)  # xxh3-64: catches accidents, not forgers
    seeds.append(seed)
    local = weights.build(SIZE_MB, filled=False)
    with pytest.raises(NoSourceError, match="over digests a forger can match"):
        _pull(client, engine, local, expect=(seed.info["manifest"],))
    report = _pull(client, engine, local, expect=(seed.info["manifest"],), allow_weak_digests=True)
    assert report.seed_worker_id == seed.worker_id and _holds_the_real_weights(local)
