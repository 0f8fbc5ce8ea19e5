"""The wire: the only module that touches generated protobuf types.

Everything else speaks the plain types of `sglang_mx.records`; this module
converts in both directions and exposes the generated service stubs.
"""

from __future__ import annotations

import dataclasses

from typing import Sequence

import grpc

from sglang_mx._proto import p2p_pb2 as pb
from sglang_mx._proto import p2p_pb2_grpc as pb_grpc
from sglang_mx.records import (
    BackendFramework,
    EncodedWorker,
    PieceDigest,
    ShardSpec,
    TOPOLOGY_VERIFIED_BYTES,
    SourceEvent,
    SourceIdentity,
    SourceQuery,
    SourceRef,
    SourceStatus,
    SourceType,
    Span,
    StoredWorker,
    TensorDescriptor,
    WorkerBytes,
    WorkerRecord,
)
from sglang_mx.tree import Waiting

SERVICE_NAME = "model_express.p2p.P2pService"
WATCH_SERVICE_NAME = "model_express.p2p.MxWatchService"  # sglang-mx's own: a ModelExpress server has none

# Re-exported so that the client and server never import _proto themselves.
P2pServiceStub = pb_grpc.P2pServiceStub
P2pServiceServicer = pb_grpc.P2pServiceServicer
MxWatchServiceStub = pb_grpc.MxWatchServiceStub
messages = pb  # for tests and benchmarks that speak raw protobuf on purpose


class WireError(ValueError):
    """A message holds a value our plain types cannot represent."""


def _enum(enum_type, value: int, field: str):
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(f"{m.value} ({m.name})" for m in enum_type)
        raise WireError(f"{field}={value} is not a known value; allowed: {allowed}") from None


def status_from_pb(value: int, field: str = "status") -> SourceStatus:
    return _enum(SourceStatus, value, field)


# --- SourceIdentity -------------------------------------------------------

def identity_to_pb(identity: SourceIdentity) -> pb.SourceIdentity:
    return pb.SourceIdentity(
        mx_version=identity.mx_version,
        mx_source_type=int(identity.mx_source_type),
        model_name=identity.model_name,
        backend_framework=int(identity.backend_framework),
        tensor_parallel_size=identity.tensor_parallel_size,
        pipeline_parallel_size=identity.pipeline_parallel_size,
        expert_parallel_size=identity.expert_parallel_size,
        dtype=identity.dtype,
        quantization=identity.quantization,
        extra_parameters=dict(identity.extra_parameters),
        revision=identity.revision,
        backend_framework_version=identity.backend_framework_version,
        torch_version=identity.torch_version,
        cuda_version=identity.cuda_version,
        triton_version=identity.triton_version,
        gpu_arch=identity.gpu_arch,
        compile_config_digest=identity.compile_config_digest,
    )


def identity_from_pb(msg: pb.SourceIdentity) -> SourceIdentity:
    return SourceIdentity(
        mx_version=msg.mx_version,
        mx_source_type=_enum(SourceType, msg.mx_source_type, "identity.mx_source_type"),
        model_name=msg.model_name,
        backend_framework=_enum(BackendFramework, msg.backend_framework, "identity.backend_framework"),
        tensor_parallel_size=msg.tensor_parallel_size,
        pipeline_parallel_size=msg.pipeline_parallel_size,
        expert_parallel_size=msg.expert_parallel_size,
        dtype=msg.dtype,
        quantization=msg.quantization,
        extra_parameters=dict(msg.extra_parameters),
        revision=msg.revision,
        backend_framework_version=msg.backend_framework_version,
        torch_version=msg.torch_version,
        cuda_version=msg.cuda_version,
        triton_version=msg.triton_version,
        gpu_arch=msg.gpu_arch,
        compile_config_digest=msg.compile_config_digest,
    )


# --- WorkerMetadata -------------------------------------------------------

