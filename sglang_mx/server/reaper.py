"""The reaper: a thread that expires records on a fixed interval."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sglang_mx.errors import StoreUnavailableError
from sglang_mx.server.store import SourceStore

log = logging.getLogger(__name__)


class Reaper:
    """Calls `store.reap` every `interval_s` until closed."""

    def __init__(
        self,
        store: SourceStore,
        *,
        interval_s: float,
        heartbeat_timeout_s: float,
        gc_timeout_s: float,
        clock_ms: Callable[[], int],
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._heartbeat_timeout_ms = int(heartbeat_timeout_s * 1000)
        self._gc_timeout_ms = int(gc_timeout_s * 1000)
        self._clock_ms = clock_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mx-reaper", daemon=True)

    def start(self) -> "Reaper":
        self._thread.start()
        return self

    def reap_once(self) -> None:
        stats = self._store.reap(self._clock_ms(), self._heartbeat_timeout_ms, self._gc_timeout_ms)
        if stats.marked_stale or stats.deleted:
            log.info("reaper: %d record(s) marked STALE, %d deleted", stats.marked_stale, stats.deleted)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.reap_once()
            except StoreUnavailableError as e:
                log.warning("reaper pass skipped, retrying in %.1f s: %s", self._interval_s, e)
            except Exception:  # a store outage must not kill the reaper for good
                log.exception("reaper pass failed; retrying in %.1f s", self._interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
