"""How a target waits for a seed: told by the metadata server's watch, or polling where there is none.

A target that found no seed it could use (none READY, or all at max_readers) waits for the
next change of its source and rank: a seed published, a status or load change (a lease freed),
a seed gone. sglang-mx's metadata server streams those (`MxWatchService.WatchSources`), so the
target sleeps until one arrives instead of re-listing every poll interval; a ModelExpress
server has no watch (UNIMPLEMENTED), and the target polls as before.

No change is missed: the stream is opened at the first wait, and that first wait returns at
once so the caller lists again. Any change after the stream opened then wakes a later wait;
any change before it is in that listing. The stream is closed when the pull ends.

Only a change that could give the target a seed wakes it (`helps`, `tree.could_serve`: a READY
seed not at its cap, a partial seed the tree allows): with hundreds of targets waiting, every
heartbeat of a busier seed or a target still loading would otherwise send all of them to list
and fetch records again. A passed-over change is still in the next listing. The server is told the
same rule when the watch opens (`tree.Waiting`, with the target's depth then) and sends no other
change at all: with thousands of waiting targets, most changes would otherwise go to every one.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from sglang_mx.client import MetadataClient
from sglang_mx.errors import ServerError, WatchUnsupportedError
from sglang_mx.records import SourceRef
from sglang_mx.tree import Waiting

log = logging.getLogger(__name__)

WATCHED_WAIT_S = 30.0
"""With a watch, the longest wait without an event before listing again anyway (a lost stream, a clock)."""


class SeedWaiter:
    """One pull's waiting: `wait(timeout_s)` returns when a change of its source and rank arrived, or
    after `timeout_s` (polling: `poll_interval_s`). `close()` ends the stream."""

    def __init__(self, client: MetadataClient, mx_source_id: str, worker_rank: int, *, poll_interval_s: float,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 use_watch: bool = True, waiting: Callable[[], Waiting] | None = None) -> None:
        """`waiting()`: this target as it waits (tree.Waiting), told to the server when the watch opens, so
        that it sends only the changes that could give this target a seed."""
        self._client = client
        self._source_id = mx_source_id
        self._rank = worker_rank
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._sleep = sleep
        self._watch = None
        self._tried = not use_watch  # opening the watch was tried (or is not wanted)
        self._waiting = waiting
        self.woken = 0  # waits that an event ended (for logs and tests)
        self.passed = 0  # events that could not help, passed over without listing again

    @property
    def watching(self) -> bool:
        return self._watch is not None

    def wait(self, timeout_s: float, helps: Callable[[SourceRef], bool] | None = None) -> None:
        """Return after a change, or `timeout_s`. `helps(record)` (with the watch): only a change whose
        record it accepts ends the wait (`tree.could_serve`: a seed the target would ask); the
        others are passed over. Polling, every interval ends it."""
        watch_sources = getattr(self._client, "watch_sources", None)  # a client of its own (a test's) may lack it
        if not self._tried and watch_sources is not None:
            self._tried = True
            try:
                told = {"waiting": self._waiting()} if self._waiting is not None else {}
                self._watch = watch_sources(self._source_id, worker_rank=self._rank, **told)
                log.info("waiting for a seed of %s rank %d: watching the metadata server for changes",
                         self._source_id, self._rank)
                self._skip_snapshot()
                return  # list again now: a change before the stream opened is in that listing
            except WatchUnsupportedError:
                log.info("the metadata server %s has no watch: polling every %g s", self._client.url,
                         self._poll_interval_s)
            except ServerError as e:
                log.warning("could not watch the metadata server %s (%s): polling every %g s", self._client.url, e,
                            self._poll_interval_s)
        if self._watch is None:
            self._sleep(min(self._poll_interval_s, timeout_s))
            return
        deadline = self._clock() + min(WATCHED_WAIT_S, timeout_s)
        try:
            while True:
                events = self._watch.wait(max(deadline - self._clock(), 0.0))
                if not events:
                    return  # the time is up
                if helps is None or any(e.ref is not None and not e.removed and helps(e.ref) for e in events):
                    self.woken += 1
                    return
                self.passed += len(events)
                if self._clock() >= deadline:
                    return
        except ServerError as e:  # the stream ended for good (refused on reconnect): poll from here on
            log.warning("the watch of metadata server %s ended (%s): polling every %g s", self._client.url, e,
                        self._poll_interval_s)
            self.close()

    def _skip_snapshot(self) -> None:
        """Take the stream's first batch (the records as they are: the listing that follows has them),
        so that the next wait waits for a change. Bounded: a snapshot still arriving after a second
        only costs one early listing."""
        deadline = self._clock() + 1.0
        while self._clock() < deadline:
            events = self._watch.wait(max(deadline - self._clock(), 0.0))
            if any(e.snapshot_end for e in events):
                return

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
