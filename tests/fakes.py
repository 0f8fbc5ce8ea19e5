"""Stand-ins for unit tests of our own logic (named as such): a clock the test moves by hand."""

from __future__ import annotations


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
