"""The P2pService servicer: decode, validate, call the store, encode.

Bad requests are answered the way ModelExpress answers them (gRPC OK with
success=false / found=false and a message naming what was wrong), so existing
clients keep working; nothing invalid reaches the store.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import grpc

from sglang_mx import wire
from sglang_mx.errors import StoreUnavailableError
from sglang_mx.identity import mx_source_id
from sglang_mx.server.store import SourceStore
from sglang_mx.types import SourceStatus, WorkerRecord

log = logging.getLogger(__name__)
pb = wire.messages


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class InvalidRequest(ValueError):
    """A request the server refuses; the message is sent back to the client."""


def _store_outage_is_unavailable(rpc: Callable) -> Callable:
    """A store outage answers gRPC UNAVAILABLE (clients retry it) instead of crashing the call."""

    @functools.wraps(rpc)
    def wrapper(self, request, context):
        try:
            return rpc(self, request, context)
        except StoreUnavailableError as e:
            log.warning("%s failed: %s", rpc.__name__, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{rpc.__name__}: {e}")

    return wrapper


class P2pServicer(wire.P2pServiceServicer):
    def __init__(
        self,
        store: SourceStore,
        *,
        heartbeat_timeout_s: float,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._heartbeat_timeout_ms = int(heartbeat_timeout_s * 1000)
        self._clock_ms = clock_ms

    @_store_outage_is_unavailable
    def PublishMetadata(self, request, context):
        try:
            identity, worker, source_id = _validate_publish(request)
        except (InvalidRequest, wire.WireError) as e:
            return pb.PublishMetadataResponse(success=False, message=f"PublishMetadata rejected: {e}")
        worker = dataclasses.replace(worker, updated_at_ms=self._clock_ms())
        self._store.publish(source_id, request.worker_id, identity, worker)
        log.info(
            "published %s worker %s rank %d (%s, %d tensors, %d bytes)",
            source_id, request.worker_id, worker.worker_rank, worker.status.name,
            len(worker.tensors), worker.total_bytes,
        )
        return pb.PublishMetadataResponse(
            success=True, message="published", mx_source_id=source_id, worker_id=request.worker_id
        )

    @_store_outage_is_unavailable
    def ListSources(self, request, context):
        try:
            source_id = None
            if request.HasField("identity"):
                identity = wire.identity_from_pb(request.identity)
                if identity.model_name:
                    source_id = mx_source_id(identity)
            query = wire.query_from_pb(request, source_id)
        except wire.WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ListSources: {e}")
        if query.status == SourceStatus.READY:
            # READY means "heartbeating now": a READY record past the timeout is
            # a dead seed the reaper has not reached yet.
            fresh_since = max(self._clock_ms() - self._heartbeat_timeout_ms, 1)
            query = dataclasses.replace(query, min_updated_at_ms=max(query.min_updated_at_ms or 0, fresh_since))
        refs = self._store.list(query)
        return pb.ListSourcesResponse(instances=[wire.ref_to_pb(r) for r in refs])

    @_store_outage_is_unavailable
    def GetMetadata(self, request, context):
        if not request.mx_source_id or not request.worker_id:
            return pb.GetMetadataResponse(found=False)
        stored = self._store.get(request.mx_source_id, request.worker_id)
        if stored is None:
            return pb.GetMetadataResponse(found=False, mx_source_id=request.mx_source_id, worker_id=request.worker_id)
        return pb.GetMetadataResponse(
            found=True,
            worker=wire.worker_to_pb(stored.worker),
            mx_source_id=stored.mx_source_id,
            worker_id=stored.worker_id,
            identity=wire.identity_to_pb(stored.identity),
        )

    @_store_outage_is_unavailable
    def UpdateStatus(self, request, context):
        if not request.mx_source_id:
            return pb.UpdateStatusResponse(success=False, message="UpdateStatus rejected: mx_source_id is empty")
        try:
            status = SourceStatus(request.status)
        except ValueError:
            status = None
        if status is None or status == SourceStatus.UNKNOWN:
            return pb.UpdateStatusResponse(
                success=False,
                message=f"UpdateStatus rejected: status {request.status} is not one of "
                "INITIALIZING (1), READY (2), STALE (3)",
            )
        load = request.source_load if request.HasField("source_load") else None
        changed = self._store.update_status(
            request.mx_source_id, request.worker_id, request.worker_rank, status, self._clock_ms(), load
        )
        if changed == 0:
            who = f"worker {request.worker_id}" if request.worker_id else f"any worker of rank {request.worker_rank}"
            return pb.UpdateStatusResponse(
                success=False,
                message=f"UpdateStatus: source {request.mx_source_id} has no {who} with rank "
                f"{request.worker_rank}; publish it first",
            )
        return pb.UpdateStatusResponse(success=True, message=f"{status.name} ({changed} worker(s))")


def _validate_publish(request) -> tuple:
    if not request.HasField("identity"):
        raise InvalidRequest("identity is missing")
    if not request.identity.model_name.strip():
        raise InvalidRequest("identity.model_name is empty")
    if not request.worker_id.strip():
        raise InvalidRequest("worker_id is empty")
    if not request.HasField("worker"):
        raise InvalidRequest("worker is missing")
    identity = wire.identity_from_pb(request.identity)
    worker: WorkerRecord = wire.worker_from_pb(request.worker)
    seen: set[str] = set()
    for t in worker.tensors:
        if not t.name:
            raise InvalidRequest("a tensor descriptor has an empty name")
        if t.name in seen:
            raise InvalidRequest(f"tensor {t.name!r} is listed twice")
        seen.add(t.name)
        if t.size > 0 and t.addr == 0:
            raise InvalidRequest(f"tensor {t.name!r} has {t.size} bytes at address 0")
    return identity, worker, mx_source_id(identity)
