"""What a long pull logs while it runs: bytes landed and verified, rate, per-seed spread, ETA.

Both pull paths feed one `PullProgress` from their read callbacks (`landed`, `verified`: a
read's bytes arrived, a tensor's digest matched) and, for striped pulls, from each round's
result (`settle`: what the round kept is the truth; what it threw away is read again). `tick`
logs one line when `interval_s` has passed on the injected clock since the last one.

The callbacks alone cannot keep that promise: `MooncakeEngine.read` runs them only once every
read of its job is submitted, and one large read (a model's tensors coalesced) lands without
any callback for as long as it moves. So while reads are in flight, `ticking()` runs a small
daemon thread that wakes when the next line is due; it is stopped when the block ends, on
every path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, Mapping

__all__ = ["PullProgress"]

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
_MIN_WAKE_S = 0.05


class PullProgress:
    """Thread-safe counts of one rank's pull, and the progress line logged at most every `interval_s`.

    `total_bytes`: what the pull must land; `total_checks`: the digests it will check ("tensors", or
    for a reshard "ranges"); `verifying`: False when nothing is checked (the line says so)."""

    def __init__(self, *, rank: int, total_bytes: int, total_checks: int, unit: str = "tensors",
                 verifying: bool = True, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = INTERVAL_S, logger: logging.Logger = log) -> None:
        self.rank = rank
        self.total_bytes = total_bytes
        self.total_checks = total_checks
        self.unit = unit
        self.verifying = verifying
        self.interval_s = interval_s
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._start: float | None = None  # the first read submitted
        self._last: float | None = None  # the last line logged (or the start)
        # Kept by earlier rounds (settled), plus what landed or verified in the round under way.
        self._kept = self._kept_verified_bytes = self._kept_checks = 0
        self._kept_by_seed: dict[str, int] = {}
        self._landed = self._verified_bytes = self._checks = 0
        self._by_seed: dict[str, int] = {}

    def start(self) -> None:
        """Reads begin (the first call counts; rates and the first line's delay run from it)."""
        with self._lock:
            if self._start is None:
                self._start = self._last = self._clock()

    def landed(self, seed: str, nbytes: int) -> None:
        """`nbytes` of a read from `seed` arrived."""
        with self._lock:
            self._landed += nbytes
            self._by_seed[seed] = self._by_seed.get(seed, 0) + nbytes

    def verified(self, nbytes: int, checks: int) -> None:
        """`checks` digests covering `nbytes` matched."""
        with self._lock:
            self._verified_bytes += nbytes
            self._checks += checks

    def settle(self, *, kept: int, verified_bytes: int, checks: int, by_seed: Mapping[str, int]) -> None:
        """A round ended: these are the totals kept so far (what failed is forgotten, to be read again)."""
        with self._lock:
            self._kept, self._kept_verified_bytes, self._kept_checks = kept, verified_bytes, checks
            self._kept_by_seed = dict(by_seed)
            self._landed = self._verified_bytes = self._checks = 0
            self._by_seed = {}

    def line(self) -> str:
        with self._lock:
            now = self._clock()
            landed = min(self._kept + self._landed, self.total_bytes)
            verified = min(self._kept_verified_bytes + self._verified_bytes, self.total_bytes)
            checks = self._kept_checks + self._checks
            by_seed = dict(self._kept_by_seed)
            for seed, n in self._by_seed.items():
                by_seed[seed] = by_seed.get(seed, 0) + n
            elapsed = now - self._start if self._start is not None else 0.0
        rate = landed / elapsed if elapsed > 0 else 0.0
        parts = [f"{landed / 1e9:.1f}/{self.total_bytes / 1e9:.1f} GB landed"]
        parts[0] += (f", {verified / 1e9:.1f} GB verified ({checks}/{self.total_checks} {self.unit})"
                     if self.verifying else " (not verified)")
        parts.append(f"{rate / 1e9:.1f} GB/s")
        seen = sum(by_seed.values())
        if seen:
            parts.append("seeds " + " ".join(f"{seed} {100 * n / seen:.0f}%" for seed, n in
                                             sorted(by_seed.items(), key=lambda item: -item[1])))
        left = self.total_bytes - landed
        parts.append(f"ETA {left / rate:.0f} s" if rate > 0 else "ETA ?")
        return f"modelexpress: pulling rank {self.rank}: " + ", ".join(parts)

    def tick(self) -> str | None:
        """Log the line when `interval_s` has passed since the last (or since `start`); the line, or None."""
        with self._lock:
            now = self._clock()
            if self._last is None or now - self._last < self.interval_s:
                return None
            self._last = now
        text = self.line()
        self._log.info("%s", text)
        return text

    def _due_in(self) -> float:
        with self._lock:
            last = self._last if self._last is not None else self._clock()
            return max(last + self.interval_s - self._clock(), _MIN_WAKE_S)

    @contextlib.contextmanager
    def ticking(self) -> Iterator["PullProgress"]:
        """Reads start; a daemon thread ticks whenever a line is due, until the block ends."""
        self.start()
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self._due_in()):
                self.tick()

        thread = threading.Thread(target=run, name=f"mx-progress-{self.rank}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