def _tensor_to_pb(t: TensorDescriptor) -> pb.TensorDescriptor:
    msg = pb.TensorDescriptor(name=t.name, addr=t.addr, size=t.size, device_id=t.device_id, dtype=t.dtype,
                              mx_digest=t.digest, mx_digest_origin=t.digest_origin, mx_chunk_bytes=t.chunk_bytes,
                              mx_chunk_digests=t.chunks)
    if t.shard is not None:
        msg.mx_shard.CopyFrom(pb.MxShard(
            dim=t.shard.dim, shape=t.shard.shape, parts=t.shard.parts,
            spans=[pb.MxSpan(local_start=s.local_start, global_start=s.global_start, length=s.length)
                   for s in t.shard.spans]))
    msg.mx_pieces.extend(pb.MxPieceDigest(global_start=p.global_start, length=p.length, digest=p.digest)
                         for p in t.pieces)
    return msg


def _tensor_from_pb(t: pb.TensorDescriptor) -> TensorDescriptor:
    shard = None
    if t.HasField("mx_shard"):
        s = t.mx_shard
        shard = ShardSpec(dim=s.dim, shape=tuple(s.shape), parts=tuple(s.parts),
                          spans=tuple(Span(x.local_start, x.global_start, x.length) for x in s.spans))
    return TensorDescriptor(name=t.name, addr=t.addr, size=t.size, dtype=t.dtype, device_id=t.device_id,
                            digest=t.mx_digest, digest_origin=t.mx_digest_origin, shard=shard,
                            pieces=tuple(PieceDigest(p.global_start, p.length, p.digest) for p in t.mx_pieces),
                            chunk_bytes=t.mx_chunk_bytes, chunks=tuple(t.mx_chunk_digests))


def worker_to_pb(worker: WorkerRecord) -> pb.WorkerMetadata:
    msg = pb.WorkerMetadata(
        worker_rank=worker.worker_rank,
        status=int(worker.status),
        updated_at=worker.updated_at_ms,
        metadata_endpoint=worker.metadata_endpoint,
        agent_name=worker.agent_name,
        worker_grpc_endpoint=worker.worker_grpc_endpoint,
        accelerator=worker.accelerator,
        topology=dict(worker.topology),
        tensor_source=pb.TensorSourceMetadata(tensors=[_tensor_to_pb(t) for t in worker.tensors]),
    )
    if worker.transfer_engine_session_id:
        msg.transfer_engine_session_id = worker.transfer_engine_session_id
    elif worker.nixl_metadata:
        msg.nixl_metadata = worker.nixl_metadata
    return msg


def worker_from_pb(msg: pb.WorkerMetadata) -> WorkerRecord:
    # tensor_source supersedes the deprecated top-level `tensors`; read either.
    tensors = msg.tensor_source.tensors if msg.HasField("tensor_source") else msg.tensors
    return WorkerRecord(
        worker_rank=msg.worker_rank,
        transfer_engine_session_id=msg.transfer_engine_session_id,
        nixl_metadata=msg.nixl_metadata,
        tensors=tuple(_tensor_from_pb(t) for t in tensors),
        status=_enum(SourceStatus, msg.status, "worker.status"),
        updated_at_ms=msg.updated_at,
        metadata_endpoint=msg.metadata_endpoint,
        agent_name=msg.agent_name,
        worker_grpc_endpoint=msg.worker_grpc_endpoint,
        accelerator=msg.accelerator,
        topology=dict(msg.topology),
    )


# --- Listing --------------------------------------------------------------

def ref_to_pb(ref: SourceRef) -> pb.SourceInstanceRef:
    msg = pb.SourceInstanceRef(
        mx_source_id=ref.mx_source_id,
        worker_id=ref.worker_id,
        model_name=ref.model_name,
        worker_rank=ref.worker_rank,
        accelerator=ref.accelerator,
        updated_at=ref.updated_at_ms,
        topology=dict(ref.topology),
    )
    if ref.source_load is not None:
        msg.source_load = ref.source_load
    return msg


def ref_from_pb(msg: pb.SourceInstanceRef, status: SourceStatus) -> SourceRef:
    """The wire ref carries no status: the caller knows what it filtered on."""
    return SourceRef(
        mx_source_id=msg.mx_source_id,
        worker_id=msg.worker_id,
        model_name=msg.model_name,
        worker_rank=msg.worker_rank,
        status=status,
        updated_at_ms=msg.updated_at,
        accelerator=msg.accelerator,
        topology=dict(msg.topology),
        source_load=msg.source_load if msg.HasField("source_load") else None,
    )


