"""PullProgress: the line, how often it appears, and a real striped pull that logs it (fake clock)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from sglang_mx.target.progress import PullProgress
from tests.fakes import FakeClock
from tests.target.test_fleet_policy import FakeClient, FakeEngine, pull

GB = 10**9


def progress(clock, **kw) -> PullProgress:
    kw = {"rank": 3, "total_bytes": 10 * GB, "total_checks": 1650, **kw}
    return PullProgress(clock=clock, **kw)


def test_a_line_appears_at_most_every_interval():
    clock = FakeClock()
    p = progress(clock)
    assert p.tick() is None  # not started: nothing to say
    p.start()
    lines = []
    for t in (0.0, 4.9, 5.0, 5.1, 9.9, 10.0, 30.0, 30.5):
        clock.now = t
        lines.append((t, p.tick() is not None))
    assert [t for t, logged in lines if logged] == [5.0, 10.0, 30.0]


def test_the_line_says_bytes_checks_rate_spread_and_eta(caplog):
    clock = FakeClock()
    p = progress(clock)
    p.start()
    p.landed("a", 1.8 * GB)
    p.landed("b", 1.2 * GB)
    p.verified(int(2.5 * GB), 512)
    clock.now = 5.0
    with caplog.at_level(logging.INFO, logger="sglang_mx.target.progress"):
        line = p.tick()
    # 3 GB in 5 s: 0.6 GB/s; 7 GB left: 11.7 s.
    assert line == ("modelexpress: pulling rank 3: 3.0/10.0 GB landed, 2.5 GB verified (512/1650 tensors), "
                    "0.6 GB/s, seeds a 60% b 40%, ETA 12 s")
    assert caplog.messages == [line]


def test_a_settled_round_replaces_what_landed_in_it():
    clock = FakeClock()
    p = progress(clock, total_bytes=4 * GB, total_checks=4)
    p.start()
    p.landed("a", 2 * GB)
    p.landed("b", 2 * GB)  # b's stripe then fails its digest: only a's half is kept
    p.settle(kept=2 * GB, verified_bytes=2 * GB, checks=2, by_seed={"a": 2 * GB})
    p.landed("a", 1 * GB)  # round 2, from a alone
    clock.now = 10.0
    assert p.line() == ("modelexpress: pulling rank 3: 3.0/4.0 GB landed, 2.0 GB verified (2/4 tensors), "
                        "0.3 GB/s, seeds a 100%, ETA 3 s")


def test_nothing_landed_and_nothing_verified_say_so():
    clock = FakeClock()
    p = progress(clock, verifying=False)
    p.start()
    clock.now = 5.0
    assert p.line() == "modelexpress: pulling rank 3: 0.0/10.0 GB landed (not verified), 0.0 GB/s, ETA ?"
    p.landed("a", 20 * GB)  # more than the total (a re-read not yet settled): never past 100%
    assert p.line().startswith("modelexpress: pulling rank 3: 10.0/10.0 GB landed (not verified), 2.0 GB/s")
    assert p.line().endswith("ETA 0 s")


def _tickers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mx-progress")]


def test_the_ticker_logs_while_nothing_calls_back_and_stops_on_every_path():
    p = PullProgress(rank=0, total_bytes=GB, total_checks=1, interval_s=0.05)
    lines = []
    p.tick = lambda: lines.append(PullProgress.tick(p))
    with p.ticking():
        time.sleep(0.3)  # a long read: no callback runs
    assert len([x for x in lines if x]) >= 2 and not _tickers()
    with pytest.raises(RuntimeError), p.ticking():
        raise RuntimeError("a read failed")
    assert not _tickers()


class SlowEngine(FakeEngine):
    """Each read takes 6 s of the fake clock, then its callback runs, as the real engine's does."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def read(self, session, reads, *, prepare=None, on_done=None, **kw):
        super().read(session, reads)
        for i, _ in enumerate(reads):
            self.clock.now += 6.0
            if on_done is not None:
                on_done(i)


def test_a_striped_pull_logs_progress_when_its_clock_passes_the_interval(fake_leases, caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="sglang_mx.target.progress"):
        report = pull(FakeClient(["a"]), SlowEngine(clock), clock, verifier=lambda expected: [], verify="require")
    assert report.verified == 3
    assert _progress_lines(caplog) == ["modelexpress: pulling rank 0: 0.0/0.0 GB landed, 0.0 GB verified (3/3 tensors), "
                               "0.0 GB/s, seeds a 100%, ETA 0 s"]
    assert not _tickers()


def test_a_quick_striped_pull_logs_no_progress(fake_leases, caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="sglang_mx.target.progress"):
        pull(FakeClient(["a", "b"]), FakeEngine(), clock, max_seeds=2)
    assert _progress_lines(caplog) == []


def _progress_lines(caplog) -> list[str]:
    """The progress tracker's lines only: other INFO lines of the pull show when an earlier test in the
    session set the package logger to INFO (SGLang glue does)."""
    return [r.getMessage() for r in caplog.records if r.name == "sglang_mx.target.progress"]
