"""sglang_mx.client: bounded retries on UNAVAILABLE, no retries otherwise, errors that name the
server and the RPC."""

from __future__ import annotations

import time

import pytest

from sglang_mx.client import MetadataClient, normalize_url
from sglang_mx.errors import MxError, ServerError, ServerUnavailableError
from sglang_mx.records import SourceStatus


@pytest.mark.parametrize(
    "call, rpc",
    [
        (lambda c: c.list_sources(), "ListSources"),
        (lambda c: c.get_metadata("0123456789abcdef", "w"), "GetMetadata"),
        (lambda c: c.update_status("0123456789abcdef", "w", 0, SourceStatus.READY), "UpdateStatus"),
    ],
    ids=["ListSources", "GetMetadata", "UpdateStatus"],
)
def test_unreachable_server_raises_unavailable_naming_address_and_rpc(unused_port, call, rpc):
    address = f"127.0.0.1:{unused_port}"
    with MetadataClient(address, timeout_s=0.5, retries=2, backoff_s=0.01) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError) as info:
            call(client)
        elapsed = time.monotonic() - started
    error = info.value
    assert isinstance(error, MxError)
    assert address in str(error) and rpc in str(error)
    assert (error.url, error.rpc) == (address, rpc)
    assert error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert "after 3 attempt(s)" in str(error)
    assert elapsed < 5, f"took {elapsed:.1f} s to give up"


def test_unreachable_publish_names_publish(unused_port, make_identity, make_worker):
    with MetadataClient(f"grpc://127.0.0.1:{unused_port}", timeout_s=0.5, retries=0) as client:
        with pytest.raises(ServerUnavailableError, match=f"PublishMetadata to metadata server 127.0.0.1:{unused_port}"):
            client.publish(make_identity(), make_worker(), "w0")


def test_retries_back_off_between_attempts(unused_port):
    # 3 retries with 0.1 s doubling backoff sleep 0.1 + 0.2 + 0.4 s before giving up.
    with MetadataClient(f"127.0.0.1:{unused_port}", timeout_s=0.5, retries=3, backoff_s=0.1) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="after 4 attempt"):
            client.list_sources()
        assert 0.7 <= time.monotonic() - started < 5


def test_non_retryable_error_is_raised_at_once(server, make_identity):
    # An identity with an unknown enum value makes the server abort with INVALID_ARGUMENT.
    bad = make_identity(mx_source_type=42)
    with MetadataClient(server.address, timeout_s=5, retries=5, backoff_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            client.list_sources(bad)
        elapsed = time.monotonic() - started
    assert not isinstance(info.value, ServerUnavailableError)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.rpc == "ListSources"
    assert "identity.mx_source_type=42" in str(info.value)
    assert elapsed < 0.9, f"took {elapsed:.2f} s: was it retried?"


def test_client_round_trip(client, make_identity, make_worker):
    worker = make_worker(worker_rank=1)
    source = client.publish(make_identity(), worker, "w1")
    stored = client.get_metadata(source, "w1")
    assert (stored.mx_source_id, stored.worker_id, stored.identity) == (source, "w1", make_identity())
    assert stored.worker.tensors == worker.tensors
    refs = client.list_sources(make_identity(), status=SourceStatus.READY)
    assert [(r.worker_id, r.status) for r in refs] == [("w1", SourceStatus.READY)]


def test_get_metadata_of_unknown_is_none(client):
    assert client.get_metadata("0123456789abcdef", "w") is None


@pytest.mark.parametrize(
    "url, expected",
    [
        ("127.0.0.1:8001", "127.0.0.1:8001"),
        ("grpc://127.0.0.1:8001", "127.0.0.1:8001"),
        ("http://mx-server:8001", "mx-server:8001"),
        ("http://mx-server:8001/", "mx-server:8001"),
        ("dns:///mx.svc.cluster.local:8001", "mx.svc.cluster.local:8001"),
        ("[::1]:8001", "[::1]:8001"),
    ],
)
def test_normalize_url(url, expected):
    assert normalize_url(url) == expected


def test_client_url_is_normalized():
    with MetadataClient("grpc://127.0.0.1:1/") as client:
        assert client.url == "127.0.0.1:1"


def test_watch_of_an_unreachable_server_raises_unavailable_naming_watch_sources(unused_port):
    address = f"127.0.0.1:{unused_port}"
    with MetadataClient(address, timeout_s=0.5, retries=2, backoff_s=0.01) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError) as info:
            client.watch_sources("0123456789abcdef")
        elapsed = time.monotonic() - started
    assert (info.value.url, info.value.rpc) == (address, "WatchSources")
    assert "after 3 attempt(s)" in str(info.value)
    assert elapsed < 5, f"took {elapsed:.1f} s to give up"


def test_update_status_reports_verified_bytes(client, make_identity, make_worker):
    source = client.publish(make_identity(), make_worker(status=SourceStatus.INITIALIZING), "w0")
    client.update_status(source, "w0", 0, SourceStatus.INITIALIZING, verified_bytes=12_288)
    assert client.get_metadata(source, "w0").worker.topology == {"mx_verified_bytes": "12288"}
    [ref] = client.list_sources(make_identity())
    assert ref.topology == {"mx_verified_bytes": "12288"}
