"""The store interface: what every metadata store backend MUST do.

A store keeps one record per (mx_source_id, worker_id): the wire bytes it was
published as (`EncodedWorker`) plus the small fields the server indexes and
updates. The servicer validates requests and stamps times; a store only keeps,
finds and expires records. tests/server/test_store_contract.py is the one
contract suite that every backend runs.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Protocol, Sequence

from sglang_mx import wire
from sglang_mx.errors import MxError
from sglang_mx.records import (EncodedWorker, SourceIdentity, SourceQuery, SourceRef, SourceStatus, StoredWorker,
                               WorkerBytes, WorkerRecord)


@dataclasses.dataclass(frozen=True)
class RecordState:
    """What a watch compares of one record: its listing ref (`SourceStore.list`'s, progress merged into
    the topology) and the generation of its stored bytes, new at every publish: a republish is a
    change even when every listed field stays the same."""

    ref: SourceRef
    generation: str


class ChangeListener(Protocol):
    """Told of records that may have changed (server/watch.py's hub). Calls must return quickly:
    they run in the writer's thread (or a store's one subscriber thread)."""

    def changed(self, mx_source_id: str, worker_id: str) -> None:
        """That record may have changed or gone: read it again."""

    def missed(self) -> None:
        """Changes may have gone untold (a shared store's feed reconnected): read everything again."""


@dataclasses.dataclass(frozen=True)
class ReapStats:
    marked_stale: int = 0
    deleted: int = 0


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Limits a store enforces atomically when a publish would create or grow a record (0: none).

    A principal's quota counts the records it owns and their stored bytes (identity plus worker
    bytes, `record_bytes`); records published without a token belong to the principal "".
    """

    max_workers_per_source: int = 0
    max_sources: int = 0
    max_records_per_principal: int = 0
    max_bytes_per_principal: int = 0


def record_bytes(record: EncodedWorker) -> int:
    """What a record counts against its owner's byte quota."""
    return len(record.identity_bytes) + len(record.worker_bytes)


class NotOwnerError(MxError):
    """The record exists and belongs to another principal."""

    def __init__(self, mx_source_id: str, worker_id: str) -> None:
        super().__init__(f"worker {worker_id!r} of source {mx_source_id} was published by another writer; "
                         "only its publisher may change it")


class CapacityError(MxError):
    """A publish would create a record past a `Capacity` limit."""

    @classmethod
    def too_many_sources(cls, held: int, limit: int) -> "CapacityError":
        return cls(f"this server holds {held} sources, its limit (--max-sources {limit}); no new source is accepted")

    @classmethod
    def too_many_workers(cls, mx_source_id: str, held: int, limit: int) -> "CapacityError":
        return cls(f"source {mx_source_id} has {held} workers, the limit (--max-workers-per-source {limit})")


class QuotaError(CapacityError):
    """A publish would take one principal past its quota of records or of bytes."""

    def __init__(self, principal: str, *, what: str, used: int, adding: int, limit: int, flag: str) -> None:
        self.principal, self.what, self.used, self.adding, self.limit = principal, what, used, adding, limit
        who = f"writer {principal!r}" if principal else "the server's writers (no tokens: one shared quota)"
        super().__init__(f"{who} holds {used} {what}; {adding} more would pass the limit of {limit} per writer "
                         f"(raise it with {flag})")

    @classmethod
    def for_records(cls, principal: str, used: int, limit: int) -> "QuotaError":
        return cls(principal, what="records", used=used, adding=1, limit=limit, flag="--max-records-per-principal")

    @classmethod
    def for_bytes(cls, principal: str, used: int, adding: int, limit: int) -> "QuotaError":
        return cls(principal, what="bytes of records", used=used, adding=adding, limit=limit,
                   flag="--max-mb-per-principal")


def check_quota(capacity: Capacity, owner: str, *, records: int, stored_bytes: int, new_bytes: int,
                replaced_bytes: int | None) -> None:
    """Raise QuotaError if `owner`, who holds `records` records of `stored_bytes` bytes, may not
    store a record of `new_bytes` bytes. `replaced_bytes`: the size of the record of `owner` it
    replaces (None: it makes `owner` a new record). A publish that does not grow its owner's use
    is always accepted, so a lowered limit never blocks a seed republishing what it has."""
    if replaced_bytes is None and capacity.max_records_per_principal and records >= capacity.max_records_per_principal:
        raise QuotaError.for_records(owner, records, capacity.max_records_per_principal)
    growth = new_bytes - (replaced_bytes or 0)
    if capacity.max_bytes_per_principal and growth > 0 and stored_bytes + growth > capacity.max_bytes_per_principal:
        raise QuotaError.for_bytes(owner, stored_bytes, growth, capacity.max_bytes_per_principal)


