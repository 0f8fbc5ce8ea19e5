"""sglang_mx.wire: the generated code is fresh, wire-compatible with ModelExpress 0.7.0, and the
plain <-> protobuf conversions round-trip."""

from __future__ import annotations

import base64
import importlib.util
import pathlib
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from sglang_mx import wire
from sglang_mx.server import framing
from sglang_mx._proto import p2p_pb2
from sglang_mx.records import (
    BackendFramework,
    PieceDigest,
    ShardSpec,
    Span,
    SourceIdentity,
    SourceRef,
    SourceStatus,
    SourceType,
    TensorDescriptor,
    WorkerBytes,
    WorkerRecord,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE = "model_express.p2p"
pb = wire.messages


# --- (a) the committed generated code matches proto/p2p.proto -------------------------------------

def _strip_json_names(messages) -> None:
    # protoc's descriptor set carries json_name; the Python generator leaves it out.
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


# Serialized records, as a tool would make them (the server stores what wire.encode_published makes).
def encode_worker(worker: WorkerRecord) -> bytes:
    return wire.worker_to_pb(worker).SerializeToString()


def decode_worker(data: bytes) -> WorkerRecord:
    return wire.worker_from_pb(p2p_pb2.WorkerMetadata.FromString(data))


def encode_identity(identity: SourceIdentity) -> bytes:
    return wire.identity_to_pb(identity).SerializeToString()


def decode_identity(data: bytes) -> SourceIdentity:
    return wire.identity_from_pb(p2p_pb2.SourceIdentity.FromString(data))


def test_generated_code_is_fresh(tmp_path):
    out = tmp_path / "p2p.pb"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}", str(PROTO_DIR / "p2p.proto")])
    assert rc == 0, "protoc could not compile proto/p2p.proto"
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    [from_proto] = [f for f in compiled.file if f.name == "p2p.proto"]
    _strip_json_names(from_proto.message_type)
    committed = descriptor_pb2.FileDescriptorProto()
    p2p_pb2.DESCRIPTOR.CopyToProto(committed)
    assert committed == from_proto, (
        "sglang_mx/_proto/p2p_pb2.py is out of date with proto/p2p.proto; run `python proto/generate.py`"
    )


def test_grpc_module_imports_its_messages_relatively():
    text = (ROOT / "sglang_mx" / "_proto" / "p2p_pb2_grpc.py").read_text()
    assert "from . import p2p_pb2 as" in text, "run `python proto/generate.py` (it fixes the import)"


# --- (b) compatible with the descriptor shipped in the modelexpress 0.7.0 wheel -------------------

@pytest.fixture(scope="module")
def theirs() -> descriptor_pb2.FileDescriptorProto:
    if importlib.util.find_spec("modelexpress") is None:
        pytest.skip("modelexpress is not installed (pip install --no-deps modelexpress==0.7.0)")
    # A subprocess: both descriptors register "p2p.proto" in the default pool.
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compat" / "mx_descriptor.py")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(done.stdout.strip()))


@pytest.fixture(scope="module")
def ours() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    p2p_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def _messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message, nested ones included, by fully qualified name ('.pkg.Outer.Inner')."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, messages) -> None:
        for m in messages:
            name = f"{prefix}.{m.name}"
            found[name] = m
            walk(name, m.nested_type)

    walk(f".{file.package}", file.message_type)
    return found


def _field_shape(message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto) -> dict:
    return {
        "number": field.number,
        "type": descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
        "type_name": field.type_name,
        "label": descriptor_pb2.FieldDescriptorProto.Label.Name(field.label),
        "oneof": message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None,
        "proto3_optional": field.proto3_optional,
    }


def test_same_package(ours, theirs):
    assert ours.package == theirs.package == PACKAGE


# Fields sglang-mx adds to ModelExpress's messages, with numbers ModelExpress does not use.
EXTENSIONS = {(f".{PACKAGE}.TensorDescriptor", "mx_digest"): 1000,
              (f".{PACKAGE}.TensorDescriptor", "mx_shard"): 1001,
              (f".{PACKAGE}.TensorDescriptor", "mx_pieces"): 1002,
              (f".{PACKAGE}.TensorDescriptor", "mx_digest_origin"): 1003,
              (f".{PACKAGE}.TensorDescriptor", "mx_chunk_bytes"): 1004,
              (f".{PACKAGE}.TensorDescriptor", "mx_chunk_digests"): 1005,
              (f".{PACKAGE}.PrepareTensorReadRequest", "mx_renew_lease_id"): 1000,
              (f".{PACKAGE}.PrepareTensorReadResponse", "mx_lease_ttl_ms"): 1000,
              (f".{PACKAGE}.UpdateStatusRequest", "mx_verified_bytes"): 1000}
