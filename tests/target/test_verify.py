"""Content verification: a target serves exactly the bytes the seed published, or rejects that seed.

Real seed processes (tests/procs/seed_proc.py) publish digests of their tensors; the
target pulls over Mooncake and checks every tensor before it may use them.
"""

from __future__ import annotations

import pytest
import torch

from sglang_mx.errors import NoSourceError
from sglang_mx.records import SourceIdentity
from sglang_mx.target import PullOptions, digest_verifier, pull_weights
from sglang_mx.transfer.tensors import describe
from tests.procs import SeedProcess, weights

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1, dtype="mixed")
SIZE_MB = 8


def _pull(client, engine, local, verify="if_present", **options):
    options = {"wait_timeout_s": 5, "poll_interval_s": 0.2, "spread": False, **options}  # newest first
    return pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                        options=PullOptions(verify=verify, **options),
                        verifier=None if verify == "off" else digest_verifier(local))


def test_seed_publishes_a_digest_per_tensor_and_the_target_verifies_them(server, client, engine, seeds):
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB))
    stored = client.get_metadata(seeds[0].info["mx_source_id"], seeds[0].worker_id)
    with_bytes = [t for t in stored.worker.tensors if t.size]
    assert with_bytes and all(t.digest.startswith("xxh3-64:") for t in with_bytes)
    local = weights.build(SIZE_MB, filled=False)
    report = _pull(client, engine, local, verify="require")
    assert report.verified == len({t.name for t in with_bytes})
    # What the bytes were checked against, for a cascading target to publish without hashing again.
    pulled_names = {t.name for t in describe(local) if t.size}
    assert report.digests == {t.name: t.digest for t in with_bytes if t.name in pulled_names}
    for name, tensor in weights.build(SIZE_MB).items():
        assert torch.equal(weights.as_bytes(local[name]), weights.as_bytes(tensor)), name


def test_weights_changed_under_a_ready_record_are_caught_and_the_next_seed_serves(server, client, engine, seeds):
    good = SeedProcess(server.address, size_mb=SIZE_MB)
    seeds.append(good)
    changed = SeedProcess(server.address, size_mb=SIZE_MB, mutate="big.bf16")  # newest: tried first
    seeds.append(changed)
    local = weights.build(SIZE_MB, filled=False)
    report = _pull(client, engine, local)
    assert report.seed_worker_id == good.worker_id
    [failure] = report.failures
    assert failure.seed == f"worker {changed.worker_id} (rank 0)"
    assert "do not match the seed's published digests" in failure.reason and "big.bf16" in failure.reason
    assert "small.0.f32" not in failure.reason  # only what differs is named
    for name, tensor in weights.build(SIZE_MB).items():
        assert torch.equal(weights.as_bytes(local[name]), weights.as_bytes(tensor)), name


def test_the_only_seed_changed_fails_naming_the_tensor(server, client, engine, seeds):
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB, mutate="small.6.fp8"))
    local = weights.build(SIZE_MB, filled=False)
    with pytest.raises(NoSourceError) as info:
        _pull(client, engine, local, wait_timeout_s=1)
    assert "small.6.fp8" in str(info.value) and "published digests" in str(info.value)


def test_verify_modes_for_a_seed_without_digests(server, client, engine, seeds):
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB, no_digests=True))
    local = weights.build(SIZE_MB, filled=False)
    with pytest.raises(NoSourceError, match="publishes no digest, or only one computed over bytes it never "
                                            "checked, for some tensors, and verify is 'require'") as info:
        _pull(client, engine, local, verify="require", wait_timeout_s=1)
    assert not any(weights.as_bytes(t).any() for t in local.values())  # refused before any byte moved
    assert "big.f32" in str(info.value)
    assert _pull(client, engine, local, verify="if_present").verified == 0  # warned, not verified
    assert _pull(client, engine, local, verify="off").verified == 0
    for name, tensor in weights.build(SIZE_MB).items():
        assert torch.equal(weights.as_bytes(local[name]), weights.as_bytes(tensor)), name


def test_verify_off_serves_a_changed_seed_which_is_why_it_is_not_the_default(server, client, engine, seeds):
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB, mutate="big.bf16"))
    local = weights.build(SIZE_MB, filled=False)
    assert _pull(client, engine, local, verify="off").verified == 0
    assert not torch.equal(weights.as_bytes(local["big.bf16"]), weights.as_bytes(weights.build(SIZE_MB)["big.bf16"]))


# --- the one rule (sglang_mx.target.verify.expect), pure ---

def test_the_verify_rule():
    from sglang_mx.target.verify import VerifyMode, expect

    assert expect(VerifyMode.REQUIRE, "xxh3-64:00") == "xxh3-64:00"
    assert expect(VerifyMode.REQUIRE, "") is None  # may not be read at all
    assert expect(VerifyMode.IF_PRESENT, "xxh3-64:00") == "xxh3-64:00"
    assert expect(VerifyMode.IF_PRESENT, "") == ""  # read unchecked
    assert expect(VerifyMode.OFF, "xxh3-64:00") == ""
    assert [m.checks for m in VerifyMode] == [True, True, False]
