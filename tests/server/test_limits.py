"""Limits and bad input on a live server: overlapping tensors, absurd values, message sizes."""

from __future__ import annotations

import grpc
import pytest

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.errors import ServerError
from sglang_mx.server.limits import MAX_ID_CHARS, MAX_WORKER_RANK
from sglang_mx.records import SourceStatus, TensorDescriptor, WorkerRecord

pb = wire.messages
BASE = 0x7F00_0000_0000


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield wire.P2pServiceStub(channel)


def _publish(stub, make_identity, tensors=(), *, worker_id="w0", rank=0, **identity):
    request = pb.PublishMetadataRequest(
        identity=wire.identity_to_pb(make_identity(**identity)),
        worker=pb.WorkerMetadata(worker_rank=rank, transfer_engine_session_id="127.0.0.1:1",
                                 tensor_source=pb.TensorSourceMetadata(tensors=[
                                     pb.TensorDescriptor(name=n, addr=a, size=s, device_id=d)
                                     for n, a, s, d in ((*t, 0) if len(t) == 3 else t for t in tensors)])),
        worker_id=worker_id,
    )
    return stub.PublishMetadata(request, timeout=10)


def _nothing_stored(stub) -> bool:
    return list(stub.ListSources(pb.ListSourcesRequest(), timeout=5).instances) == []


REJECTED = {
    "partial overlap": ([("a", BASE, 4096), ("b", BASE + 4095, 10)],
                        "tensors 'a' and 'b' overlap on device 0: 'b' starts at 0x7f0000000fff, before 'a' ends at "
                        "0x7f0000001000; only identical (addr, size) aliases may share bytes"),
    "contained range": ([("big", BASE, 4096), ("inner", BASE + 16, 16)], "tensors 'big' and 'inner' overlap"),
    "same start, other size": ([("a", BASE, 16), ("b", BASE, 32)], "tensors 'a' and 'b' overlap"),
    "overlap past an alias": ([("a", BASE, 64), ("tied", BASE, 64), ("c", BASE + 32, 64)],
                              "tensors 'a' and 'c' overlap"),
    "overlap with a far earlier tensor": ([("long", BASE, 1 << 20), ("x", BASE + 4096, 8), ("y", BASE + 8192, 8)],
                                          "tensors 'long' and 'x' overlap"),
    "past 2**64": ([("end", 2**64 - 8, 16)], "tensor 'end' (16 bytes at 0xfffffffffffffff8) ends past the 64-bit"),
}


@pytest.mark.parametrize("case", list(REJECTED), ids=list(REJECTED))
def test_overlapping_ranges_are_rejected(stub, make_identity, case):
    tensors, message = REJECTED[case]
    response = _publish(stub, make_identity, tensors)
    assert response.success is False
    assert message in response.message
    assert _nothing_stored(stub)


def test_exact_aliases_touching_ranges_zero_sizes_and_other_devices_are_accepted(stub, client, make_identity):
    tensors = [
        ("embed", BASE, 4096), ("lm_head", BASE, 4096),  # tied: the same storage under two names
        ("next", BASE + 4096, 4096),  # starts where the previous ends
        ("empty", BASE + 100, 0), ("empty0", 0, 0),  # zero bytes overlap nothing
        ("gpu1", BASE, 4096, 1),  # the same address on another device
    ]
    response = _publish(stub, make_identity, tensors)
    assert response.success, response.message
    got = client.get_metadata(response.mx_source_id, "w0").worker.tensors
    assert [(t.name, t.addr, t.size, t.device_id) for t in got] == [
        (n, a, s, rest[0] if rest else 0) for n, a, s, *rest in tensors]


@pytest.mark.parametrize("edit, message", [
    ({"rank": MAX_WORKER_RANK + 1}, f"worker.worker_rank is {MAX_WORKER_RANK + 1}; the limit is {MAX_WORKER_RANK}"),
    ({"rank": 2**32 - 1}, f"the limit is {MAX_WORKER_RANK}"),
    ({"worker_id": "w" * (MAX_ID_CHARS + 1)}, f"worker_id is {MAX_ID_CHARS + 1} characters long; the limit is "
                                             f"{MAX_ID_CHARS}"),
    ({"model_name": "m" * 5000}, "identity.model_name is 5000 characters long"),
])
def test_absurd_values_are_invalid_argument(stub, make_identity, edit, message):
    with pytest.raises(grpc.RpcError) as info:
        _publish(stub, make_identity, [("a", BASE, 8)], **edit)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("PublishMetadata: ")
    assert message in info.value.details()
    assert _nothing_stored(stub)


