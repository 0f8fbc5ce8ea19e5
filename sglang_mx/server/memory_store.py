"""The in-memory store: the embedded default, for one server process."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Sequence

from sglang_mx.records import (TOPOLOGY_VERIFIED_BYTES, EncodedWorker, SourceQuery, SourceRef, SourceStatus,
                               WorkerBytes)
from sglang_mx.server.store import (Capacity, CapacityError, ChangeListener, NotOwnerError, ReapStats, RecordState,
                                    SourceStore, check_quota, record_bytes)


@dataclasses.dataclass
class _Entry:
    record: EncodedWorker  # never mutated: replaced whole on publish
    status: SourceStatus
    updated_at_ms: int
    generation: int  # new at every put
    source_load: float | None = None
    verified_bytes: int | None = None


@dataclasses.dataclass
class _Usage:
    records: int = 0
    bytes: int = 0


class MemoryStore(SourceStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # mx_source_id -> worker_id -> entry; the outer key is the list index.
        self._sources: dict[str, dict[str, _Entry]] = {}
        # model_name -> (mx_source_id, worker_id) of its records: the model index.
        self._models: dict[str, set[tuple[str, str]]] = {}
        self._usage: dict[str, _Usage] = {}  # owner -> what its records hold
        self._generations = itertools.count(1)
        self._listeners: tuple[ChangeListener, ...] = ()

    def subscribe(self, listener: ChangeListener) -> None:
        with self._lock:
            self._listeners += (listener,)

    def unsubscribe(self, listener: ChangeListener) -> None:
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    def _tell(self, keys: Sequence[tuple[str, str]]) -> None:
        """Tell the listeners of changed records; called after the lock is released (they may read)."""
        for listener in self._listeners:
            for source_id, worker_id in keys:
                listener.changed(source_id, worker_id)

    def put(self, record: EncodedWorker, capacity: Capacity = Capacity()) -> None:
        self._put(record, capacity)
        self._tell([(record.mx_source_id, record.worker_id)])

    def _put(self, record: EncodedWorker, capacity: Capacity) -> None:
        with self._lock:
            entry = _Entry(record, record.status, record.updated_at_ms, next(self._generations))
            workers = self._sources.get(record.mx_source_id)
            old = workers.get(record.worker_id) if workers else None
            if old is not None:
                if old.record.owner not in ("", record.owner):
                    raise NotOwnerError(record.mx_source_id, record.worker_id)
            else:
                if workers is None and capacity.max_sources and len(self._sources) >= capacity.max_sources:
                    raise CapacityError.too_many_sources(len(self._sources), capacity.max_sources)
                if workers and capacity.max_workers_per_source and len(workers) >= capacity.max_workers_per_source:
                    raise CapacityError.too_many_workers(record.mx_source_id, len(workers),
                                                         capacity.max_workers_per_source)
            usage = self._usage.get(record.owner, _Usage())
            mine = old is not None and old.record.owner == record.owner
            check_quota(capacity, record.owner, records=usage.records, stored_bytes=usage.bytes,
                        new_bytes=record_bytes(record), replaced_bytes=record_bytes(old.record) if mine else None)
            if old is not None:
                self._forget(old.record)
            self._sources.setdefault(record.mx_source_id, {})[record.worker_id] = entry
            self._models.setdefault(record.model_name, set()).add((record.mx_source_id, record.worker_id))
            usage = self._usage.setdefault(record.owner, _Usage())
            usage.records += 1
            usage.bytes += record_bytes(record)

    def _forget(self, record: EncodedWorker) -> None:
        """Take a record that is being replaced or deleted out of the model index and its owner's use."""
        keys = self._models[record.model_name]
        keys.discard((record.mx_source_id, record.worker_id))
        if not keys:
            del self._models[record.model_name]
        usage = self._usage[record.owner]
        usage.records -= 1
        usage.bytes -= record_bytes(record)
        if not usage.records:
            del self._usage[record.owner]

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
        with self._lock:
            entry = self._sources.get(mx_source_id, {}).get(worker_id)
            if entry is None or entry.record.worker_rank != worker_rank:
                return 0
            if owner is not None and entry.record.owner not in ("", owner):
                raise NotOwnerError(mx_source_id, worker_id)
            before = (entry.status, entry.source_load, entry.verified_bytes)
            entry.status = status
            entry.updated_at_ms = now_ms
            if source_load is not None:
                entry.source_load = source_load
            if verified_bytes is not None:
                entry.verified_bytes = verified_bytes
            changed = before != (entry.status, entry.source_load, entry.verified_bytes)
        if changed:
            self._tell([(mx_source_id, worker_id)])
        return 1

    def get_bytes(self, mx_source_id: str, worker_id: str) -> WorkerBytes | None:
        with self._lock:
            entry = self._sources.get(mx_source_id, {}).get(worker_id)
            if entry is None:
                return None
            return WorkerBytes(entry.record.identity_bytes, entry.record.worker_bytes, entry.status,
                               entry.updated_at_ms, entry.verified_bytes)

    def states(self, mx_source_id: str, worker_ids: Sequence[str] | None = None) -> dict[str, RecordState]:
        with self._lock:
            workers = self._sources.get(mx_source_id, {})
            names = workers.keys() if worker_ids is None else [w for w in worker_ids if w in workers]
            return {w: RecordState(_ref(mx_source_id, w, workers[w]), str(workers[w].generation)) for w in names}

    def list(self, query: SourceQuery) -> list[SourceRef]:
        rank, status, since, model = query.worker_rank, query.status, query.min_updated_at_ms, query.model_name
        with self._lock:
            if query.mx_source_id is not None:
                candidates = [(query.mx_source_id, worker_id, entry)
                              for worker_id, entry in self._sources.get(query.mx_source_id, {}).items()]
            elif model is not None:
                candidates = [(source_id, worker_id, self._sources[source_id][worker_id])
                              for source_id, worker_id in self._models.get(model, ())]
            else:
                candidates = [(source_id, worker_id, entry) for source_id, workers in self._sources.items()
                              for worker_id, entry in workers.items()]
            # Filter on the entries' own fields first: a ref is built only for what is returned.
            refs = [
                _ref(source_id, worker_id, entry)
                for source_id, worker_id, entry in candidates
                if (rank is None or entry.record.worker_rank == rank)
                and (status is None or entry.status == status)
                and (since is None or entry.updated_at_ms >= since)
                and (model is None or entry.record.model_name == model)
            ]
        refs.sort(key=lambda r: r.updated_at_ms, reverse=True)
        return refs[: query.limit] if query.limit is not None else refs

    def reap(self, now_ms: int, heartbeat_timeout_ms: int, gc_timeout_ms: int) -> ReapStats:
        stale_before = now_ms - heartbeat_timeout_ms
        delete_before = now_ms - gc_timeout_ms
        marked = deleted = 0
        changed: list[tuple[str, str]] = []
        with self._lock:
            for source_id in list(self._sources):
                workers = self._sources[source_id]
                for worker_id in list(workers):
                    entry = workers[worker_id]
                    if entry.status != SourceStatus.STALE and entry.updated_at_ms < stale_before:
                        entry.status = SourceStatus.STALE
                        marked += 1
                        changed.append((source_id, worker_id))
                    if entry.status == SourceStatus.STALE and entry.updated_at_ms < delete_before:
                        del workers[worker_id]
                        self._forget(entry.record)
                        deleted += 1
                        changed.append((source_id, worker_id))
                if not workers:
                    del self._sources[source_id]
        self._tell(changed)
        return ReapStats(marked_stale=marked, deleted=deleted)


def _ref(source_id: str, worker_id: str, entry: _Entry) -> SourceRef:
    return SourceRef(
        mx_source_id=source_id,
        worker_id=worker_id,
        model_name=entry.record.model_name,
        worker_rank=entry.record.worker_rank,
        status=entry.status,
        updated_at_ms=entry.updated_at_ms,
        accelerator=entry.record.accelerator,
        topology=entry.record.topology if entry.verified_bytes is None else {
            **entry.record.topology, TOPOLOGY_VERIFIED_BYTES: str(entry.verified_bytes)},
        source_load=entry.source_load,
    )