def query_from_pb(msg: pb.ListSourcesRequest, mx_source_id: str | None) -> SourceQuery:
    return SourceQuery(
        mx_source_id=mx_source_id,
        status=_enum(SourceStatus, msg.status_filter, "status_filter") if msg.HasField("status_filter") else None,
        model_name=msg.model_name_filter if msg.HasField("model_name_filter") else None,
        worker_rank=msg.worker_rank_filter if msg.HasField("worker_rank_filter") else None,
        min_updated_at_ms=msg.min_updated_at if msg.HasField("min_updated_at") else None,
        limit=msg.limit if msg.HasField("limit") else None,
    )


# --- Requests (client side) -------------------------------------------------

def publish_request(identity: SourceIdentity, worker: WorkerRecord, worker_id: str) -> pb.PublishMetadataRequest:
    return pb.PublishMetadataRequest(identity=identity_to_pb(identity), worker=worker_to_pb(worker), worker_id=worker_id)


def list_request(
    identity: SourceIdentity | None = None,
    *,
    status: SourceStatus | None = None,
    worker_rank: int | None = None,
    model_name: str | None = None,
    limit: int | None = None,
) -> pb.ListSourcesRequest:
    request = pb.ListSourcesRequest()
    if identity is not None:
        request.identity.CopyFrom(identity_to_pb(identity))
    if status is not None:
        request.status_filter = int(status)
    if worker_rank is not None:
        request.worker_rank_filter = worker_rank
    if model_name is not None:
        request.model_name_filter = model_name
    if limit is not None:
        request.limit = limit
    return request


def get_request(mx_source_id: str, worker_id: str) -> pb.GetMetadataRequest:
    return pb.GetMetadataRequest(mx_source_id=mx_source_id, worker_id=worker_id)


def update_status_request(mx_source_id: str, worker_id: str, worker_rank: int,
                          status: SourceStatus, source_load: float | None = None,
                          verified_bytes: int | None = None) -> pb.UpdateStatusRequest:
    request = pb.UpdateStatusRequest(mx_source_id=mx_source_id, worker_id=worker_id, worker_rank=worker_rank,
                                     status=int(status))
    if source_load is not None:
        request.source_load = source_load
    if verified_bytes is not None:
        request.mx_verified_bytes = verified_bytes
    return request


def watch_request(mx_source_id: str, *, worker_rank: int | None = None, progress: bool = False,
                  waiting: Waiting | None = None) -> pb.MxWatchSourcesRequest:
    request = pb.MxWatchSourcesRequest(mx_source_id=mx_source_id, progress=progress)
    if worker_rank is not None:
        request.worker_rank = worker_rank
    if waiting is not None:
        request.useful_only, request.pipeline = True, waiting.pipeline
        request.depth, request.worker_id = waiting.depth or 0, waiting.worker_id
    return request


def waiting_from_request(request: pb.MxWatchSourcesRequest) -> Waiting | None:
    """The waiting target a watch request describes (`useful_only`), or None for a plain watch."""
    if not request.useful_only:
        return None
    return Waiting(pipeline=request.pipeline, depth=request.depth or None, worker_id=request.worker_id)


def source_event_from_pb(msg: pb.MxSourceEvent) -> SourceEvent:
    """A watch's event; its ref carries the event's status (the wire ref has none)."""
    status = status_from_pb(msg.status, "MxSourceEvent.status")
    ref = ref_from_pb(msg.source, status) if msg.HasField("source") else None
    return SourceEvent(ref=ref, removed=msg.removed, snapshot_end=msg.snapshot_end)


def refs_from_response(response: pb.ListSourcesResponse, status: SourceStatus) -> list[SourceRef]:
    return [ref_from_pb(r, status) for r in response.instances]


def stored_from_response(response: pb.GetMetadataResponse, mx_source_id: str, worker_id: str) -> StoredWorker | None:
    """The record a GetMetadata answer holds, or None when the server did not find it."""
    if not response.found:
        return None
    return StoredWorker(
        mx_source_id=response.mx_source_id or mx_source_id,
        worker_id=response.worker_id or worker_id,
        identity=identity_from_pb(response.identity),
        worker=worker_from_pb(response.worker),
    )


