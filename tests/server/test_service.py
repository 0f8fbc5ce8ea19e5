"""The P2pService over real gRPC on 127.0.0.1: validation, lifecycle, expiry, health, big records."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.errors import RequestRejectedError
from sglang_mx.identity import mx_source_id
from sglang_mx.records import SourceStatus, TensorDescriptor, WorkerRecord

pb = wire.messages


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return wire.P2pServiceStub(channel)


def _publish_request(make_identity, make_worker, **changes) -> pb.PublishMetadataRequest:
    request = pb.PublishMetadataRequest(
        identity=wire.identity_to_pb(make_identity()), worker=wire.worker_to_pb(make_worker()), worker_id="w0"
    )
    for edit in changes.values():
        edit(request)
    return request


def _tensor(name: str, addr: int, size: int) -> pb.TensorDescriptor:
    return pb.TensorDescriptor(name=name, addr=addr, size=size)


BAD_PUBLISH = {
    "missing identity": (lambda r: r.ClearField("identity"), "identity is missing"),
    "empty model_name": (lambda r: setattr(r.identity, "model_name", ""), "model_name is empty"),
    "blank model_name": (lambda r: setattr(r.identity, "model_name", "  "), "model_name is empty"),
    "empty worker_id": (lambda r: setattr(r, "worker_id", ""), "worker_id is empty"),
    "missing worker": (lambda r: r.ClearField("worker"), "worker is missing"),
    "empty tensor name": (lambda r: r.worker.tensor_source.tensors.append(_tensor("", 4096, 8)), "empty name"),
    "duplicate tensor": (lambda r: r.worker.tensor_source.tensors.extend([_tensor("dup", 4096, 8),
                                                                          _tensor("dup", 8192, 8)]),
                         "'dup' is listed twice"),
    "bytes at address 0": (lambda r: r.worker.tensor_source.tensors.append(_tensor("z", 0, 16)),
                           "'z' has 16 bytes at address 0"),
    "unknown backend enum": (lambda r: setattr(r.identity, "backend_framework", 99), "backend_framework=99"),
    "unknown worker status": (lambda r: setattr(r.worker, "status", 9), "worker.status=9"),
}


@pytest.mark.parametrize("case", list(BAD_PUBLISH), ids=list(BAD_PUBLISH))
def test_publish_validation(stub, make_identity, make_worker, case):
    edit, named = BAD_PUBLISH[case]
    response = stub.PublishMetadata(_publish_request(make_identity, make_worker, edit=edit), timeout=5)
    assert response.success is False
    assert named in response.message
    assert response.message.startswith("PublishMetadata rejected")
    assert stub.ListSources(pb.ListSourcesRequest(), timeout=5).instances == [], "nothing may be stored"


def test_publish_accepts_an_empty_tensor_at_address_zero(client, make_identity):
    worker = WorkerRecord(worker_rank=0, transfer_engine_session_id="h:1",
                          tensors=(TensorDescriptor(name="empty", addr=0, size=0),))
    source = client.publish(make_identity(), worker, "w0")
    assert client.get_metadata(source, "w0").worker.tensors == worker.tensors


def test_client_publish_rejection_raises_with_the_message(client, make_identity):
    bad = WorkerRecord(worker_rank=0, tensors=(TensorDescriptor(name="x", addr=0, size=4),))
    with pytest.raises(RequestRejectedError, match="'x' has 4 bytes at address 0") as info:
        client.publish(make_identity(), bad, "w0")
    assert info.value.rpc == "PublishMetadata"


def test_publish_returns_the_identity_hash_and_worker_id(stub, make_identity, make_worker):
    response = stub.PublishMetadata(_publish_request(make_identity, make_worker), timeout=5)
    assert response.success
    assert response.mx_source_id == mx_source_id(make_identity()) == "8b7aa4b533b72278"
    assert response.worker_id == "w0"


def test_server_stamps_updated_at(client, make_identity, make_worker):
    before = time.time_ns() // 1_000_000
    source = client.publish(make_identity(), make_worker(updated_at_ms=1), "w0")
    after = time.time_ns() // 1_000_000
    assert before <= client.get_metadata(source, "w0").worker.updated_at_ms <= after


def test_lifecycle_initializing_ready_stale(client, make_identity, make_worker):
    identity = make_identity()
    source = client.publish(identity, make_worker(worker_rank=1, status=SourceStatus.INITIALIZING), "w1")

    def listed(status):
        return [r.worker_id for r in client.list_sources(identity, status=status)]

    assert listed(SourceStatus.INITIALIZING) == ["w1"]
    assert listed(SourceStatus.READY) == []
    client.update_status(source, "w1", 1, SourceStatus.READY)
    assert listed(SourceStatus.READY) == ["w1"]
    assert listed(SourceStatus.INITIALIZING) == []
    assert client.get_metadata(source, "w1").worker.status == SourceStatus.READY
    client.update_status(source, "w1", 1, SourceStatus.STALE)
    assert listed(SourceStatus.READY) == []
    assert listed(SourceStatus.STALE) == ["w1"]
    assert client.get_metadata(source, "w1").worker.tensors == make_worker().tensors


@pytest.mark.parametrize("status", [0, 7, -1])
def test_update_status_rejects_unknown_and_invalid_status(stub, client, make_identity, make_worker, status):
    source = client.publish(make_identity(), make_worker(status=SourceStatus.INITIALIZING), "w0")
    response = stub.UpdateStatus(
        pb.UpdateStatusRequest(mx_source_id=source, worker_id="w0", worker_rank=0, status=status), timeout=5
    )
    assert response.success is False
    assert f"status {status} is not one of" in response.message
    assert client.get_metadata(source, "w0").worker.status == SourceStatus.INITIALIZING


def test_update_status_of_unknown_worker_fails(stub, client, make_identity, make_worker):
    source = client.publish(make_identity(), make_worker(), "w0")
    response = stub.UpdateStatus(
        pb.UpdateStatusRequest(mx_source_id=source, worker_id="nope", worker_rank=0, status=pb.SOURCE_STATUS_READY),
        timeout=5,
    )
    assert response.success is False
    assert "nope" in response.message and "publish it first" in response.message
    with pytest.raises(RequestRejectedError):
        client.update_status("0000000000000000", "w0", 0, SourceStatus.READY)
    with pytest.raises(RequestRejectedError):  # wrong rank
        client.update_status(source, "w0", 5, SourceStatus.READY)
    assert client.get_metadata(source, "nope") is None


def test_update_status_with_empty_source_id_fails(stub):
    response = stub.UpdateStatus(pb.UpdateStatusRequest(status=pb.SOURCE_STATUS_READY), timeout=5)
    assert response.success is False and "mx_source_id is empty" in response.message


def test_update_status_without_worker_id_is_refused_and_changes_nothing(stub, client, make_identity, make_worker):
    """An empty worker_id once flipped every worker of the rank; ModelExpress 0.7.0's client always names one."""
    identity = make_identity()
    source = client.publish(identity, make_worker(worker_rank=0, status=SourceStatus.INITIALIZING), "a")
    client.publish(identity, make_worker(worker_rank=0, status=SourceStatus.INITIALIZING), "b")
    response = stub.UpdateStatus(pb.UpdateStatusRequest(mx_source_id=source, worker_rank=0,
                                                        status=pb.SOURCE_STATUS_STALE), timeout=5)
    assert response.success is False and "worker_id is empty" in response.message
    assert sorted(r.worker_id for r in client.list_sources(identity, status=SourceStatus.INITIALIZING)) == ["a", "b"]


