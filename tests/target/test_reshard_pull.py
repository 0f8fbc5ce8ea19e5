"""Mixed-layout pulls over real Mooncake between processes (tests/procs/seed_proc.py --layer-scale).

Seed processes publish a Llama layer cut for their TP rank, with its split facts
and piece digests; the target here pulls its own cut for another TP from a whole
seed instance, through the same `pull_weights` an SGLang rank calls, and must hold
exactly its cut of the whole tensors, or fail naming what differed.
"""

from __future__ import annotations

import torch

import pytest

from sglang_mx.errors import NoSourceError
from sglang_mx.records import SourceIdentity
from sglang_mx.target.reshard import MixedLayout
from sglang_mx.target import PullOptions, digest_verifier, pull_weights
from sglang_mx.transfer.tensors import describe
from tests.procs import SeedProcess
from tests.procs.layouts import cut, specs_for, whole_tensors

MODEL, MODEL_ID, SCALE, KV = "test/reshard", "model-0001", 32, 4


def seed_instance(server, tp: int, instance: str, mutate: dict[int, str] | None = None) -> list[SeedProcess]:
    """The ranks of one seed instance; `mutate`: rank -> a tensor it changes after publishing."""
    mutate = mutate or {}
    return [SeedProcess(server.address, model=MODEL, tp=tp, rank=r, layer_scale=SCALE, kv_heads=KV,
                        instance=instance, model_id=MODEL_ID, **({"mutate": mutate[r]} if r in mutate else {}))
            for r in range(tp)]


def pull_as(client, engine, tp: int, rank: int, *, verify="require", wait_timeout_s=5.0, any_layout=True,
            local=None):
    """Pull TP `tp` rank `rank`'s tensors (into `local` when given, zeros otherwise)."""
    specs = specs_for(tp, rank, KV, SCALE)
    if local is None:
        local = {name: torch.zeros(spec.shape, dtype=torch.bfloat16) for name, spec in specs.items()}
    descriptors = describe(local, shards=specs)
    mixed = MixedLayout(model_id=MODEL_ID, model_name=MODEL, tp_size=tp, tp_rank=rank, tensors=local,
                        descriptors=descriptors) if any_layout else None
    report = pull_weights(client, engine, SourceIdentity(model_name=MODEL, tensor_parallel_size=tp, dtype="mixed"),
                          worker_rank=rank, tensors=descriptors,
                          options=PullOptions(verify=verify, wait_timeout_s=wait_timeout_s, poll_interval_s=0.2),
                          verifier=digest_verifier(local), mixed=mixed)
    return local, specs, report


def assert_cut(local, specs):
    whole = whole_tensors(KV, scale=SCALE)
    for name, spec in specs.items():
        assert torch.equal(local[name], cut(whole[name], spec)), name


def test_tp2_instance_feeds_tp1_and_tp4_targets(server, client, engine, seeds):
    seeds += seed_instance(server, 2, "inst-a")
    local, specs, report = pull_as(client, engine, 1, 0)
    assert_cut(local, specs)
    assert report.resharded_from == 2 and set(report.served) == {"inst-a-rank0", "inst-a-rank1"}
    assert report.verified > len(specs)  # piece digests and whole digests
    for rank in range(4):
        local, specs, report = pull_as(client, engine, 4, rank)
        assert_cut(local, specs)
        assert set(report.served) == {f"inst-a-rank{rank // 2}"}  # its half of the seed, nothing else


def test_a_changed_byte_rejects_the_instance_and_the_next_one_serves(server, client, engine, seeds):
    seeds += seed_instance(server, 2, "good")
    seeds += seed_instance(server, 2, "bad", {1: "gate_up.weight"})
    # Try until the bad instance was picked first once (instances are taken in random order among equals).
    for _ in range(12):
        local, specs, report = pull_as(client, engine, 1, 0)
        assert_cut(local, specs)
        assert set(report.served) == {"good-rank0", "good-rank1"}
        if report.failures:
            [failure] = report.failures
            assert "bad-rank0" in failure.seed and "gate_up.weight" in failure.reason
            assert "published digests" in failure.reason
            break
    else:
        pytest.fail("the changed instance was never tried first in 12 pulls")


def test_without_any_layout_or_with_only_a_changed_instance_the_pull_fails(server, client, engine, seeds):
    seeds += seed_instance(server, 1, "only", {0: "o.weight"})
    with pytest.raises(NoSourceError, match="no READY seed could serve"):
        pull_as(client, engine, 2, 0, any_layout=False, wait_timeout_s=0.5)
    with pytest.raises(NoSourceError) as e:
        pull_as(client, engine, 2, 1, wait_timeout_s=0.5)
    assert "o.weight" in str(e.value) and "do not match the seed's published digests" in str(e.value)


def test_a_plan_that_cannot_be_proven_is_refused_naming_the_tensor_and_nothing_is_read(server, client, engine, seeds):
    # The seed's model has 2 key/value heads, ours 4: the same names and model id, another whole QKV.
    seeds += [SeedProcess(server.address, model=MODEL, tp=2, rank=r, layer_scale=SCALE, kv_heads=2, instance="other",
                          model_id=MODEL_ID) for r in range(2)]
    local = {name: torch.zeros(spec.shape, dtype=torch.bfloat16) for name, spec in specs_for(1, 0, KV, SCALE).items()}
    with pytest.raises(NoSourceError) as e:
        pull_as(client, engine, 1, 0, wait_timeout_s=0.5, local=local)
    assert not any(t.any() for t in local.values())  # refused before any byte moved
    [attempt] = e.value.attempts
    assert "other-rank0" in attempt.seed
    assert "cannot reshard" in attempt.reason and "'qkv.weight'" in attempt.reason and "parts" in attempt.reason