# Messages only our extensions use (a ModelExpress client keeps them inside the unknown fields), and
# those of our own services.
OUR_MESSAGES = {f".{PACKAGE}.{name}" for name in (
    "MxShard", "MxSpan", "MxPieceDigest", "MxWatchSourcesRequest", "MxSourceEvent", "MxWatchVerifiedRequest",
    "MxVerifiedUpdate")}
# Services only sglang-mx serves: the metadata server's watch, a partial seed's verified tensors.
OUR_SERVICES = {"MxWatchService", "MxPipelineService"}


def test_our_extensions_use_numbers_modelexpress_does_not(ours, theirs):
    their_messages = _messages(theirs)
    for (message, field), number in EXTENSIONS.items():
        [mine] = [f for f in _messages(ours)[message].field if f.name == field]
        assert mine.number == number
        assert number not in {f.number for f in their_messages[message].field}
        assert field not in {f.name for f in their_messages[message].field}


def test_every_message_of_ours_matches_theirs(ours, theirs):
    their_messages = _messages(theirs)
    problems = []
    for name, message in _messages(ours).items():
        other = their_messages.get(name)
        if name in OUR_MESSAGES:
            assert other is None, f"modelexpress now has a message {name}: rename ours"
            continue
        if other is None:
            problems.append(f"message {name} is not in modelexpress")
            continue
        their_fields = {f.name: f for f in other.field}
        for field in message.field:
            if (name, field.name) in EXTENSIONS:
                continue
            if field.name not in their_fields:
                problems.append(f"{name}.{field.name} is not in modelexpress")
                continue
            mine, yours = _field_shape(message, field), _field_shape(other, their_fields[field.name])
            if mine != yours:
                problems.append(f"{name}.{field.name}: ours {mine} != modelexpress {yours}")
    assert not problems, "\n".join(problems)


def test_every_enum_of_ours_matches_theirs(ours, theirs):
    their_enums = {e.name: {v.name: v.number for v in e.value} for e in theirs.enum_type}
    for enum in ours.enum_type:
        assert enum.name in their_enums, f"enum {enum.name} is not in modelexpress"
        assert {v.name: v.number for v in enum.value} == their_enums[enum.name], enum.name


def _methods(file, service_name: str) -> dict[str, tuple[str, str]]:
    [service] = [s for s in file.service if s.name == service_name]
    return {m.name: (m.input_type, m.output_type) for m in service.method}


def test_services_of_ours_exist_in_theirs(ours, theirs):
    their_services = {s.name for s in theirs.service}
    for service in ours.service:
        if service.name in OUR_SERVICES:
            assert service.name not in their_services, f"modelexpress now has a service {service.name}: rename ours"
            assert service.name.startswith("Mx")
            continue
        assert service.name in their_services, f"service {service.name} is not in modelexpress"
        assert _methods(ours, service.name).items() <= _methods(theirs, service.name).items()


def test_every_p2p_method_of_theirs_exists_in_ours(ours, theirs):
    mine, yours = _methods(ours, "P2pService"), _methods(theirs, "P2pService")
    assert yours == mine, f"modelexpress P2pService methods {yours} != ours {mine}"


def test_every_field_of_theirs_that_p2p_service_uses_is_ours(ours, theirs):
    their_messages, our_messages = _messages(theirs), _messages(ours)
    their_enums = {f".{theirs.package}.{e.name}": e for e in theirs.enum_type}
    our_enums = {f".{ours.package}.{e.name}": e for e in ours.enum_type}
    pending = [t for pair in _methods(theirs, "P2pService").values() for t in pair]
    seen: set[str] = set()
    missing: list[str] = []
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in their_enums:
            our_values = {v.number for v in our_enums[name].value} if name in our_enums else set()
            missing += [f"{name}.{v.name} = {v.number}" for v in their_enums[name].value if v.number not in our_values]
            continue
        message = their_messages[name]
        ours_here = our_messages.get(name)
        our_fields = {(f.name, f.number) for f in ours_here.field} if ours_here else set()
        for field in message.field:
            if (field.name, field.number) not in our_fields:
                missing.append(f"{name}.{field.name} = {field.number}")
            if field.type_name:
                pending.append(field.type_name)
    assert len(seen) > 10  # the walk really went through the messages
    assert not missing, "fields of modelexpress 0.7.0 that our proto lacks:\n" + "\n".join(sorted(missing))