def test_ready_filter_drops_silent_records_before_the_reaper_runs(make_server, make_identity, make_worker):
    server = make_server(heartbeat_timeout_s=0.5, reaper_interval_s=3600)
    identity = make_identity()
    with MetadataClient(server.address, timeout_s=5) as client:
        source = client.publish(identity, make_worker(status=SourceStatus.READY), "w0")
        assert [r.worker_id for r in client.list_sources(identity, status=SourceStatus.READY)] == ["w0"]
        deadline = time.monotonic() + 5
        while client.list_sources(identity, status=SourceStatus.READY):
            assert time.monotonic() < deadline, "a silent READY record stayed listed as READY"
            time.sleep(0.05)
        # Not reaped yet: still stored as READY, just not offered as READY.
        assert client.get_metadata(source, "w0").worker.status == SourceStatus.READY
        assert [r.worker_id for r in client.list_sources(identity)] == ["w0"]
        # A heartbeat makes it eligible again.
        client.update_status(source, "w0", 0, SourceStatus.READY)
        assert [r.worker_id for r in client.list_sources(identity, status=SourceStatus.READY)] == ["w0"]


def test_reaper_marks_stale_then_deletes(make_server, make_identity, make_worker, wait_for):
    server = make_server(heartbeat_timeout_s=0.4, reaper_interval_s=0.05, gc_timeout_s=1.0)
    identity = make_identity()
    silent = {"ready": SourceStatus.READY, "init": SourceStatus.INITIALIZING, "unknown": SourceStatus.UNKNOWN}
    with MetadataClient(server.address, timeout_s=5) as client:
        source = client.publish(identity, make_worker(worker_rank=9, status=SourceStatus.READY), "alive")
        for i, (wid, status) in enumerate(silent.items()):
            client.publish(identity, make_worker(worker_rank=i, status=status), wid)

        def heartbeat_and_list(status=None):
            client.update_status(source, "alive", 9, SourceStatus.READY)
            return {r.worker_id for r in client.list_sources(identity, status=status)}

        wait_for(lambda: heartbeat_and_list(SourceStatus.STALE) == set(silent), timeout_s=5,
                 what="the silent records to become STALE")
        stale = client.get_metadata(source, "init")
        if stale is not None:  # may already be gone on a slow machine
            assert stale.worker.status == SourceStatus.STALE
            assert stale.worker.tensors == make_worker().tensors
        wait_for(lambda: heartbeat_and_list() == {"alive"}, timeout_s=5, what="the STALE records to be deleted")
        for wid in silent:
            assert client.get_metadata(source, wid) is None
        assert client.get_metadata(source, "alive").worker.status == SourceStatus.READY


