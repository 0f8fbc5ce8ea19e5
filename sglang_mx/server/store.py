"""The store interface: what every metadata store backend MUST do.

A store keeps one record per (mx_source_id, worker_id). The servicer validates
requests and stamps times; a store only keeps, finds and expires records.
tests/server/test_store_contract.py is the one contract suite that every
backend runs.
"""

from __future__ import annotations

import abc
import dataclasses

from sglang_mx.records import SourceIdentity, SourceQuery, SourceRef, SourceStatus, StoredWorker, WorkerRecord


@dataclasses.dataclass(frozen=True)
class ReapStats:
    marked_stale: int = 0
    deleted: int = 0


class SourceStore(abc.ABC):
    """A backend for the metadata server. Implementations MUST be thread-safe."""

    @abc.abstractmethod
    def publish(self, mx_source_id: str, worker_id: str, identity: SourceIdentity, worker: WorkerRecord) -> None:
        """Insert or wholly replace one worker's record.

        MUST be atomic per worker: a concurrent reader sees the old record or
        the new one, never parts of both. `worker.status` and
        `worker.updated_at_ms` are stored as given.
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
    ) -> int:
        """Set status and updated_at of existing records; return how many changed.

        With a worker_id, only that worker's record (and only if its rank equals
        `worker_rank`). With an empty worker_id, every worker of the source with
        that rank (what older clients send). MUST NOT rewrite tensor lists: its
        cost is independent of the number of tensors. MUST NOT create records.
        """

    @abc.abstractmethod
    def get(self, mx_source_id: str, worker_id: str) -> StoredWorker | None:
        """Return the whole record, or None."""

    @abc.abstractmethod
    def list(self, query: SourceQuery) -> list[SourceRef]:
        """Refs of records matching every set field of `query`, newest first.

        `min_updated_at_ms` keeps records whose updated_at is at least that;
        `limit` caps the count after sorting. MUST NOT scan records of other
        sources when `query.mx_source_id` is set.
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
