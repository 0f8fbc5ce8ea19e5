"""Two real processes move real bytes over Mooncake TransferEngine (tcp, loopback)."""

import pytest
import torch

from sglang_mx.errors import NoSourceError
from sglang_mx.target import PullOptions, pull_weights
from sglang_mx.transfer.tensors import describe
from sglang_mx.records import SourceIdentity
from tests.procs import SeedProcess, weights

pytestmark = pytest.mark.slow  # seed processes; 300 MB over Mooncake

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1, dtype="mixed")


def test_pull_300mb_bit_exact_across_dtypes(server, client, engine):
    seed = SeedProcess(server.address, size_mb=300)
    try:
        local = weights.build(300, filled=False)
        expected = weights.build(300)
        report = pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                              options=PullOptions(wait_timeout_s=10))
    finally:
        seed.close()
    assert report.seed_worker_id == seed.worker_id
    assert report.failures == ()
    assert {t.dtype for t in local.values()} >= {torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8}
    unique_bytes = sum(t.nbytes for n, t in expected.items() if n != "lm_head.bf16")
    assert report.bytes == unique_bytes >= 256 * 1024 * 1024
    # 64 small tensors in one arena on both sides arrive in one merged read.
    assert report.reads < len(local) - 60
    for name, tensor in expected.items():
        assert torch.equal(weights.as_bytes(local[name]), weights.as_bytes(tensor)), name
    assert local["lm_head.bf16"].data_ptr() == local["embed.bf16"].data_ptr()
    assert local["empty.f32"].numel() == 0


def test_layout_mismatch_fails_before_any_byte_moves(server, client, engine):
    seed = SeedProcess(server.address, size_mb=4, variant="mismatch")
    try:
        local = weights.build(4, filled=False)
        with pytest.raises(NoSourceError) as info:
            pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                         options=PullOptions(wait_timeout_s=1, poll_interval_s=0.2))
    finally:
        seed.close()
    text = str(info.value)
    assert "small.3.i8" in text  # missing on the seed
    assert "only_on_seed.f32" in text  # unexpected
    assert "small.5.bf16 (local 2048 B, seed 2064 B)" in text  # size mismatch
    assert seed.worker_id in text
    for name, tensor in local.items():
        assert not weights.as_bytes(tensor).any(), f"{name} was written despite the mismatch"