def test_list_without_identity_lists_every_source(client, make_identity, make_worker):
    qwen, other = make_identity(), make_identity(model_name="org/other", tensor_parallel_size=1)
    a = client.publish(qwen, make_worker(), "q0")
    b = client.publish(other, make_worker(), "o0")
    assert a != b
    assert {(r.mx_source_id, r.worker_id) for r in client.list_sources()} == {(a, "q0"), (b, "o0")}
    assert [r.worker_id for r in client.list_sources(qwen)] == ["q0"]
    # An identity without a model name does not narrow the listing (what ModelExpress does).
    assert len(client.list_sources(make_identity(model_name=""))) == 2


def test_list_one_ref_per_worker_newest_first(client, make_identity, make_worker):
    identity = make_identity()
    source = client.publish(identity, make_worker(worker_rank=0), "a")
    client.publish(identity, make_worker(worker_rank=1), "b")
    client.publish(identity, make_worker(worker_rank=0), "a")  # republish: still one ref
    time.sleep(0.002)
    client.update_status(source, "b", 1, SourceStatus.READY)
    refs = client.list_sources(identity)
    assert [r.worker_id for r in refs] == ["b", "a"]
    assert refs[0].updated_at_ms >= refs[1].updated_at_ms
    assert [r.worker_id for r in client.list_sources(identity, worker_rank=0)] == ["a"]
    assert [r.worker_id for r in client.list_sources(identity, limit=1)] == ["b"]
    assert [r.worker_id for r in client.list_sources(model_name="Qwen/Qwen3-8B")] == ["b", "a"]


