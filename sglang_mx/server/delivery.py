"""Writing watch events to open streams: one small queue per stream, a few sender threads for all.

A `Watcher` is one open WatchSources stream. It holds its snapshot (once) and at most one
event per worker: a newer event of a worker replaces the one not yet sent, since every event
carries the record's whole state. So a slow watcher costs at most one event per record of its
source, never a backlog; it gets the latest state of each worker, not every step.

`Senders` are the threads that write: server/watch.py says why a few threads write for every
stream instead of one thread per stream. A sender takes the next watcher with something to
send, writes ONE message and puts the watcher back at the end of the line if it has more: a
watcher with a big snapshot does not hold up the others. A write blocks while the stream's
client reads nothing (HTTP/2 flow control, after megabytes of buffered events); a sender busy
that long is replaced by a new thread, so one stuck client never stops the rest.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import grpc

from sglang_mx.tree import Waiting

log = logging.getLogger(__name__)

DEFAULT_SENDERS = 4  # more only add contention for the one GIL (README: the watch benchmark)
DEFAULT_STALL_S = 5.0
MAX_STALLED = 256  # replacement threads at most; past it a stuck client holds up the others


class Watcher:
    """One open stream and what it has yet to send. Thread-safe.

    `send(data)` writes one serialized event (blocking until gRPC took it); `end_stream(code,
    details)` ends the stream with that status; `on_release(watcher)` is called once, when the
    stream is over (ended here, or cancelled by its client: `release()`).
    """

    def __init__(self, mx_source_id: str, worker_rank: int | None, progress: bool, *,
                 send: Callable[[bytes], None], end_stream: Callable[[grpc.StatusCode, str], None],
                 senders: "Senders", on_release: Callable[["Watcher"], None], waiting: Waiting | None = None) -> None:
        self.mx_source_id, self.worker_rank, self.progress = mx_source_id, worker_rank, progress
        self.waiting = waiting  # a waiting target's watch: only the changes useful to it (server/watch.py)
        self._send, self._end_stream, self._senders, self._on_release = send, end_stream, senders, on_release
        self._lock = threading.Lock()
        self._snapshot: collections.deque[bytes] = collections.deque()
        self._pending: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # worker_id -> latest
        self._end: tuple[grpc.StatusCode, str] | None = None
        self._scheduled = False  # in the senders' line, or being sent
        self._released = False

    def matches(self, worker_rank: int) -> bool:
        return self.worker_rank is None or self.worker_rank == worker_rank

    def offer_snapshot(self, events: list[bytes]) -> None:
        """Queue the snapshot (its last event: snapshot_end) before anything offered later."""
        with self._lock:
            if self._released or self._end is not None:
                return
            self._snapshot.extend(events)
            self._schedule()

    def offer(self, worker_id: str, event: bytes) -> None:
        """Queue `event`, replacing an unsent one of the same worker (keeping that one's place)."""
        with self._lock:
            if self._released or self._end is not None:
                return
            self._pending[worker_id] = event
            self._schedule()

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream with that status, dropping what was not sent yet."""
        with self._lock:
            if self._released or self._end is not None:
                return
            self._end = (code, details)
            self._snapshot.clear()
            self._pending.clear()
            self._schedule()

    def release(self) -> None:
        """The stream is over: forget it. Idempotent (gRPC calls it on termination too)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._snapshot.clear()
            self._pending.clear()
        self._on_release(self)

    @property
    def released(self) -> bool:
        return self._released

    def _schedule(self) -> None:  # holding self._lock
        if not self._scheduled:
            self._scheduled = True
            self._senders.ready(self)

    def _take(self) -> bytes | tuple[grpc.StatusCode, str] | None:
        with self._lock:
            if self._released:
                item = None
            elif self._snapshot:
                return self._snapshot.popleft()
            elif self._pending:
                return self._pending.popitem(last=False)[1]
            else:
                item = self._end
            self._scheduled = False
            return item

    def deliver_one(self) -> bool:
        """Write the next message (a sender calls this); True when more is queued (back in line)."""
        item = self._take()
        if item is None:
            return False
        if isinstance(item, tuple):
            self._end_stream(*item)
            self.release()
            return False
        self._send(item)
        with self._lock:
            more = not self._released and bool(self._snapshot or self._pending or self._end)
            self._scheduled = more
            return more


class Senders:
    """`threads` threads writing for every watcher, one message per turn, plus replacements for
    threads stuck in one write longer than `stall_s` (at most MAX_STALLED at a time)."""

    def __init__(self, threads: int = DEFAULT_SENDERS, *, stall_s: float = DEFAULT_STALL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self._threads, self._stall_s, self._clock = threads, stall_s, clock
        self._cond = threading.Condition()
        self._line: collections.deque[Watcher] = collections.deque()
        self._busy: dict[int, float] = {}  # thread ident -> when its current write started
        self._stalled: set[int] = set()  # replaced: they exit after their write
        self._running: dict[int, threading.Thread] = {}
        self._closing = False

    def start(self) -> "Senders":
        with self._cond:
            for _ in range(self._threads):
                self._spawn()
        return self

    def _spawn(self) -> None:  # holding self._cond: the thread cannot end before it is recorded
        thread = threading.Thread(target=self._run, name="mx-watch-send", daemon=True)
        thread.start()
        self._running[thread.ident] = thread

    def ready(self, watcher: Watcher) -> None:
        with self._cond:
            self._line.append(watcher)
            self._cond.notify()

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            with self._cond:
                while not self._line and not self._closing:
                    self._cond.wait()
                if not self._line:
                    self._running.pop(me, None)
                    return
                watcher = self._line.popleft()
                self._busy[me] = self._clock()
            try:
                more = watcher.deliver_one()
            except Exception:  # one broken stream must not take a sender (and every stream's events) with it
                log.exception("watch stream of %s: writing failed; ending it", watcher.mx_source_id)
                watcher.release()
                more = False
            with self._cond:
                del self._busy[me]
                if more:
                    self._line.append(watcher)
                    self._cond.notify()
                if me in self._stalled:  # a replacement took this thread's place meanwhile
                    self._stalled.discard(me)
                    self._running.pop(me, None)
                    return

    def check_stalls(self) -> int:
        """Replace every thread writing for longer than `stall_s`; return how many are stuck now."""
        now = self._clock()
        with self._cond:
            for ident, since in self._busy.items():
                if now - since > self._stall_s and ident not in self._stalled and len(self._stalled) < MAX_STALLED:
                    self._stalled.add(ident)
                    log.warning("a watch stream has taken %.0f s to accept one event (its client reads nothing); "
                                "another sender thread takes over meanwhile", now - since)
                    if not self._closing:
                        self._spawn()
            return len(self._stalled)

    @property
    def thread_count(self) -> int:
        with self._cond:
            return len(self._running)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is in line (within `timeout_s`), then stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = list(self._running.values())
        deadline = self._clock() + timeout_s
        for thread in threads:
            thread.join(timeout=max(deadline - self._clock(), 0))
