"""The P2pService servicer: validate, call the store, answer.

Bad requests are answered the way ModelExpress answers them (gRPC OK with
success=false / found=false and a message naming what was wrong), so existing
clients keep working; a request over a limit (`sglang_mx.server.limits`) is
gRPC INVALID_ARGUMENT. Nothing invalid reaches the store. Records are kept as
the bytes they were published as: GetMetadata answers those bytes without
decoding them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Iterable

import grpc

from sglang_mx import wire
from sglang_mx.errors import StoreUnavailableError
from sglang_mx.identity import mx_source_id
from sglang_mx.records import SourceStatus
import sglang_mx.server.framing as framing
import sglang_mx.server.limits as limits
from sglang_mx.server.auth import current_principal
from sglang_mx.server.limits import LimitExceeded, RecordLimits
from sglang_mx.server.options import DEFAULT_MAX_RECORD_MB, DEFAULT_MAX_TENSORS
from sglang_mx.server.store import Capacity, CapacityError, NotOwnerError, SourceStore

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class InvalidRequest(ValueError):
    """A request the server refuses; the message is sent back to the client."""


def _guarded(rpc: Callable) -> Callable:
    """Map typed failures to gRPC codes: a store outage UNAVAILABLE (clients retry it), a limit
    INVALID_ARGUMENT, a record of another writer PERMISSION_DENIED, a full store RESOURCE_EXHAUSTED."""

    @functools.wraps(rpc)
    def wrapper(self, request, context):
        try:
            return rpc(self, request, context)
        except StoreUnavailableError as e:
            log.warning("%s failed: %s", rpc.__name__, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{rpc.__name__}: {e}")
        except LimitExceeded as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{rpc.__name__}: {e}")
        except NotOwnerError as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{rpc.__name__}: {e}")
        except CapacityError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{rpc.__name__}: {e}")

    return wrapper


class P2pServicer(wire.P2pServiceServicer):
    def __init__(
        self,
        store: SourceStore,
        *,
        heartbeat_timeout_s: float,
        max_tensors: int = DEFAULT_MAX_TENSORS,
        max_record_bytes: int = DEFAULT_MAX_RECORD_MB * 1024 * 1024,
        capacity: Capacity = Capacity(),
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._limits = RecordLimits(max_tensors=max_tensors, max_record_bytes=max_record_bytes)
        self._capacity = capacity
        self._heartbeat_timeout_ms = int(heartbeat_timeout_s * 1000)
        self._clock_ms = clock_ms

    @_guarded
    def PublishMetadata(self, request, context):
        try:
            source_id, status = _validate_publish(request, self._limits)
        except (InvalidRequest, wire.WireError) as e:
            return wire.publish_response(success=False, message=f"PublishMetadata rejected: {e}")
        record = wire.encode_published(request, mx_source_id=source_id, status=status,
                                       updated_at_ms=self._clock_ms(), owner=current_principal())
        self._store.put(record, self._capacity)
        log.info("published %s worker %s rank %d (%s, %d tensors, %d bytes)", source_id, record.worker_id,
                 record.worker_rank, status.name, record.tensor_count, len(record.worker_bytes))
        return wire.publish_response(
            success=True, message="published", mx_source_id=source_id, worker_id=request.worker_id
        )

    @_guarded
    def ListSources(self, request, context):
        limits.check_list(request)
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
        return wire.list_response(self._store.list(query))

    @_guarded
    def GetMetadata(self, request, context) -> bytes:
        """Answers serialized bytes: the stored record, framed, never decoded (see wire.add_servicer_to_server)."""
        limits.check_ids(request)
        stored = None
        if request.mx_source_id and request.worker_id:
            stored = self._store.get_bytes(request.mx_source_id, request.worker_id)
        return framing.get_response_bytes(stored, mx_source_id=request.mx_source_id, worker_id=request.worker_id)

    @_guarded
    def UpdateStatus(self, request, context):
        limits.check_ids(request)
        for field in ("mx_source_id", "worker_id"):
            if not getattr(request, field):
                # An empty worker_id once meant "every worker of this rank"; ModelExpress's own
                # 0.7.0 client always names its worker, and one call must not flip others' records.
                return wire.update_status_response(success=False, message=f"UpdateStatus rejected: {field} is empty")
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
        verified = request.mx_verified_bytes if request.HasField("mx_verified_bytes") else None
        changed = self._store.update_status(request.mx_source_id, request.worker_id, request.worker_rank, status,
                                            self._clock_ms(), load, owner=current_principal(),
                                            verified_bytes=verified)
        if changed == 0:
            return wire.update_status_response(
                success=False,
                message=f"UpdateStatus: source {request.mx_source_id} has no worker {request.worker_id} with rank "
                f"{request.worker_rank}; publish it first",
            )
        return wire.update_status_response(success=True, message=f"{status.name} (1 worker)")


def _validate_publish(request, record_limits: RecordLimits) -> tuple[str, SourceStatus]:
    """The source id and status of a valid request; InvalidRequest / WireError / LimitExceeded otherwise."""
    if not request.HasField("identity"):
        raise InvalidRequest("identity is missing")
    if not request.identity.model_name.strip():
        raise InvalidRequest("identity.model_name is empty")
    if not request.worker_id.strip():
        raise InvalidRequest("worker_id is empty")
    if not request.HasField("worker"):
        raise InvalidRequest("worker is missing")
    limits.check_publish(request, record_limits)
    identity = wire.identity_from_pb(request.identity)
    status = wire.status_from_pb(request.worker.status, "worker.status")
    worker = request.worker
    # tensor_source supersedes the deprecated top-level `tensors`; read either.
    _check_tensors(worker.tensor_source.tensors if worker.HasField("tensor_source") else worker.tensors)
    return mx_source_id(identity), status


def _check_tensors(tensors: Iterable) -> None:
    """Names present and unique, bytes not at address 0 nor past 2**64, no two ranges partly overlapping.

    The same (device, addr, size) twice is allowed: tied weights publish one alias per name
    sharing storage. Zero-size tensors hold no bytes and never overlap.
    """
    seen: set[str] = set()
    ranges: dict[tuple[int, int, int], str] = {}  # (device, addr, size) -> first name
    check_text = limits.check_tensor_text
    for t in tensors:
        name, addr, size = t.name, t.addr, t.size
        check_text(name, t.dtype)
        if not name:
            raise InvalidRequest("a tensor descriptor has an empty name")
        if name in seen:
            raise InvalidRequest(f"tensor {name!r} is listed twice")
        seen.add(name)
        if size:
            if addr == 0:
                raise InvalidRequest(f"tensor {name!r} has {size} bytes at address 0")
            if addr + size > 2**64:
                raise InvalidRequest(f"tensor {name!r} ({size} bytes at {addr:#x}) ends past the 64-bit address space")
            ranges.setdefault((t.device_id, addr, size), name)
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