def test_list_with_unknown_status_filter_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.ListSources(pb.ListSourcesRequest(status_filter=9), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "status_filter=9" in info.value.details()


def test_get_metadata_unknown_is_not_found(stub, client, make_identity, make_worker):
    assert stub.GetMetadata(pb.GetMetadataRequest(mx_source_id="0123456789abcdef", worker_id="w"), timeout=5).found is False
    assert stub.GetMetadata(pb.GetMetadataRequest(), timeout=5).found is False
    source = client.publish(make_identity(), make_worker(), "w0")
    assert stub.GetMetadata(pb.GetMetadataRequest(mx_source_id=source), timeout=5).found is False
    assert stub.GetMetadata(pb.GetMetadataRequest(mx_source_id=source, worker_id="w1"), timeout=5).found is False


def test_get_metadata_returns_identity_and_keys(stub, client, make_identity, make_worker):
    identity = make_identity(extra_parameters={"k": "v"}, torch_version="2.13.0")
    worker = make_worker(worker_rank=1, accelerator="cpu", topology={"node": "n"})
    source = client.publish(identity, worker, "w1")
    response = stub.GetMetadata(pb.GetMetadataRequest(mx_source_id=source, worker_id="w1"), timeout=5)
    assert response.found and response.mx_source_id == source and response.worker_id == "w1"
    assert wire.identity_from_pb(response.identity) == identity
    got = wire.worker_from_pb(response.worker)
    assert (got.tensors, got.transfer_engine_session_id, got.accelerator, dict(got.topology)) == (
        worker.tensors, worker.transfer_engine_session_id, "cpu", {"node": "n"})


@pytest.mark.parametrize("service", ["", wire.SERVICE_NAME])
def test_health_is_serving(channel, service):
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow  # a 100,000-tensor record, both ways
def test_large_record_round_trips(client, make_identity):
    n = 100_000
    tensors = tuple(
        TensorDescriptor(name=f"model.layers.{i // 8}.mlp.experts.{i % 8}.weight", addr=0x7F00_0000_0000 + i * 4096,
                         size=4096, dtype="bfloat16")
        for i in range(n)
    )
    worker = WorkerRecord(worker_rank=0, transfer_engine_session_id="127.0.0.1:1", tensors=tensors)
    assert len(wire.worker_to_pb(worker).SerializeToString()) > 4 * 1024 * 1024  # above gRPC's 4 MB default
    source = client.publish(make_identity(), worker, "big")
    got = client.get_metadata(source, "big")
    assert got.worker.tensors == tensors


def test_get_metadata_answers_the_published_bytes_without_decoding_them(server, channel, make_identity):
    """The answer holds the published WorkerMetadata bytes verbatim (status and time apart)."""
    from sglang_mx.records import WorkerBytes

    worker = WorkerRecord(worker_rank=0, transfer_engine_session_id="h:1", status=SourceStatus.READY,
                          tensors=tuple(TensorDescriptor(f"t{i}", 4096 * (i + 1), 64) for i in range(1000)))
    request = pb.PublishMetadataRequest(identity=wire.identity_to_pb(make_identity()), worker=wire.worker_to_pb(worker),
                                        worker_id="w0")
    published = request.worker.SerializeToString()
    response = wire.P2pServiceStub(channel).PublishMetadata(request, timeout=5)
    raw = channel.unary_unary(f"/{wire.SERVICE_NAME}/GetMetadata")(
        pb.GetMetadataRequest(mx_source_id=response.mx_source_id, worker_id="w0").SerializeToString(), timeout=5)
    stored = server._store.get_bytes(response.mx_source_id, "w0")
    assert isinstance(stored, WorkerBytes) and stored.worker_bytes in raw
    parsed = pb.WorkerMetadata.FromString(published)
    parsed.ClearField("status")
    assert stored.worker_bytes == parsed.SerializeToString()  # what was published, less the status
