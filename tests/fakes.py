"""Stand-ins for unit tests of our own logic (named as such): a clock the test moves by hand, and
reader leases that never leave the process."""

from __future__ import annotations

from sglang_mx import leases


class FakeClock:
    """`clock()` returns the fake time; `sleep(s)` records s and advances it at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeLeases:
    """Stands in for sglang_mx.leases.acquire: workers in `busy` refuse; counts grants and releases."""

    def __init__(self, busy=()) -> None:
        self.busy = set(busy)
        self.granted: list[str] = []
        self.released: list[str] = []

    def acquire(self, endpoint, mx_source_id, worker_id, *, timeout_s):
        if worker_id in self.busy:
            raise leases.SeedBusyError(worker_id, "at max_readers")
        self.granted.append(worker_id)
        outer = self

        class Lease:
            def release(self):
                outer.released.append(worker_id)

        return Lease()
