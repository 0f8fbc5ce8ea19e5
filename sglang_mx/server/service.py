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
from typing import Callable, Sequence

import grpc

from sglang_mx import wire
from sglang_mx.errors import StoreUnavailableError
from sglang_mx.identity import mx_source_id
from sglang_mx.server.options import DEFAULT_MAX_TENSORS
from sglang_mx.server.store import SourceStore
from sglang_mx.records import SourceStatus, TensorDescriptor, WorkerRecord

log = logging.getLogger(__name__)

# Limits on what one request may claim: far above any real deployment, low enough
# that a buggy or hostile client cannot make the server store absurd records.
MAX_WORKER_RANK = 1_000_000
MAX_ID_CHARS = 1024  # model_name, worker_id, mx_source_id


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
        max_tensors: int = DEFAULT_MAX_TENSORS,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._max_tensors = max_tensors
        self._heartbeat_timeout_ms = int(heartbeat_timeout_s * 1000)
        self._clock_ms = clock_ms

    @_store_outage_is_unavailable
    def PublishMetadata(self, request, context):
        try:
            identity, worker, source_id = _validate_publish(request, self._max_tensors)
        except (InvalidRequest, wire.WireError) as e:
            return wire.publish_response(success=False, message=f"PublishMetadata rejected: {e}")
        worker = dataclasses.replace(worker, updated_at_ms=self._clock_ms())
        self._store.publish(source_id, request.worker_id, identity, worker)
        log.info(
            "published %s worker %s rank %d (%s, %d tensors, %d bytes)",
            source_id, request.worker_id, worker.worker_rank, worker.status.name,
            len(worker.tensors), worker.total_bytes,
        )
        return wire.publish_response(
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
        return wire.list_response(refs)

    @_store_outage_is_unavailable
    def GetMetadata(self, request, context):
        if not request.mx_source_id or not request.worker_id:
            return wire.get_response(None)
        if len(request.mx_source_id) > MAX_ID_CHARS or len(request.worker_id) > MAX_ID_CHARS:
            return wire.get_response(None)  # publish never stores such ids
        stored = self._store.get(request.mx_source_id, request.worker_id)
        return wire.get_response(stored, mx_source_id=request.mx_source_id, worker_id=request.worker_id)

    @_store_outage_is_unavailable
    def UpdateStatus(self, request, context):
        if not request.mx_source_id:
            return wire.update_status_response(success=False, message="UpdateStatus rejected: mx_source_id is empty")
        for field in ("mx_source_id", "worker_id"):
            if len(getattr(request, field)) > MAX_ID_CHARS:
                return wire.update_status_response(
                    success=False, message=f"UpdateStatus rejected: {field} is {len(getattr(request, field))} "
                    f"characters long; allowed: at most {MAX_ID_CHARS}")
        try:
            status = SourceStatus(request.status)
        except ValueError:
            status = None
        if status is None or status == SourceStatus.UNKNOWN:
            return wire.update_status_response(
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
            return wire.update_status_response(
                success=False,
                message=f"UpdateStatus: source {request.mx_source_id} has no {who} with rank "
                f"{request.worker_rank}; publish it first",
            )
        return wire.update_status_response(success=True, message=f"{status.name} ({changed} worker(s))")


def _validate_publish(request, max_tensors: int) -> tuple:
    if not request.HasField("identity"):
        raise InvalidRequest("identity is missing")
    if not request.identity.model_name.strip():
        raise InvalidRequest("identity.model_name is empty")
    _check_length("identity.model_name", request.identity.model_name)
    if not request.worker_id.strip():
        raise InvalidRequest("worker_id is empty")
    _check_length("worker_id", request.worker_id)
    if not request.HasField("worker"):
        raise InvalidRequest("worker is missing")
    if request.worker.worker_rank > MAX_WORKER_RANK:
        raise InvalidRequest(f"worker.worker_rank={request.worker.worker_rank} is absurd; allowed: 0-{MAX_WORKER_RANK}")
    count = len(request.worker.tensor_source.tensors) + len(request.worker.tensors)
    if count > max_tensors:
        raise InvalidRequest(f"{count} tensor descriptors is over this server's limit of {max_tensors} per worker")
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
        if t.addr + t.size > 2**64:
            raise InvalidRequest(f"tensor {t.name!r} ({t.size} bytes at {t.addr:#x}) ends past the 64-bit address space")
    _check_overlaps(worker.tensors)
    return identity, worker, mx_source_id(identity)


def _check_length(field: str, value: str) -> None:
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{field} is {len(value)} characters long; allowed: at most {MAX_ID_CHARS}")


def _check_overlaps(tensors: Sequence[TensorDescriptor]) -> None:
    """Reject two tensors whose byte ranges on one device overlap without being the same range.

    The same (addr, size) twice is allowed: tied weights publish one alias per name
    sharing storage. Zero-size tensors hold no bytes and never overlap.
    """
    ranges: dict[tuple[int, int, int], str] = {}  # (device, addr, size) -> first name
    for t in tensors:
        if t.size > 0:
            ranges.setdefault((t.device_id, t.addr, t.size), t.name)
    end = -1
    device = owner = None
    for (dev, addr, size), name in sorted(ranges.items()):
        if dev == device and addr < end:
            raise InvalidRequest(
                f"tensors {owner!r} and {name!r} overlap on device {dev}: {name!r} starts at {addr:#x}, "
                f"before {owner!r} ends at {end:#x}; only identical (addr, size) aliases may share bytes"
            )
        if dev != device or addr + size > end:
            device, end, owner = dev, addr + size, name
