"""Unit tests of our own delivery logic (server/delivery.py) and the hub's change rule (server/watch.py).

The streams here are recording functions standing in for gRPC's `send`: what is under test is
the queueing, coalescing and thread handling around them (tests/server/test_watch.py runs the
same code over real gRPC).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from sglang_mx.records import TOPOLOGY_VERIFIED_BYTES, SourceRef, SourceStatus
from sglang_mx.server.delivery import Senders, Watcher
from sglang_mx.server.store import RecordState
from sglang_mx.server.watch import Change, classify


class Stream:
    """Records what is written to it; `gate` (when given) holds each write until set."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.sent: list[bytes] = []
        self.ended: tuple | None = None
        self.gate = gate
        self.released = threading.Event()

    def send(self, data: bytes) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        self.sent.append(data)

    def end(self, code, details) -> None:
        self.ended = (code, details)

    def watcher(self, senders: Senders) -> Watcher:
        return Watcher("src", None, False, send=self.send, end_stream=self.end, senders=senders,
                       on_release=lambda _w: self.released.set())


def _wait(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class ManualSenders(Senders):
    """Senders whose line is emptied by the test itself, one message at a time (no threads)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.line: list[Watcher] = []

    def ready(self, watcher: Watcher) -> None:
        self.line.append(watcher)

    def step(self) -> None:
        watcher = self.line.pop(0)
        if watcher.deliver_one():
            self.line.append(watcher)


def test_a_watcher_sends_its_snapshot_first_then_the_latest_event_of_each_worker():
    senders, stream = ManualSenders(), Stream()
    watcher = stream.watcher(senders)
    watcher.offer_snapshot([b"s1", b"s2", b"end"])
    watcher.offer("w1", b"w1-a")
    watcher.offer("w2", b"w2-a")
    watcher.offer("w1", b"w1-b")  # replaces w1-a, keeping its place before w2
    assert len(senders.line) == 1  # scheduled once, however much it holds
    while senders.line:
        senders.step()
    assert stream.sent == [b"s1", b"s2", b"end", b"w1-b", b"w2-a"]


def test_a_watcher_holds_at_most_one_event_per_worker():
    senders, stream = ManualSenders(), Stream()
    watcher = stream.watcher(senders)
    for step in range(10_000):
        watcher.offer(f"w{step % 3}", f"{step}".encode())
    while senders.line:
        senders.step()
    assert stream.sent == [b"9999", b"9997", b"9998"]  # w0, w1, w2 in first-offered order, latest each


def test_end_drops_what_is_queued_sends_the_status_and_releases_once():
    senders, stream = ManualSenders(), Stream()
    watcher = stream.watcher(senders)
    watcher.offer("w1", b"never")
    watcher.end(grpc.StatusCode.UNAVAILABLE, "stopping")
    watcher.offer("w1", b"after")  # ignored
    while senders.line:
        senders.step()
    assert stream.sent == [] and stream.ended == (grpc.StatusCode.UNAVAILABLE, "stopping")
    assert stream.released.is_set() and watcher.released
    watcher.release()  # again: nothing


def test_a_released_watcher_sends_nothing_more():
    senders, stream = ManualSenders(), Stream()
    watcher = stream.watcher(senders)
    watcher.offer("w1", b"x")
    watcher.release()
    while senders.line:
        senders.step()
    assert stream.sent == [] and stream.ended is None


def test_a_stuck_stream_is_left_to_its_thread_and_the_others_keep_getting_events():
    clock = [0.0]
    senders = Senders(1, stall_s=5.0, clock=lambda: clock[0]).start()
    gate = threading.Event()
    stuck, healthy = Stream(gate), Stream()
    try:
        stuck.watcher(senders).offer("w", b"blocked")
        _wait(lambda: senders._busy)  # the one sender is inside the stuck write
        healthy_watcher = healthy.watcher(senders)
        healthy_watcher.offer("w", b"first")
        time.sleep(0.05)
        assert healthy.sent == []  # one thread, stuck
        clock[0] = 6.0
        assert senders.check_stalls() == 1
        _wait(lambda: healthy.sent == [b"first"])
        assert senders.thread_count == 2
        gate.set()  # the client reads again: the write finishes and its thread ends (it was replaced)
        _wait(lambda: stuck.sent == [b"blocked"] and senders.thread_count == 1)
        healthy_watcher.offer("w", b"second")
        _wait(lambda: healthy.sent == [b"first", b"second"])
    finally:
        gate.set()
        senders.close(timeout_s=5)
    assert senders.thread_count == 0


def test_senders_close_after_writing_what_is_in_line():
    senders = Senders(2).start()
    streams = [Stream() for _ in range(20)]
    for i, stream in enumerate(streams):
        stream.watcher(senders).offer_snapshot([b"a", b"b"])
    senders.close(timeout_s=5)
    assert all(s.sent == [b"a", b"b"] for s in streams)
    assert senders.thread_count == 0


# --- the change rule ------------------------------------------------------------------------------------

def _state(generation="g1", *, status=SourceStatus.READY, load=None, at=1, **topology) -> RecordState:
    ref = SourceRef(mx_source_id="s", worker_id="w", model_name="m", worker_rank=0, status=status, updated_at_ms=at,
                    topology=topology, source_load=load)
    return RecordState(ref, generation)


@pytest.mark.parametrize("old, new, change", [
    (None, None, None),
    (None, _state(), Change.FULL),
    (_state(), None, Change.FULL),
    (_state(at=1), _state(at=2), None),  # a heartbeat
    (_state("g1"), _state("g2"), Change.FULL),  # a republish of the same fields
    (_state(status=SourceStatus.INITIALIZING), _state(), Change.FULL),
    (_state(load=0.0), _state(load=1.0), Change.FULL),
    (_state(node="a"), _state(node="b"), Change.FULL),
    (_state(**{TOPOLOGY_VERIFIED_BYTES: "1"}), _state(at=9, **{TOPOLOGY_VERIFIED_BYTES: "2"}), Change.PROGRESS),
    (_state(), _state(**{TOPOLOGY_VERIFIED_BYTES: "2"}), Change.PROGRESS),
    (_state(load=0.0, **{TOPOLOGY_VERIFIED_BYTES: "1"}), _state(load=1.0, **{TOPOLOGY_VERIFIED_BYTES: "2"}),
     Change.FULL),
])
def test_classify(old, new, change):
    assert classify(old, new) is change