# --- Responses (server side) ------------------------------------------------

def publish_response(*, success: bool, message: str, mx_source_id: str = "",
                     worker_id: str = "") -> pb.PublishMetadataResponse:
    return pb.PublishMetadataResponse(success=success, message=message, mx_source_id=mx_source_id,
                                      worker_id=worker_id)


def list_response(refs: Sequence[SourceRef]) -> pb.ListSourcesResponse:
    return pb.ListSourcesResponse(instances=[ref_to_pb(r) for r in refs])


def update_status_response(*, success: bool, message: str) -> pb.UpdateStatusResponse:
    return pb.UpdateStatusResponse(success=success, message=message)


# --- Reader leases: a seed's WorkerService (PrepareTensorRead / ReleaseTensorRead) ---

WorkerServiceStub = pb_grpc.WorkerServiceStub
WorkerServiceServicer = pb_grpc.WorkerServiceServicer
add_worker_servicer_to_server = pb_grpc.add_WorkerServiceServicer_to_server


def prepare_read_request(mx_source_id: str, worker_id: str, renew: str = "") -> pb.PrepareTensorReadRequest:
    return pb.PrepareTensorReadRequest(mx_source_id=mx_source_id, worker_id=worker_id, mx_renew_lease_id=renew)


def prepare_read_response(lease_id: str, ttl_s: float = 0.0) -> pb.PrepareTensorReadResponse:
    return pb.PrepareTensorReadResponse(lease_id=lease_id, mx_lease_ttl_ms=max(int(ttl_s * 1000), 0))


def release_read_request(mx_source_id: str, worker_id: str, lease_id: str) -> pb.ReleaseTensorReadRequest:
    return pb.ReleaseTensorReadRequest(mx_source_id=mx_source_id, worker_id=worker_id, lease_id=lease_id)


def release_read_response() -> pb.ReleaseTensorReadResponse:
    return pb.ReleaseTensorReadResponse()


# --- Stored bytes (server side): the records the server keeps; framed in server/framing.py ---


def encode_published(request: pb.PublishMetadataRequest, *, mx_source_id: str, status: SourceStatus,
                     updated_at_ms: int, owner: str = "") -> EncodedWorker:
    """The record a validated PublishMetadataRequest stores; edits `request` in place.

    The worker's tensors move from the deprecated `tensors` field to `tensor_source` (when
    only the former is set), status and updated_at are cleared (the store keeps them apart)
    and unknown fields are dropped; then identity and worker are serialized once.
    """
    worker = request.worker
    if not worker.HasField("tensor_source") and len(worker.tensors):
        worker.tensor_source.tensors.extend(worker.tensors)
    worker.ClearField("tensors")  # tensor_source supersedes it: readers never look at it
    worker.ClearField("status")
    worker.ClearField("updated_at")
    worker.DiscardUnknownFields()
    request.identity.DiscardUnknownFields()
    return EncodedWorker(
        mx_source_id=mx_source_id,
        worker_id=request.worker_id,
        model_name=request.identity.model_name,
        worker_rank=worker.worker_rank,
        status=status,
        updated_at_ms=updated_at_ms,
        identity_bytes=request.identity.SerializeToString(),
        worker_bytes=worker.SerializeToString(),
        accelerator=worker.accelerator,
        topology=dict(worker.topology),
        owner=owner,
        tensor_count=len(worker.tensor_source.tensors),
    )


def encode_record(mx_source_id: str, worker_id: str, identity: SourceIdentity, worker: WorkerRecord, *,
                  owner: str = "") -> EncodedWorker:
    """The stored form of plain records (for stores fed directly, as tests do)."""
    request = pb.PublishMetadataRequest(identity=identity_to_pb(identity), worker=worker_to_pb(worker),
                                        worker_id=worker_id)
    return encode_published(request, mx_source_id=mx_source_id, status=worker.status,
                            updated_at_ms=worker.updated_at_ms, owner=owner)