# --- (c) conversions ---------------------------------------------------------------------------------

FULL_IDENTITY = SourceIdentity(
    mx_version="0.7.0",
    mx_source_type=SourceType.WEIGHTS,
    model_name="Qwen/Qwen3-8B",
    backend_framework=BackendFramework.SGLANG,
    tensor_parallel_size=2,
    pipeline_parallel_size=3,
    expert_parallel_size=4,
    dtype="bfloat16",
    quantization="fp8",
    extra_parameters={"a": "1", "B": "2"},
    revision="rev",
    backend_framework_version="0.5.23",
    torch_version="2.13.0",
    cuda_version="12.8",
    triton_version="3.4.0",
    gpu_arch="sm90",
    compile_config_digest="d1g3st",
)
TENSORS = (
    TensorDescriptor(name="w0", addr=0x7F0000001000, size=2**40, dtype="bfloat16", device_id=3),
    TensorDescriptor(name="w1", addr=2**64 - 4096, size=4096, dtype="float8_e4m3fn", device_id=0),
    TensorDescriptor(name="empty", addr=0, size=0),
)


def test_identity_round_trip():
    msg = wire.identity_to_pb(FULL_IDENTITY)
    assert msg.backend_framework == pb.BACKEND_FRAMEWORK_SGLANG
    assert dict(msg.extra_parameters) == {"a": "1", "B": "2"}
    assert wire.identity_from_pb(msg) == FULL_IDENTITY
    assert decode_identity(encode_identity(FULL_IDENTITY)) == FULL_IDENTITY


def test_identity_from_pb_gives_plain_enums():
    identity = wire.identity_from_pb(wire.identity_to_pb(FULL_IDENTITY))
    assert type(identity.backend_framework) is BackendFramework
    assert type(identity.mx_source_type) is SourceType


def test_digest_round_trips_and_modelexpress_keeps_it_as_an_unknown_field(theirs):
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()  # their descriptor, apart from ours
    pool.Add(theirs)
    their_worker = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.WorkerMetadata"))
    worker = WorkerRecord(worker_rank=0, transfer_engine_session_id="h:1", tensors=(
        TensorDescriptor(name="w", addr=4096, size=8, dtype="bfloat16", digest="xxh3-64:0123456789abcdef"),))
    data = encode_worker(worker)
    assert decode_worker(data).tensors[0].digest == "xxh3-64:0123456789abcdef"
    parsed = their_worker.FromString(data)  # modelexpress 0.7.0's own descriptor
    assert parsed.tensor_source.tensors[0].name == "w" and parsed.tensor_source.tensors[0].size == 8
    # A ModelExpress server that stores and re-serializes the record keeps our field.
    assert decode_worker(parsed.SerializeToString()).tensors[0].digest == "xxh3-64:0123456789abcdef"


def test_split_facts_round_trip_and_modelexpress_keeps_them_as_unknown_fields(theirs):
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(theirs)
    their_worker = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.WorkerMetadata"))
    shard = ShardSpec(dim=0, shape=(48, 16), parts=(32, 16, 16), spans=(Span(0, 16, 16), Span(16, 40, 8), Span(24, 56, 8)))
    pieces = (PieceDigest(16, 4, "xxh3-64:0123456789abcdef"), PieceDigest(20, 4, "xxh3-64:fedcba9876543210"))
    tensors = (TensorDescriptor(name="qkv", addr=4096, size=1536, dtype="bfloat16", shard=shard, pieces=pieces),
               TensorDescriptor(name="norm", addr=8192, size=32, shard=ShardSpec(dim=-1, shape=(16,))),
               TensorDescriptor(name="bare", addr=16384, size=8),
               TensorDescriptor(name="chunked", addr=32768, size=10000, digest="xxh3-64:" + "1" * 16, chunk_bytes=4096,
                                chunks=("xxh3-64:" + "2" * 16, "xxh3-64:" + "3" * 16, "xxh3-64:" + "4" * 16)))
    data = encode_worker(WorkerRecord(worker_rank=1, transfer_engine_session_id="h:1", tensors=tensors))
    assert decode_worker(data).tensors == tensors
    parsed = their_worker.FromString(data)  # modelexpress 0.7.0's own descriptor
    assert [t.name for t in parsed.tensor_source.tensors] == ["qkv", "norm", "bare", "chunked"]
    assert decode_worker(parsed.SerializeToString()).tensors == tensors


