"""The in-memory store: the embedded default, for one server process."""

from __future__ import annotations

import dataclasses
import threading

from sglang_mx.server.store import ReapStats, SourceStore
from sglang_mx.records import SourceIdentity, SourceQuery, SourceRef, SourceStatus, StoredWorker, WorkerRecord


@dataclasses.dataclass
class _Entry:
    identity: SourceIdentity
    worker: WorkerRecord  # never mutated: replaced whole on publish
    status: SourceStatus
    updated_at_ms: int
    source_load: float | None = None


class MemoryStore(SourceStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # mx_source_id -> worker_id -> entry; the outer key is the list index.
        self._sources: dict[str, dict[str, _Entry]] = {}

    def publish(self, mx_source_id: str, worker_id: str, identity: SourceIdentity, worker: WorkerRecord) -> None:
        entry = _Entry(identity, worker, worker.status, worker.updated_at_ms)
        with self._lock:
            self._sources.setdefault(mx_source_id, {})[worker_id] = entry

    def update_status(
        self,
        mx_source_id: str,
        worker_id: str,
        worker_rank: int,
        status: SourceStatus,
        now_ms: int,
        source_load: float | None = None,
    ) -> int:
        with self._lock:
            workers = self._sources.get(mx_source_id, {})
            if worker_id:
                entry = workers.get(worker_id)
                targets = [entry] if entry is not None and entry.worker.worker_rank == worker_rank else []
            else:
                targets = [e for e in workers.values() if e.worker.worker_rank == worker_rank]
            for entry in targets:
                entry.status = status
                entry.updated_at_ms = now_ms
                if source_load is not None:
                    entry.source_load = source_load
            return len(targets)

    def get(self, mx_source_id: str, worker_id: str) -> StoredWorker | None:
        with self._lock:
            entry = self._sources.get(mx_source_id, {}).get(worker_id)
            if entry is None:
                return None
            worker = dataclasses.replace(entry.worker, status=entry.status, updated_at_ms=entry.updated_at_ms)
            return StoredWorker(mx_source_id=mx_source_id, worker_id=worker_id, identity=entry.identity, worker=worker)

    def list(self, query: SourceQuery) -> list[SourceRef]:
        with self._lock:
            if query.mx_source_id is not None:
                groups = [(query.mx_source_id, self._sources.get(query.mx_source_id, {}))]
            else:
                groups = list(self._sources.items())
            refs = [
                ref
                for source_id, workers in groups
                for worker_id, entry in workers.items()
                if query.matches(ref := _ref(source_id, worker_id, entry))
            ]
        refs.sort(key=lambda r: r.updated_at_ms, reverse=True)
        return refs[: query.limit] if query.limit is not None else refs

    def reap(self, now_ms: int, heartbeat_timeout_ms: int, gc_timeout_ms: int) -> ReapStats:
        stale_before = now_ms - heartbeat_timeout_ms
        delete_before = now_ms - gc_timeout_ms
        marked = deleted = 0
        with self._lock:
            for source_id in list(self._sources):
                workers = self._sources[source_id]
                for worker_id in list(workers):
                    entry = workers[worker_id]
                    if entry.status != SourceStatus.STALE and entry.updated_at_ms < stale_before:
                        entry.status = SourceStatus.STALE
                        marked += 1
                    if entry.status == SourceStatus.STALE and entry.updated_at_ms < delete_before:
                        del workers[worker_id]
                        deleted += 1
                if not workers:
                    del self._sources[source_id]
        return ReapStats(marked_stale=marked, deleted=deleted)


def _ref(source_id: str, worker_id: str, entry: _Entry) -> SourceRef:
    return SourceRef(
        mx_source_id=source_id,
        worker_id=worker_id,
        model_name=entry.identity.model_name,
        worker_rank=entry.worker.worker_rank,
        status=entry.status,
        updated_at_ms=entry.updated_at_ms,
        accelerator=entry.worker.accelerator,
        topology=entry.worker.topology,
        source_load=entry.source_load,
    )