def decode_stored(mx_source_id: str, worker_id: str, stored: WorkerBytes) -> StoredWorker:
    """Plain records of stored bytes (for tools and tests; the server serves the bytes)."""
    worker = worker_from_pb(pb.WorkerMetadata.FromString(stored.worker_bytes))
    if stored.verified_bytes is not None:  # as GetMetadata frames it (server/framing.py)
        worker = dataclasses.replace(worker, topology={**worker.topology,
                                                       TOPOLOGY_VERIFIED_BYTES: str(stored.verified_bytes)})
    return StoredWorker(
        mx_source_id=mx_source_id, worker_id=worker_id,
        identity=identity_from_pb(pb.SourceIdentity.FromString(stored.identity_bytes)),
        worker=dataclasses.replace(worker, status=stored.status, updated_at_ms=stored.updated_at_ms),
    )


def source_event_bytes(ref: SourceRef, *, removed: bool = False) -> bytes:
    """A serialized MxSourceEvent of one record (server side: encoded once, sent to every watcher)."""
    return pb.MxSourceEvent(source=ref_to_pb(ref), status=int(ref.status), removed=removed).SerializeToString()


SNAPSHOT_END_BYTES = pb.MxSourceEvent(snapshot_end=True).SerializeToString()


def not_found_response_bytes(mx_source_id: str, worker_id: str) -> bytes:
    """A serialized GetMetadataResponse with found=false naming the ids asked for."""
    return pb.GetMetadataResponse(found=False, mx_source_id=mx_source_id, worker_id=worker_id).SerializeToString()


# --- Serving ------------------------------------------------------------------

def _passthrough(response: bytes) -> bytes:
    return response


def add_watch_handler(watch, server: grpc.Server) -> None:
    """Register MxWatchService.WatchSources as `watch(request, context, send)`: grpc's non-blocking
    server streaming (the handler returns at once; `send(bytes)` writes one serialized MxSourceEvent
    from any thread, `send(None)` ends the stream). server/watch.py says why."""
    def behavior(request, context, send) -> None:
        watch(request, context, send)

    behavior.experimental_non_blocking = True
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(WATCH_SERVICE_NAME, {
        "WatchSources": grpc.unary_stream_rpc_method_handler(
            behavior, request_deserializer=pb.MxWatchSourcesRequest.FromString, response_serializer=_passthrough),
    }),))


def add_servicer_to_server(servicer: P2pServiceServicer, server: grpc.Server) -> None:
    """Register the four RPCs; GetMetadata's handler answers bytes (server/framing.py) that go out as they are."""
    handlers = {
        "PublishMetadata": (servicer.PublishMetadata, pb.PublishMetadataRequest, pb.PublishMetadataResponse),
        "ListSources": (servicer.ListSources, pb.ListSourcesRequest, pb.ListSourcesResponse),
        "GetMetadata": (servicer.GetMetadata, pb.GetMetadataRequest, None),
        "UpdateStatus": (servicer.UpdateStatus, pb.UpdateStatusRequest, pb.UpdateStatusResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
        name: grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=request.FromString,
            response_serializer=_passthrough if response is None else response.SerializeToString)
        for name, (behavior, request, response) in handlers.items()
    }),))


# --- A partial seed's verified tensors (sglang-mx's MxPipelineService, pipelined cascade) ---

MxPipelineServiceStub = pb_grpc.MxPipelineServiceStub
MxPipelineServiceServicer = pb_grpc.MxPipelineServiceServicer
add_pipeline_servicer_to_server = pb_grpc.add_MxPipelineServiceServicer_to_server


def watch_verified_request(mx_source_id: str, worker_id: str, lease_id: str) -> pb.MxWatchVerifiedRequest:
    return pb.MxWatchVerifiedRequest(mx_source_id=mx_source_id, worker_id=worker_id, lease_id=lease_id)


def verified_update(verified: bytes, verified_bytes: int, *, complete: bool = False,
                    failed: bool = False) -> pb.MxVerifiedUpdate:
    return pb.MxVerifiedUpdate(verified=verified, verified_bytes=verified_bytes, complete=complete, failed=failed)