class SourceStore(abc.ABC):
    """A backend for the metadata server. Implementations MUST be thread-safe."""

    @abc.abstractmethod
    def put(self, record: EncodedWorker, capacity: Capacity = Capacity()) -> None:
        """Insert or wholly replace one worker's record.

        MUST be atomic per worker: a concurrent reader sees the old record or the
        new one, never parts of both. `record.status` and `record.updated_at_ms`
        are stored as given. MUST raise NotOwnerError, storing nothing, when a
        record exists whose owner is neither "" nor `record.owner`, and
        CapacityError when creating the record would pass a `capacity` limit:
        QuotaError (as `check_quota` decides it) when it would take `record.owner`
        past its quota. The stored record counts against its owner from then on
        (a record claimed from owner "" moves to the new owner) and stops
        counting when it is replaced, reaped or expires.
        """

    @abc.abstractmethod
    def update_status(
        self,
        mx_source_id: str,
        worker_id: str,
        worker_rank: int,
        status: SourceStatus,
        now_ms: int,
        source_load: float | None = None,
        owner: str | None = None,
        verified_bytes: int | None = None,
    ) -> int:
        """Set status and updated_at of that worker's record if its rank equals `worker_rank`; return 1
        if it changed, 0 if there is no such record.

        `source_load` and `verified_bytes` (a pulling target's progress), when given, are kept beside
        the status; None keeps the value stored before. The progress MUST appear as topology key
        TOPOLOGY_VERIFIED_BYTES (decimal) in `list` refs, over the record's own topology, and as
        `WorkerBytes.verified_bytes`; a later `put` of the worker MUST reset it to unset. With `owner`
        given, MUST raise NotOwnerError (changing nothing) when the record's owner is neither "" nor
        `owner`. MUST NOT rewrite the stored bytes: its cost is independent of the number of tensors.
        MUST NOT create records.
        """

    @abc.abstractmethod
    def get_bytes(self, mx_source_id: str, worker_id: str) -> WorkerBytes | None:
        """The stored bytes with the current status and updated_at, or None."""

    @abc.abstractmethod
    def list(self, query: SourceQuery) -> list[SourceRef]:
        """Refs of records matching every set field of `query`, newest first.

        `min_updated_at_ms` keeps records whose updated_at is at least that;
        `limit` caps the count after sorting. MUST NOT read records of other
        sources when `query.mx_source_id` is set, nor records of other models when
        `query.model_name` is set (an index, not a scan); MUST NOT read the stored
        bytes, and MUST skip (not fail on) a record it cannot read.
        """

    @abc.abstractmethod
    def reap(self, now_ms: int, heartbeat_timeout_ms: int, gc_timeout_ms: int) -> ReapStats:
        """Expire records.

        Records in any status but STALE (UNKNOWN and INITIALIZING included)
        whose updated_at is older than `now_ms - heartbeat_timeout_ms` become
        STALE, updated_at unchanged. STALE records whose updated_at is older than
        `now_ms - gc_timeout_ms` are deleted. MUST be safe to run from several
        server replicas at once.
        """

    @abc.abstractmethod
    def states(self, mx_source_id: str, worker_ids: Sequence[str] | None = None) -> dict[str, RecordState]:
        """worker_id -> RecordState of that source's records (of `worker_ids` only, when given; an
        absent one is left out). Like `list`, MUST NOT read the stored bytes nor other sources."""

    @abc.abstractmethod
    def subscribe(self, listener: ChangeListener) -> None:
        """Tell `listener.changed` of every record a write may have changed: `put`, an `update_status`
        that changed the status, source_load or verified bytes, and every record `reap` marked STALE or
        deleted. An update that changed nothing but updated_at MAY go untold (these stores do not tell
        it: a fleet's heartbeats would wake every watch). A store shared by several servers (Redis)
        MUST also tell of the writes of the others, and call `listener.missed()` when it may have lost
        some. Told after the write (a read by the listener sees it), of every write made after this
        returns (a shared store that cannot subscribe in time calls `missed()` once it has)."""

    @abc.abstractmethod
    def unsubscribe(self, listener: ChangeListener) -> None:
        """Tell `listener` nothing more (an unknown listener is ignored)."""

    def close(self) -> None:
        """Release connections. Idempotent."""

    # --- conveniences over the abstract methods (plain records in and out) ---------------------------

    def publish(self, mx_source_id: str, worker_id: str, identity: SourceIdentity, worker: WorkerRecord, *,
                owner: str = "") -> None:
        """`put` of plain records: `worker.status` and `worker.updated_at_ms` are stored as given."""
        self.put(wire.encode_record(mx_source_id, worker_id, identity, worker, owner=owner))

    def get(self, mx_source_id: str, worker_id: str) -> StoredWorker | None:
        """The whole record decoded, or None."""
        stored = self.get_bytes(mx_source_id, worker_id)
        return None if stored is None else wire.decode_stored(mx_source_id, worker_id, stored)