def test_worker_round_trip_with_transfer_engine_session():
    worker = WorkerRecord(
        worker_rank=5, transfer_engine_session_id="10.0.0.1:15000", tensors=TENSORS, status=SourceStatus.READY,
        updated_at_ms=1_700_000_000_123, metadata_endpoint="m:1", agent_name="agent", worker_grpc_endpoint="w:2",
        accelerator="h100", topology={"node": "n1", "rack": "r2"},
    )
    msg = wire.worker_to_pb(worker)
    assert msg.WhichOneof("backend_metadata") == "transfer_engine_session_id"
    assert msg.WhichOneof("source_payload") == "tensor_source"
    assert len(msg.tensors) == 0, "the deprecated field 3 must not be written"
    assert wire.worker_from_pb(msg) == worker
    assert decode_worker(encode_worker(worker)) == worker


def test_worker_round_trip_with_nixl_metadata():
    worker = WorkerRecord(worker_rank=0, nixl_metadata=b"\x00\x01nixl\xff", tensors=TENSORS[:1])
    msg = wire.worker_to_pb(worker)
    assert msg.WhichOneof("backend_metadata") == "nixl_metadata"
    back = wire.worker_from_pb(msg)
    assert back == worker
    assert back.transfer_engine_session_id == ""


def test_worker_without_backend_metadata_sets_no_oneof():
    msg = wire.worker_to_pb(WorkerRecord(worker_rank=0))
    assert msg.WhichOneof("backend_metadata") is None


def test_worker_reads_deprecated_tensors_when_tensor_source_absent():
    msg = pb.WorkerMetadata(worker_rank=1, tensors=[pb.TensorDescriptor(name="old", addr=4096, size=8, dtype="f32")])
    assert not msg.HasField("tensor_source")
    assert wire.worker_from_pb(msg).tensors == (TensorDescriptor(name="old", addr=4096, size=8, dtype="f32"),)


def test_worker_prefers_tensor_source_over_deprecated_tensors():
    msg = pb.WorkerMetadata(
        worker_rank=1,
        tensors=[pb.TensorDescriptor(name="old", addr=4096, size=8)],
        tensor_source=pb.TensorSourceMetadata(tensors=[pb.TensorDescriptor(name="new", addr=8192, size=16)]),
    )
    assert [t.name for t in wire.worker_from_pb(msg).tensors] == ["new"]


def test_worker_with_empty_tensor_source_does_not_fall_back():
    msg = pb.WorkerMetadata(tensors=[pb.TensorDescriptor(name="old", addr=4096, size=8)])
    msg.tensor_source.SetInParent()
    assert wire.worker_from_pb(msg).tensors == ()


def test_ref_round_trip():
    ref = SourceRef(
        mx_source_id="8b7aa4b533b72278", worker_id="w-1", model_name="Qwen/Qwen3-8B", worker_rank=3,
        status=SourceStatus.READY, updated_at_ms=1_700_000_000_000, accelerator="h200",
        topology={"node": "a"}, source_load=0.5,
    )
    msg = wire.ref_to_pb(ref)
    assert msg.HasField("source_load")
    assert wire.ref_from_pb(msg, SourceStatus.READY) == ref


def test_ref_without_source_load_leaves_it_unset():
    ref = SourceRef(mx_source_id="x", worker_id="w", model_name="m", worker_rank=0,
                    status=SourceStatus.STALE, updated_at_ms=1)
    msg = wire.ref_to_pb(ref)
    assert not msg.HasField("source_load")
    assert wire.ref_from_pb(msg, SourceStatus.STALE) == ref


def test_query_from_pb_unset_fields_are_none():
    query = wire.query_from_pb(pb.ListSourcesRequest(), None)
    assert (query.status, query.model_name, query.worker_rank, query.min_updated_at_ms, query.limit) == (None,) * 5


def test_query_from_pb_set_fields_including_zero():
    msg = pb.ListSourcesRequest(status_filter=pb.SOURCE_STATUS_UNKNOWN, model_name_filter="", worker_rank_filter=0,
                                min_updated_at=0, limit=0)
    query = wire.query_from_pb(msg, "abc")
    assert query.mx_source_id == "abc"
    assert (query.status, query.model_name, query.worker_rank, query.min_updated_at_ms, query.limit) == (
        SourceStatus.UNKNOWN, "", 0, 0, 0
    )