def test_largest_allowed_values_are_accepted(stub, make_identity):
    response = _publish(stub, make_identity, [("a", BASE, 8)], rank=MAX_WORKER_RANK, worker_id="w" * MAX_ID_CHARS,
                        model_name="m" * MAX_ID_CHARS)
    assert response.success, response.message


def test_tensor_count_cap_is_configurable(make_server, make_identity):
    server = make_server(max_tensors=3)
    with grpc.insecure_channel(server.address) as channel:
        stub = wire.P2pServiceStub(channel)
        assert _publish(stub, make_identity, [(f"t{i}", BASE + i * 8, 8) for i in range(3)]).success
        with pytest.raises(grpc.RpcError) as info:
            _publish(stub, make_identity, [(f"t{i}", BASE + i * 8, 8) for i in range(4)], worker_id="w1")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "worker has 4 tensor descriptors; the limit is 3 per worker (--max-tensors)" in info.value.details()


@pytest.mark.parametrize("rpc, request_, says", [
    ("UpdateStatus", pb.UpdateStatusRequest(mx_source_id="s" * 2000, status=2),
     "UpdateStatus: mx_source_id is 2000 characters long; the limit is 1024"),
    ("UpdateStatus", pb.UpdateStatusRequest(mx_source_id="s", worker_id="w" * 1025, status=2),
     "UpdateStatus: worker_id is 1025 characters long"),
    ("GetMetadata", pb.GetMetadataRequest(mx_source_id="s", worker_id="w" * 1025), "GetMetadata: worker_id is 1025"),
    ("ListSources", pb.ListSourcesRequest(model_name_filter="m" * 1025), "ListSources: model_name_filter is 1025"),
], ids=["update-source", "update-worker", "get", "list"])
def test_over_long_ids_are_invalid_argument(stub, rpc, request_, says):
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in info.value.details()


def test_updated_at_from_the_client_is_ignored(stub, client, make_identity):
    request = pb.PublishMetadataRequest(
        identity=wire.identity_to_pb(make_identity()), worker_id="w0",
        worker=pb.WorkerMetadata(worker_rank=0, updated_at=2**62, status=2))
    response = stub.PublishMetadata(request, timeout=5)
    assert response.success
    assert client.get_metadata(response.mx_source_id, "w0").worker.updated_at_ms < 2**62


# --- message sizes ------------------------------------------------------------------------------------

def _worker(n: int) -> WorkerRecord:
    return WorkerRecord(worker_rank=0, transfer_engine_session_id="127.0.0.1:1", status=SourceStatus.READY, tensors=tuple(
        TensorDescriptor(name=f"model.layers.{i // 16}.mlp.experts.{i % 16}.down_proj.weight_scale_inv",
                         addr=BASE + i * 4096, size=4096, dtype="float8_e4m3fn")
        for i in range(n)))


@pytest.mark.slow  # 100,000 tensors both ways
def test_a_100k_tensor_rank_fits_the_defaults_both_ways(client, make_identity):
    worker = _worker(100_000)
    assert len(wire.worker_to_pb(worker).SerializeToString()) > 8 * 1024 * 1024
    source = client.publish(make_identity(), worker, "big")
    assert client.get_metadata(source, "big").worker.tensors == worker.tensors


def test_oversized_request_is_resource_exhausted_and_the_server_keeps_serving(make_server, make_identity):
    server = make_server(max_message_mb=1)
    worker = _worker(20_000)  # about 2 MB
    with MetadataClient(server.address, timeout_s=10) as client:
        with pytest.raises(ServerError) as info:
            client.publish(make_identity(), worker, "too-big")
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert client.list_sources() == []
        small = _worker(10)
        source = client.publish(make_identity(), small, "small")
        assert client.get_metadata(source, "small").worker.tensors == small.tensors


def test_client_receive_limit_is_resource_exhausted(server, make_identity):
    with MetadataClient(server.address, timeout_s=10) as big_client:
        source = big_client.publish(make_identity(), _worker(20_000), "w")
    with MetadataClient(server.address, timeout_s=10, max_message_mb=1) as small_client:
        with pytest.raises(ServerError) as info:
            small_client.get_metadata(source, "w")
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert [r.worker_id for r in small_client.list_sources()] == ["w"]
