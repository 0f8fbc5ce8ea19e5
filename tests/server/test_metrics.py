"""Prometheus metrics over HTTP after real RPCs: counts and latencies by RPC and code, sources by
status computed at scrape time (for Redis without reading a tensor list)."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.errors import ConfigError
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.records import SourceStatus
from sglang_mx.errors import RequestRejectedError

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pb = wire.messages


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def _sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_off_by_default(server):
    assert server.metrics_port is None


def test_rpc_counts_latencies_and_sources_by_status(make_server, make_identity, make_worker, tmp_path):
    (tmp_path / "token").write_text("tok")
    server = make_server(metrics_port=0, auth_token_file=str(tmp_path / "token"))
    assert server.metrics_port
    with MetadataClient(server.address, auth_token="tok", timeout_s=5) as client:
        identity = make_identity()
        source = client.publish(identity, make_worker(worker_rank=0, status=SourceStatus.READY), "a")
        client.publish(identity, make_worker(worker_rank=1, status=SourceStatus.INITIALIZING), "b")
        client.publish(identity, make_worker(worker_rank=2, status=SourceStatus.INITIALIZING), "c")
        client.update_status(source, "c", 2, SourceStatus.STALE)
        with pytest.raises(RequestRejectedError):  # success=false is still gRPC OK
            client.update_status(source, "nope", 0, SourceStatus.READY)
        for _ in range(3):
            client.list_sources(identity)
        assert client.get_metadata(source, "a") is not None
    with grpc.insecure_channel(server.address) as channel:
        stub = wire.P2pServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.ListSources(pb.ListSourcesRequest(), timeout=5)  # no token
        with pytest.raises(grpc.RpcError):
            stub.ListSources(pb.ListSourcesRequest(status_filter=9), timeout=5,
                             metadata=(("authorization", "Bearer tok"),))

    samples = scrape(server.metrics_port)
    expected = {
        ("PublishMetadata", "OK"): 3, ("UpdateStatus", "OK"): 2, ("ListSources", "OK"): 3, ("GetMetadata", "OK"): 1,
        ("ListSources", "UNAUTHENTICATED"): 1, ("ListSources", "INVALID_ARGUMENT"): 1,
    }
    for (rpc, code), count in expected.items():
        assert _sample(samples, "sglang_mx_rpc_requests_total", rpc=rpc, code=code) == count, (rpc, code)
        assert _sample(samples, "sglang_mx_rpc_duration_seconds_count", rpc=rpc, code=code) == count, (rpc, code)
        assert 0 < _sample(samples, "sglang_mx_rpc_duration_seconds_sum", rpc=rpc, code=code) < 10 * count
        assert _sample(samples, "sglang_mx_rpc_duration_seconds_bucket", rpc=rpc, code=code, le="+Inf") == count
    total = sum(v for (name, _), v in samples.items() if name == "sglang_mx_rpc_requests_total")
    assert total == sum(expected.values())
    for status, count in {"READY": 1, "INITIALIZING": 1, "STALE": 1, "UNKNOWN": 0}.items():
        assert _sample(samples, "sglang_mx_sources", status=status) == count, status
    assert _sample(samples, "sglang_mx_store_up") == 1

    # Computed at scrape time: a heartbeat moves a worker between statuses.
    with MetadataClient(server.address, auth_token="tok", timeout_s=5) as client:
        client.update_status(source, "b", 1, SourceStatus.READY)
    samples = scrape(server.metrics_port)
    assert _sample(samples, "sglang_mx_sources", status="READY") == 2
    assert _sample(samples, "sglang_mx_sources", status="INITIALIZING") == 0
    assert _sample(samples, "sglang_mx_rpc_requests_total", rpc="UpdateStatus", code="OK") == 3


def test_sources_gauge_from_redis_reads_no_tensor_list(make_server, redis_server, redis_prefix, make_identity,
                                                       make_worker):
    from tests.server.test_redis_store import _monitored

    server = make_server(metrics_port=0, store="redis", redis_url=redis_server.url, redis_prefix=redis_prefix)
    with MetadataClient(server.address, timeout_s=5) as client:
        for i in range(4):
            client.publish(make_identity(), make_worker(worker_rank=i, n_tensors=2000,
                                                        status=SourceStatus.READY if i else SourceStatus.STALE),
                           f"w{i}")
    with redis_server.client() as rclient:
        commands = _monitored(rclient, lambda: scrape(server.metrics_port))
        samples = scrape(server.metrics_port)
    assert _sample(samples, "sglang_mx_sources", status="READY") == 3
    assert _sample(samples, "sglang_mx_sources", status="STALE") == 1
    ours = [c for c in commands if redis_prefix in c]
    assert ours, commands
    assert not [c for c in ours if " worker" in c or " identity" in c], "a scrape read a tensor list"
    assert sum(map(len, ours)) < 5_000


def test_store_outage_reports_store_down_and_the_endpoint_stays_up(make_server, make_redis_server, make_identity,
                                                                   make_worker):
    redis = make_redis_server()
    server = make_server(metrics_port=0, store="redis", redis_url=redis.url, redis_prefix="outage:")
    with MetadataClient(server.address, timeout_s=5) as client:
        client.publish(make_identity(), make_worker(), "w0")
    assert _sample(scrape(server.metrics_port), "sglang_mx_store_up") == 1
    redis.kill()
    samples = scrape(server.metrics_port)
    assert _sample(samples, "sglang_mx_store_up") == 0
    assert not [k for k in samples if k[0] == "sglang_mx_sources"]


def test_busy_metrics_port_is_a_startup_error(make_server):
    first = make_server(metrics_port=0)
    with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{first.metrics_port}"):
        MetadataServer(ServerOptions(host="127.0.0.1", port=0, metrics_port=first.metrics_port))
    with pytest.raises(ConfigError, match="metrics_port=70000 is out of range"):
        ServerOptions(metrics_port=70000)
