"""A storm of random and malformed requests at a LIVE server (memory store), then checks that
it still serves and that a record published before the storm is intact.

Two kinds of input: well-typed protobuf requests with random (often absurd) field values,
and random bytes sent as raw request bodies through a generic channel.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.records import SourceStatus

pb = wire.messages
METHODS = ("PublishMetadata", "ListSources", "GetMetadata", "UpdateStatus")

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
# Most values plausible (so requests get past validation and reach the store), some absurd.
enum = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(-1, 12), i32)
name = st.one_of(st.sampled_from(["w0", "w1", "org/model", "Qwen/Qwen3-8B", "8b7aa4b533b72278"]),
                 st.text(min_size=1, max_size=20))
text = st.one_of(name, name, st.sampled_from(["", " ", "a" * 1025]),
                 st.text(alphabet="ab:/\x00", min_size=1000, max_size=1100))
present = st.integers(0, 9).map(lambda n: n != 9)  # there 90% of the time, and in the simplest example


@st.composite
def identities(draw):
    return pb.SourceIdentity(
        mx_version=draw(text), mx_source_type=draw(st.one_of(st.just(0), enum)), model_name=draw(text),
        backend_framework=draw(enum), tensor_parallel_size=draw(st.one_of(st.integers(0, 8), u32)),
        pipeline_parallel_size=draw(u32), expert_parallel_size=draw(u32), dtype=draw(text),
        quantization=draw(st.text(max_size=8)),
        extra_parameters=draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        revision=draw(st.text(max_size=8)),
    )


@st.composite
def tensor_lists(draw):
    base = 0x7F00_0000_0000
    n = draw(st.integers(0, 12))
    tensors = []
    for i in range(n):
        if draw(present):  # plausible: distinct name, its own 4 KiB slot
            tensors.append(pb.TensorDescriptor(name=f"model.layers.{i}.weight", addr=base + i * 4096,
                                               size=draw(st.integers(0, 4096)), dtype="bfloat16"))
        else:  # anything: empty or repeated names, overlaps, 64-bit extremes, other devices
            tensors.append(pb.TensorDescriptor(
                name=draw(st.one_of(st.text(max_size=10), st.sampled_from(["", "model.layers.0.weight"]))),
                addr=draw(st.one_of(u64, st.integers(base, base + 2**16))),
                size=draw(st.one_of(u64, st.integers(0, 8192))), device_id=draw(u32), dtype=draw(st.text(max_size=8))))
    return tensors


@st.composite
def publish_requests(draw):
    request = pb.PublishMetadataRequest(worker_id=draw(text), pod_name=draw(st.text(max_size=8)))
    if draw(present):
        request.identity.CopyFrom(draw(identities()))
    if draw(present):
        worker = request.worker
        worker.worker_rank = draw(st.one_of(st.integers(0, 8), u32))
        worker.status = draw(enum)
        worker.updated_at = draw(i64)
        worker.accelerator = draw(st.text(max_size=8))
        if draw(present):
            worker.transfer_engine_session_id = draw(text)
        else:
            worker.nixl_metadata = draw(st.binary(max_size=64))
        if draw(present):
            worker.tensor_source.tensors.extend(draw(tensor_lists()))
        else:
            worker.tensors.extend(draw(tensor_lists()))  # the deprecated field
    return request


@st.composite
def plausible_publishes(draw):
    """Valid apart from what the tensor list and rank throw in: these reach the store."""
    request = pb.PublishMetadataRequest(worker_id=draw(name))
    request.identity.model_name = draw(name)
    request.identity.backend_framework = draw(st.integers(0, 3))
    request.identity.tensor_parallel_size = draw(st.integers(1, 8))
    request.worker.worker_rank = draw(st.one_of(st.integers(0, 8), u32))
    request.worker.status = draw(st.integers(1, 3))
    request.worker.transfer_engine_session_id = "127.0.0.1:1"
    request.worker.tensor_source.tensors.extend(draw(tensor_lists()))
    return request


@st.composite
def list_requests(draw):
    request = pb.ListSourcesRequest()
    if draw(st.booleans()):
        request.identity.CopyFrom(draw(identities()))
    for field, strategy in (("status_filter", enum), ("model_name_filter", text),
                            ("worker_rank_filter", u32), ("min_updated_at", i64), ("limit", u32),
                            ("min_training_step", u64)):
        if draw(st.booleans()):
            setattr(request, field, draw(strategy))
    return request


@st.composite
def update_requests(draw):
    request = pb.UpdateStatusRequest(mx_source_id=draw(text), worker_id=draw(text), worker_rank=draw(u32),
                                     status=draw(enum))
    if draw(st.booleans()):
        request.source_load = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
    return request


typed_calls = st.one_of(
    st.tuples(st.just("PublishMetadata"), plausible_publishes()),
    st.tuples(st.just("PublishMetadata"), publish_requests()),
    st.tuples(st.just("ListSources"), list_requests()),
    st.tuples(st.just("GetMetadata"), st.builds(pb.GetMetadataRequest, mx_source_id=text, worker_id=text)),
    st.tuples(st.just("UpdateStatus"), update_requests()),
)
RAW_PATHS = [f"/{wire.SERVICE_NAME}/{m}" for m in METHODS] + [f"/{wire.SERVICE_NAME}/Nope", "/x/y"]
raw_calls = st.tuples(
    st.sampled_from(RAW_PATHS),
    st.one_of(st.binary(max_size=2048), typed_calls.map(lambda c: c[1].SerializeToString()[::-1])),
)

# What a server that handled the input may answer; UNKNOWN would mean an exception escaped a handler.
TYPED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
RAW_CODES = TYPED_CODES | {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}  # undecodable, unknown method


def _code(call) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as e:
        return e.code(), e.details()


def test_server_survives_a_storm_of_random_requests(make_identity, make_worker):
    options = ServerOptions(host="127.0.0.1", port=0, heartbeat_timeout_s=3600)
    with MetadataServer(options) as server, grpc.insecure_channel(server.address) as channel, \
            MetadataClient(server.address, timeout_s=10) as client:
        keep_identity = make_identity(model_name="org/kept-before-the-storm")
        kept = make_worker(n_tensors=50, status=SourceStatus.READY)
        kept_source = client.publish(keep_identity, kept, "kept")
        stub = wire.P2pServiceStub(channel)
        raw = {path: channel.unary_unary(path) for path in RAW_PATHS}  # bytes in, bytes out

        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(typed=typed_calls, raw_call=raw_calls)
        def storm(typed, raw_call):
            method, request = typed
            code, answer = _code(lambda: getattr(stub, method)(request, timeout=10))
            assert code in TYPED_CODES, f"{method} answered {code}: {answer}\n{request}"
            if method == "PublishMetadata" and code == grpc.StatusCode.OK and answer.success:
                # Accepted means stored whole.
                got = stub.GetMetadata(pb.GetMetadataRequest(mx_source_id=answer.mx_source_id,
                                                             worker_id=request.worker_id), timeout=10)
                assert got.found
                sent = request.worker.tensor_source.tensors or request.worker.tensors
                assert [t.name for t in got.worker.tensor_source.tensors] == [t.name for t in sent]
            path, body = raw_call
            code, answer = _code(lambda: raw[path](body, timeout=10))
            assert code in RAW_CODES, f"{path} with {body!r} answered {code}: {answer}"

        storm()

        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        after = make_identity(model_name="org/published-after-the-storm")
        source = client.publish(after, make_worker(n_tensors=7), "after")
        assert [r.worker_id for r in client.list_sources(after)] == ["after"]
        assert client.get_metadata(source, "after").worker.tensors == make_worker(n_tensors=7).tensors
        intact = client.get_metadata(kept_source, "kept")
        assert intact is not None
        assert intact.identity == keep_identity
        assert intact.worker.tensors == kept.tensors
        assert intact.worker.status == SourceStatus.READY
        assert intact.worker.transfer_engine_session_id == kept.transfer_engine_session_id