@pytest.mark.parametrize(
    "convert, msg, named",
    [
        (wire.identity_from_pb, pb.SourceIdentity(model_name="m", backend_framework=99), "identity.backend_framework=99"),
        (wire.identity_from_pb, pb.SourceIdentity(model_name="m", mx_source_type=42), "identity.mx_source_type=42"),
        (wire.worker_from_pb, pb.WorkerMetadata(status=7), "worker.status=7"),
        (lambda m: wire.query_from_pb(m, None), pb.ListSourcesRequest(status_filter=9), "status_filter=9"),
    ],
)
def test_unknown_enum_value_is_a_wire_error(convert, msg, named):
    with pytest.raises(wire.WireError, match=named) as info:
        convert(msg)
    assert "allowed:" in str(info.value)


# --- stored bytes -------------------------------------------------------------------------------------

def _stored(worker: WorkerRecord, *, legacy: bool = False) -> WorkerBytes:
    identity = SourceIdentity(model_name="org/m", tensor_parallel_size=2)
    if legacy:  # what earlier servers kept in Redis: status and updated_at inside the worker bytes
        worker_bytes = wire.worker_to_pb(worker).SerializeToString()
    else:
        worker_bytes = wire.encode_record("src", "w", identity, worker).worker_bytes
    return WorkerBytes(wire.identity_to_pb(identity).SerializeToString(), worker_bytes, SourceStatus.READY,
                       1_700_000_000_123)


def test_published_bytes_carry_no_status_and_the_answer_appends_the_current_one():
    worker = WorkerRecord(worker_rank=3, transfer_engine_session_id="h:1", status=SourceStatus.INITIALIZING,
                          updated_at_ms=5, tensors=(TensorDescriptor("a", 4096, 8),))
    stored = _stored(worker)
    parsed = pb.WorkerMetadata.FromString(stored.worker_bytes)
    assert (parsed.status, parsed.updated_at) == (0, 0)
    response = pb.GetMetadataResponse.FromString(framing.get_response_bytes(stored, mx_source_id="src", worker_id="w"))
    assert response.found and (response.mx_source_id, response.worker_id) == ("src", "w")
    assert (response.worker.status, response.worker.updated_at) == (SourceStatus.READY, 1_700_000_000_123)
    assert response.worker.worker_rank == 3 and response.identity.model_name == "org/m"


def test_encode_published_moves_deprecated_tensors_and_drops_unknown_fields():
    request = pb.PublishMetadataRequest(identity=pb.SourceIdentity(model_name="m"), worker_id="w",
                                        worker=pb.WorkerMetadata(worker_rank=1, status=2, updated_at=9))
    request.worker.tensors.add(name="old", addr=4096, size=8)
    data = request.SerializeToString() + b"\xf8\x07\x01"  # field 127, varint: unknown to everyone
    record = wire.encode_published(pb.PublishMetadataRequest.FromString(data), mx_source_id="s",
                                   status=SourceStatus.READY, updated_at_ms=7)
    worker = pb.WorkerMetadata.FromString(record.worker_bytes)
    assert [t.name for t in worker.tensor_source.tensors] == ["old"] and len(worker.tensors) == 0
    assert (record.status, record.updated_at_ms, record.tensor_count, record.worker_rank) == (SourceStatus.READY, 7, 1, 1)


@pytest.mark.parametrize("legacy", [False, True], ids=["stored-without-status", "legacy-with-status"])
def test_modelexpress_own_parser_reads_the_framed_answer(legacy):
    """The real 0.7.0 generated code parses our hand-framed GetMetadataResponse, and for a legacy
    record (status inside the stored bytes) the appended status wins (protobuf: last one wins)."""
    import json

    if importlib.util.find_spec("modelexpress") is None:
        pytest.skip("modelexpress is not installed")
    worker = WorkerRecord(worker_rank=1, transfer_engine_session_id="127.0.0.1:7", status=SourceStatus.STALE,
                          updated_at_ms=5, tensors=tuple(TensorDescriptor(f"t{i}", 4096 * (i + 1), 64)
                                                         for i in range(300)))
    data = framing.get_response_bytes(_stored(worker, legacy=legacy), mx_source_id="src", worker_id="w")
    done = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "compat" / "mx_parse.py")],
                          input=base64.b64encode(data).decode() + "\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert (got["found"], got["mx_source_id"], got["worker_id"], got["model_name"]) == (True, "src", "w", "org/m")
    assert (got["status"], got["updated_at"]) == (int(SourceStatus.READY), 1_700_000_000_123)
    assert (got["rank"], got["session"]) == (1, "127.0.0.1:7")
    assert got["tensors"] == [[t.name, t.addr, t.size] for t in worker.tensors]
