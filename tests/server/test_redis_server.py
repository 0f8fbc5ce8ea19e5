"""Metadata servers over a real redis-server: replicas sharing records, restarts of the server
process and of Redis under a heartbeating seed, outages answered with UNAVAILABLE, concurrent reapers."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.errors import ServerUnavailableError
from sglang_mx.records import SourceStatus
from tests.procs import SeedProcess

pytest.importorskip("redis")
pytestmark = pytest.mark.slow  # server and redis-server processes, restarted


def _redis_options(redis, prefix: str = "mx:", **options) -> dict:
    return dict(store="redis", redis_url=redis.url, redis_prefix=prefix, **options)


def _stored(client, seed):
    return client.get_metadata(seed.info["mx_source_id"], seed.worker_id)


def _wait_updated_after(client, seed, t_ms: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stored = _stored(client, seed)
        except ServerUnavailableError:
            stored = None
        if stored is not None and stored.worker.status == SourceStatus.READY and stored.worker.updated_at_ms > t_ms:
            return stored.worker.updated_at_ms
        time.sleep(0.1)
    pytest.fail(f"no heartbeat after {t_ms} within {timeout_s} s:\n{seed.log_text()[-2000:]}")


# --- replicas -------------------------------------------------------------------------------------

def test_two_replicas_share_records(make_server, redis_server, redis_prefix, make_identity, make_worker):
    one = make_server(**_redis_options(redis_server, redis_prefix))
    two = make_server(**_redis_options(redis_server, redis_prefix))
    assert one.port != two.port
    with MetadataClient(one.address, timeout_s=5) as a, MetadataClient(two.address, timeout_s=5) as b:
        source = a.publish(make_identity(), make_worker(0, n_tensors=40, status=SourceStatus.INITIALIZING), "w0")
        assert b.list_sources(make_identity(), status=SourceStatus.READY) == []
        b.update_status(source, "w0", 0, SourceStatus.READY)  # a heartbeat through the other replica
        [ref] = b.list_sources(make_identity(), status=SourceStatus.READY)
        assert (ref.mx_source_id, ref.worker_id) == (source, "w0")
        got = b.get_metadata(source, "w0")
        assert got.identity == make_identity()
        assert got.worker.tensors == make_worker(0, n_tensors=40).tensors
        assert a.get_metadata(source, "w0").worker.status == SourceStatus.READY


def test_concurrent_reapers_on_two_replicas_are_harmless(make_server, redis_server, redis_prefix, make_identity,
                                                         make_worker, wait_for, caplog):
    caplog.set_level(logging.INFO, logger="sglang_mx.server.reaper")
    options = _redis_options(redis_server, redis_prefix, heartbeat_timeout_s=0.4, gc_timeout_s=0.8,
                             reaper_interval_s=0.05)
    one, two = make_server(**options), make_server(**options)
    with MetadataClient(one.address, timeout_s=5) as a, MetadataClient(two.address, timeout_s=5) as b:
        for i in range(30):
            source = (a if i % 2 else b).publish(make_identity(), make_worker(i), f"silent{i}")
        a.publish(make_identity(), make_worker(99), "beating")
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # one worker heartbeats through both replicas throughout
            (a, b)[int(time.monotonic() * 10) % 2].update_status(source, "beating", 99, SourceStatus.READY)
            time.sleep(0.1)
        wait_for(lambda: [r.worker_id for r in a.list_sources()] == ["beating"], timeout_s=5,
                 what="the silent workers to be reaped")
        assert b.get_metadata(source, "beating").worker.status == SourceStatus.READY
    text = caplog.text
    assert "reaper pass failed" not in text and "skipped" not in text
    with redis_server.client() as r:
        assert r.zcard(f"{redis_prefix}src:{source}") == 1


# --- outages --------------------------------------------------------------------------------------

def test_redis_outage_answers_unavailable_and_the_server_survives(make_server, make_redis_server, make_identity,
                                                                   make_worker):
    redis = make_redis_server()
    server = make_server(**_redis_options(redis))
    with MetadataClient(server.address, timeout_s=5, retries=1, backoff_s=0.05) as client:
        source = client.publish(make_identity(), make_worker(0), "w0")
        redis.kill()
        with grpc.insecure_channel(server.address) as channel:
            stub = wire.P2pServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetMetadata(wire.messages.GetMetadataRequest(mx_source_id=source, worker_id="w0"), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"GetMetadata: store at {redis.url} is unavailable: Redis" in e.value.details()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        for call in (lambda: client.list_sources(), lambda: client.update_status(source, "w0", 0, SourceStatus.READY),
                     lambda: client.publish(make_identity(), make_worker(0), "w0")):
            with pytest.raises(ServerUnavailableError, match=r"after 2 attempt\(s\) \[UNAVAILABLE\]"):
                call()
        redis.start()  # no persistence: empty again, and the same server serves it
        assert client.get_metadata(source, "w0") is None
        assert client.publish(make_identity(), make_worker(0), "w0") == source
        client.update_status(source, "w0", 0, SourceStatus.READY)


def _server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sglang_mx.cli", "server", "--host", "127.0.0.1", *args]


def test_cli_unreachable_redis_is_a_clear_error(unused_port):
    url = f"redis://127.0.0.1:{unused_port}/0"
    done = subprocess.run(_server_cmd("--port", "0", "--store", "redis", "--redis-url", url),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"sglang-mx: error: store at {url} is unavailable: cannot reach Redis" in done.stderr


def test_cli_unknown_store_is_refused():
    done = subprocess.run(_server_cmd("--store", "etcd"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "--store: invalid choice: 'etcd' (choose from" in done.stderr


# --- restarts under a heartbeating seed -----------------------------------------------------------

class _ServerProcess:
    """`sglang-mx server --store redis` as a real process (heartbeat timeout 10 s: longer than the
    restart takes on a busy machine, so the new process's reaper does not mark the seed STALE first)."""

    def __init__(self, port: int, redis_url: str, prefix: str, log_path) -> None:
        self.address = f"127.0.0.1:{port}"
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(
                _server_cmd("--port", str(port), "--store", "redis", "--redis-url", redis_url, "--redis-prefix",
                            prefix, "--heartbeat-timeout", "10", "--reaper-interval", "0.2"),
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server not SERVING after 15 s"
                time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def test_server_process_restart_keeps_ready_records_and_heartbeats(redis_server, redis_prefix, unused_port, tmp_path):
    server = _ServerProcess(unused_port, redis_server.url, redis_prefix, tmp_path / "server.log")
    seed = None
    try:
        seed = SeedProcess(server.address, size_mb=2, heartbeat=0.3)
        with MetadataClient(server.address, timeout_s=5, retries=1) as client:
            before = _stored(client, seed)
            assert before.worker.status == SourceStatus.READY
            assert server.stop() == 0
            time.sleep(1.0)  # a few heartbeats fail while no server runs
            server = _ServerProcess(unused_port, redis_server.url, redis_prefix, tmp_path / "server.log")
            after = _stored(client, seed)  # there at once: the new process read it from Redis
            assert after is not None and after.worker.status == SourceStatus.READY
            assert after.worker.tensors == before.worker.tensors
            assert after.worker.transfer_engine_session_id == seed.info["session"]
            _wait_updated_after(client, seed, after.worker.updated_at_ms)
            assert [r.worker_id for r in client.list_sources(status=SourceStatus.READY)] == [seed.worker_id]
        assert "publishing again" not in seed.log_text(), "the record should have survived, not been re-published"
    finally:
        if seed is not None:
            seed.kill()
        server.stop()


def test_redis_restart_with_persistence_keeps_records_and_heartbeats(make_server, make_redis_server):
    redis = make_redis_server(appendonly=True)
    server = make_server(**_redis_options(redis, heartbeat_timeout_s=3))
    seed = SeedProcess(server.address, size_mb=2, heartbeat=0.3)
    try:
        with MetadataClient(server.address, timeout_s=5, retries=1, backoff_s=0.05) as client:
            before = _stored(client, seed)
            redis.kill()  # SIGKILL: only what the AOF fsynced survives
            with pytest.raises(ServerUnavailableError, match="UNAVAILABLE"):
                _stored(client, seed)
            time.sleep(1.0)
            redis.start()
            after = _stored(client, seed)
            assert after is not None and after.worker.tensors == before.worker.tensors
            assert after.worker.status == SourceStatus.READY
            _wait_updated_after(client, seed, after.worker.updated_at_ms)
        log = seed.log_text()
        assert "heartbeat of worker" in log and "failed, will retry" in log  # it did notice the outage
        assert "publishing again" not in log
    finally:
        seed.kill()


def test_redis_restart_without_persistence_seed_republishes(make_server, make_redis_server):
    redis = make_redis_server()
    server = make_server(**_redis_options(redis))
    seed = SeedProcess(server.address, size_mb=2, heartbeat=0.3)
    try:
        with MetadataClient(server.address, timeout_s=5, retries=1) as client:
            tensors = _stored(client, seed).worker.tensors
            redis.restart()  # every record lost
            _wait_updated_after(client, seed, 0)
            assert _stored(client, seed).worker.tensors == tensors
        assert "publishing again" in seed.log_text()
    finally:
        seed.kill()
