"""The watch hub: which open WatchSources streams a change of a record concerns, and what to send them.

A target waiting for a seed watches its source instead of polling ListSources
(MxWatchService, proto/p2p.proto). The hub keeps, for every watched source, the last state
of each record it sent (`RecordState`: the listing ref and the generation of its bytes),
and one dispatcher thread that:

- reads the whole source (`SourceStore.states`) when a watch opens, and sends the new watch
  every matching record (newest first), then `snapshot_end`. The read is shared by every
  watch of that source opened meanwhile: 8,000 targets connecting cost a few reads, not 8,000;
- reads a record again when the store says it may have changed (`SourceStore.subscribe`: the
  memory store tells in the writer's thread, the Redis store through pub/sub, with the writes
  of every replica and of the reapers), compares it with the state last sent and, when it
  differs in anything but updated_at, sends it (`removed` when it is gone) to the watches
  whose rank it matches. A change of the verified bytes alone (a pulling target's progress)
  goes only to watches that asked for `progress`;
- reads every watched source again every `resync_interval_s` and whenever the store may have
  lost changes (`missed`): what a lost pub/sub message or a record expired by its Redis TTL
  hid is sent then.

Since changes are read, not carried, they are idempotent: a message seen twice or late
changes nothing, and the dispatcher coalesces bursts (one read per record per round).
Each event is encoded once and the same bytes are queued for every watch it concerns.

Why no thread per stream. The server is grpcio's synchronous server (its unary calls are
the hot path: README, "The metadata server"). There, a streaming handler normally holds a
thread of the pool for the life of its stream; 8,000 open watches would be 8,000 threads.
Measured with bare gRPC servers on 2 cores (8,000 streams, events fanned out to all):
- a thread per stream: 400-750 us of server CPU per delivery (the GIL handed between
  thousands of threads; pacing them with a semaphore did not help), 375 MB;
- grpc.aio: about 38 us per delivery, 217 MB; but the whole server on grpc.aio doubled the
  cost of every unary call (410 instead of 206 us of CPU for the same handler run in a thread
  pool, 272 us run on the event loop itself), and a second server cannot share the port;
- the synchronous server's non-blocking streaming (`experimental_non_blocking`: the handler
  registers the stream and returns its thread; `send` writes from any thread) with 4 sender
  threads for every stream (server/delivery.py): about 42 us per delivery, 205 MB, 21 threads.
So the watch uses the last. In place (benchmarks/metadata_load.py --modes watch,poll, server
pinned to 1 core): 8,000 watches open in about 5 s, the server's RSS grows by 180 MB (22 KB a
stream), costs nothing idle, and delivers 10,300 events/s for 0.51 cores (50 us each) with a
write seen by its watchers after 45 ms (p50; p99 125-330 ms, a write fans out to 1,000 streams),
where the same 8,000 clients polling ListSources once a second saturate the core at 2,900
listings/s and see a write after 4 s (p50).

Limits: at most `max_watchers` open watches per server (RESOURCE_EXHAUSTED past it, naming
--max-watchers); per watch at most one queued event per record of its source.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from typing import Callable

import grpc

from sglang_mx import wire
from sglang_mx.errors import MxError, StoreUnavailableError
from sglang_mx.records import TOPOLOGY_VERIFIED_BYTES
from sglang_mx.server.delivery import DEFAULT_SENDERS, DEFAULT_STALL_S, Senders, Watcher
from sglang_mx.server.store import RecordState, SourceStore
from sglang_mx.tree import Useful, Waiting

log = logging.getLogger(__name__)

DEFAULT_MAX_WATCHERS = 10_000
DEFAULT_RESYNC_INTERVAL_S = 30.0
_TICK_S = 1.0  # the dispatcher looks for stuck senders this often
_RETRY_S = 1.0  # after the store failed a read


class TooManyWatchers(MxError):
    def __init__(self, held: int, limit: int) -> None:
        super().__init__(f"this server has {held} open watches, its limit (--max-watchers {limit}); "
                         "watch through another replica, or poll ListSources meanwhile")


class HubClosed(MxError):
    """The server is stopping."""


class Change(enum.Enum):
    FULL = "full"  # a publish, a removal, or a change of the status, load or another listed field
    PROGRESS = "progress"  # only the verified bytes changed


def classify(old: RecordState | None, new: RecordState | None) -> Change | None:
    """What changed from `old` to `new` (None: absent), ignoring updated_at; None when nothing did."""
    if old is None and new is None:
        return None
    if old is None or new is None or old.generation != new.generation:
        return Change.FULL
    a, b = old.ref, new.ref
    if _listed(a) != _listed(b):
        return Change.FULL
    if a.topology.get(TOPOLOGY_VERIFIED_BYTES) != b.topology.get(TOPOLOGY_VERIFIED_BYTES):
        return Change.PROGRESS
    return None


def _listed(ref) -> tuple:
    """Everything a watch shows of a ref but updated_at and the progress."""
    topology = {k: v for k, v in ref.topology.items() if k != TOPOLOGY_VERIFIED_BYTES}
    return ref.status, ref.source_load, ref.worker_rank, ref.model_name, ref.accelerator, topology


@dataclasses.dataclass(eq=False)
class _Source:
    """One watched source: the state last sent of each record, and its watches."""

    known: dict[str, RecordState] = dataclasses.field(default_factory=dict)
    loaded: bool = False
    waiting: list[Watcher] = dataclasses.field(default_factory=list)  # opened, snapshot not read yet
    # Watches that have their snapshot, by the rank they asked for (None: every rank).
    active: dict[int | None, set[Watcher]] = dataclasses.field(default_factory=dict)

    def empty(self) -> bool:
        return not self.waiting and not self.active

    def watching(self, worker_rank: int, *, every_rank: bool = True) -> list[Watcher]:
        """The active watches of `worker_rank` (and, with `every_rank`, those of every rank)."""
        found = list(self.active.get(worker_rank, ()))
        return found + list(self.active.get(None, ())) if every_rank else found

    def activate(self, watcher: Watcher) -> None:
        self.waiting.remove(watcher)
        self.active.setdefault(watcher.worker_rank, set()).add(watcher)

    def forget(self, watcher: Watcher) -> None:
        if watcher in self.waiting:
            self.waiting.remove(watcher)
        same_rank = self.active.get(watcher.worker_rank)
        if same_rank is not None:
            same_rank.discard(watcher)
            if not same_rank:
                del self.active[watcher.worker_rank]


class WatchHub:
    """Open watches of one server, fed by its store's changes. Thread-safe; `start()`, then `close()`."""

    def __init__(self, store: SourceStore, *, max_watchers: int = DEFAULT_MAX_WATCHERS,
                 senders: int = DEFAULT_SENDERS, stall_s: float = DEFAULT_STALL_S,
                 resync_interval_s: float = DEFAULT_RESYNC_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._max = max_watchers
        self._resync_s = resync_interval_s
        self._clock = clock
        self._senders = Senders(senders, stall_s=stall_s, clock=clock)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sources: dict[str, _Source] = {}
        self._dirty: dict[str, set[str]] = {}  # source -> workers to read again
        self._reload: set[str] = set()  # sources to read whole
        self._count = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mx-watch", daemon=True)

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "WatchHub":
        self._senders.start()
        self._store.subscribe(self)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """End every watch (UNAVAILABLE: watch again), stop the threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watchers = [w for src in self._sources.values()
                        for w in (*src.waiting, *(w for ws in src.active.values() for w in ws))]
            self._wake.notify()
        self._store.unsubscribe(self)
        for watcher in watchers:
            watcher.end(grpc.StatusCode.UNAVAILABLE,
                        "WatchSources: the metadata server is stopping; watch again (it or another replica)")
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        self._senders.close(timeout_s)

    @property
    def open_watches(self) -> int:
        with self._lock:
            return self._count

    @property
    def sender_threads(self) -> int:
        return self._senders.thread_count

    # --- watches ----------------------------------------------------------------------------------

    def open(self, mx_source_id: str, worker_rank: int | None, progress: bool, *,
             send: Callable[[bytes], None], end_stream: Callable[[grpc.StatusCode, str], None],
             waiting: Waiting | None = None) -> Watcher:
        """A new watch; its snapshot follows. TooManyWatchers past the limit, HubClosed when stopping.
        `waiting`: a waiting target's watch, sent after its snapshot only the changes that could give it a
        seed (`tree.Waiting.useful`)."""
        with self._lock:
            if self._closed:
                raise HubClosed("the metadata server is stopping")
            if self._count >= self._max:
                raise TooManyWatchers(self._count, self._max)
            watcher = Watcher(mx_source_id, worker_rank, progress, send=send, end_stream=end_stream,
                              senders=self._senders, on_release=self._release, waiting=waiting)
            self._sources.setdefault(mx_source_id, _Source()).waiting.append(watcher)
            self._reload.add(mx_source_id)
            self._count += 1
            self._wake.notify()
        return watcher

    def _release(self, watcher: Watcher) -> None:
        with self._lock:
            self._count -= 1
            src = self._sources.get(watcher.mx_source_id)
            if src is None:
                return
            src.forget(watcher)
            if src.empty():
                del self._sources[watcher.mx_source_id]
                self._dirty.pop(watcher.mx_source_id, None)

    # --- ChangeListener (the store) ---------------------------------------------------------------

    def changed(self, mx_source_id: str, worker_id: str) -> None:
        with self._lock:
            if mx_source_id in self._sources:
                self._dirty.setdefault(mx_source_id, set()).add(worker_id)
                self._wake.notify()

    def missed(self) -> None:
        with self._lock:
            self._reload.update(self._sources)
            self._wake.notify()

    # --- the dispatcher ---------------------------------------------------------------------------

    def _run(self) -> None:
        next_resync = self._clock() + self._resync_s
        next_try = 0.0  # after a failed read: not before this
        while True:
            self._senders.check_stalls()
            with self._lock:
                while not self._closed:
                    now = self._clock()
                    if now >= next_resync:
                        self._reload.update(self._sources)
                        next_resync = now + self._resync_s
                    if (self._dirty or self._reload) and now >= next_try:
                        break
                    if not self._wake.wait(timeout=_TICK_S):
                        break  # a tick: look at the senders
                if self._closed:
                    return
                if self._clock() < next_try:
                    continue  # a tick while the store is given time to come back
                reload = {s: list(self._sources[s].waiting) for s in self._reload if s in self._sources}
                dirty = {s: w for s, w in self._dirty.items() if s not in reload}
                self._reload, self._dirty = set(), {}
            ok = True
            for source_id, waiting in reload.items():
                ok &= self._load(source_id, waiting)
            for source_id, workers in dirty.items():
                ok &= self._refresh(source_id, workers)
            if not ok:
                next_try = self._clock() + _RETRY_S

    def _load(self, mx_source_id: str, waiting: list[Watcher]) -> bool:
        """Read a whole source: send what changed to its watches, snapshots to `waiting`."""
        try:
            states = self._store.states(mx_source_id)
        except StoreUnavailableError as e:
            log.warning("watch of %s: cannot read the store (%s); retrying", mx_source_id, e)
            for watcher in waiting:  # they watch again (with backoff) rather than wait here without a word
                watcher.end(grpc.StatusCode.UNAVAILABLE, f"WatchSources: {e}")
            with self._lock:
                if mx_source_id in self._sources:
                    self._reload.add(mx_source_id)
            return False
        with self._lock:
            src = self._sources.get(mx_source_id)
            if src is None:
                return True
            if src.loaded:
                for worker_id in src.known.keys() | states.keys():
                    self._apply(src, worker_id, states.get(worker_id))
            src.known, src.loaded = states, True
            self._send_snapshots(src, [w for w in waiting if w in src.waiting])
        return True

    def _refresh(self, mx_source_id: str, workers: set[str]) -> bool:
        """Read some records of a source again; send what changed."""
        try:
            states = self._store.states(mx_source_id, sorted(workers))
        except StoreUnavailableError as e:
            log.warning("watch of %s: cannot read the store (%s); retrying", mx_source_id, e)
            with self._lock:
                if mx_source_id in self._sources:
                    self._dirty.setdefault(mx_source_id, set()).update(workers)
            return False
        with self._lock:
            src = self._sources.get(mx_source_id)
            if src is not None and src.loaded:
                for worker_id in workers:
                    self._apply(src, worker_id, states.get(worker_id))
        return True

    def _send_snapshots(self, src: _Source, watchers: list[Watcher]) -> None:  # holding self._lock
        if not watchers:
            return
        ordered = sorted(src.known.values(), key=lambda s: (-s.ref.updated_at_ms, s.ref.worker_id))
        encoded = [(s.ref.worker_rank, wire.source_event_bytes(s.ref)) for s in ordered]
        for watcher in watchers:
            src.activate(watcher)
            watcher.offer_snapshot([data for rank, data in encoded if watcher.matches(rank)]
                                   + [wire.SNAPSHOT_END_BYTES])

    def _apply(self, src: _Source, worker_id: str, new: RecordState | None) -> None:  # holding self._lock
        old = src.known.get(worker_id)
        change = classify(old, new)
        if new is None:
            src.known.pop(worker_id, None)
        else:
            src.known[worker_id] = new
        if change is None:
            return
        if new is None or (old is not None and old.ref.worker_rank != new.ref.worker_rank):
            # Gone, or republished under another rank: gone for the watches of the old one (a waiting
            # target's watch is not told: a seed gone gives it none).
            gone = wire.source_event_bytes(old.ref, removed=True)
            for watcher in src.watching(old.ref.worker_rank, every_rank=new is None):
                if watcher.waiting is None:
                    watcher.offer(worker_id, gone)
        if new is not None:
            data = wire.source_event_bytes(new.ref)
            useful = Useful(new.ref)
            for watcher in src.watching(new.ref.worker_rank):
                if (watcher.progress or change is Change.FULL) and useful(watcher.waiting):
                    watcher.offer(worker_id, data)
