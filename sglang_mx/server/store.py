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

from sglang_mx import wire
from sglang_mx.errors import MxError
from sglang_mx.records import (EncodedWorker, SourceIdentity, SourceQuery, SourceRef, SourceStatus, StoredWorker,
                               WorkerBytes, WorkerRecord)


@dataclasses.dataclass(frozen=True)
class ReapStats:
    marked_stale: int = 0
    deleted: int = 0


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Limits a store enforces atomically when a publish would create a record (0: none)."""

    max_workers_per_source: int = 0
    max_sources: int = 0


class NotOwnerError(MxError):
    """The record exists and belongs to another principal."""

    def __init__(self, mx_source_id: str, worker_id: str) -> None:
        super().__init__(f"worker {worker_id!r} of source {mx_source_id} was published by another writer; "
                         "only its publisher may change it")


class CapacityError(MxError):
    """A publish would create a record past a `Capacity` limit."""


class SourceStore(abc.ABC):
    """A backend for the metadata server. Implementations MUST be thread-safe."""

    @abc.abstractmethod
    def put(self, record: EncodedWorker, capacity: Capacity = Capacity()) -> None:
        """Insert or wholly replace one worker's record.

        MUST be atomic per worker: a concurrent reader sees the old record or the
        new one, never parts of both. `record.status` and `record.updated_at_ms`
        are stored as given. MUST raise NotOwnerError, storing nothing, when a
        record exists whose owner is neither "" nor `record.owner`, and
        CapacityError when creating the record would pass a `capacity` limit.
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
    ) -> int:
        """Set status and updated_at of that worker's record if its rank equals `worker_rank`; return 1
        if it changed, 0 if there is no such record.

        With `owner` given, MUST raise NotOwnerError (changing nothing) when the
        record's owner is neither "" nor `owner`. MUST NOT rewrite the stored
        bytes: its cost is independent of the number of tensors. MUST NOT create
        records.
        """

    @abc.abstractmethod
    def get_bytes(self, mx_source_id: str, worker_id: str) -> WorkerBytes | None:
        """The stored bytes with the current status and updated_at, or None."""

    @abc.abstractmethod
    def list(self, query: SourceQuery) -> list[SourceRef]:
        """Refs of records matching every set field of `query`, newest first.

        `min_updated_at_ms` keeps records whose updated_at is at least that;
        `limit` caps the count after sorting. MUST NOT scan records of other
        sources when `query.mx_source_id` is set, MUST NOT read the stored bytes,
        and MUST skip (not fail on) a record it cannot read.
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
