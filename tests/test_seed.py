"""The seed publisher's lifecycle, in real seed processes."""

import time

import pytest

from sglang_mx.client import MetadataClient
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.records import SourceStatus
from tests.procs import SeedProcess

pytestmark = pytest.mark.slow  # seed processes


def _status(client, seed):
    stored = client.get_metadata(seed.info["mx_source_id"], seed.worker_id)
    return stored.worker.status if stored else None


def test_published_ready_with_session_and_tensors(server, client):
    seed = SeedProcess(server.address, size_mb=2)
    try:
        stored = client.get_metadata(seed.info["mx_source_id"], seed.worker_id)
        assert stored.worker.status == SourceStatus.READY
        assert stored.worker.transfer_engine_session_id == seed.info["session"]
        names = {t.name for t in stored.worker.tensors}
        assert {"big.fp8", "empty.f32", "embed.bf16", "lm_head.bf16"} <= names
        tied = {t.name: t.addr for t in stored.worker.tensors if t.name in ("embed.bf16", "lm_head.bf16")}
        assert tied["embed.bf16"] == tied["lm_head.bf16"]
    finally:
        seed.close()
    assert _status(client, seed) == SourceStatus.STALE  # clean exit


def test_sigterm_marks_stale_at_once(server, client):
    seed = SeedProcess(server.address, size_mb=2)
    assert _status(client, seed) == SourceStatus.READY
    rc = seed.terminate()
    assert rc == 128 + 15
    assert _status(client, seed) == SourceStatus.STALE
    assert client.list_sources(status=SourceStatus.READY) == []


def test_heartbeats_keep_it_ready_and_republish_after_server_restart():
    first = MetadataServer(ServerOptions(host="127.0.0.1", port=0, heartbeat_timeout_s=2)).start()
    port = first.port
    seed = SeedProcess(first.address, size_mb=2, heartbeat=0.3)
    try:
        with MetadataClient(first.address, timeout_s=5) as client:
            time.sleep(2.5)  # past the heartbeat timeout: only heartbeats keep it listed READY
            assert [r.worker_id for r in client.list_sources(status=SourceStatus.READY)] == [seed.worker_id]
        first.stop()
        with MetadataServer(ServerOptions(host="127.0.0.1", port=port)) as second, \
                MetadataClient(second.address, timeout_s=5) as client:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _status(client, seed) != SourceStatus.READY:
                time.sleep(0.2)
            assert _status(client, seed) == SourceStatus.READY, seed.log_text()[-2000:]
            stored = client.get_metadata(seed.info["mx_source_id"], seed.worker_id)
            assert stored.worker.transfer_engine_session_id == seed.info["session"]
            assert len(stored.worker.tensors) > 60
    finally:
        first.stop()
        seed.kill()


def test_known_digests_are_published_as_given_and_the_rest_hashed(server, client, engine):
    """A cascading target passes the digests its pull verified: they are not hashed again."""
    import torch

    from sglang_mx.digest import tensor_digest
    from sglang_mx.records import SourceIdentity
    from sglang_mx.seed import start_seed

    tensors = {"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(32, dtype=torch.bfloat16)}
    marker = "xxh3-64:00000000000000aa"  # not a's digest: proves it was taken, not computed
    publisher = start_seed(tensors, engine, SourceIdentity(model_name="known/digests"), client, worker_rank=0,
                           known_digests={"a": marker, "not-ours": "xxh3-64:00000000000000bb"})
    try:
        stored = client.get_metadata(publisher.mx_source_id, publisher.worker_id)
        digests = {t.name: t.digest for t in stored.worker.tensors}
        assert digests == {"a": marker, "b": tensor_digest(tensors["b"])}
    finally:
        publisher.close()
