"""SeedWaiter over a real metadata server's watch (in this process, real gRPC, the real client): a
change that cannot give the waiting target a seed (one still loading, one at its cap) is passed
over without listing again; the change that can (a slot freed) ends the wait."""

from __future__ import annotations

import threading
import time

from sglang_mx.records import TOPOLOGY_DEPTH, TOPOLOGY_MAX_READERS, TOPOLOGY_PIPELINE, SourceRef, SourceStatus
from sglang_mx.target.waiting import SeedWaiter
from sglang_mx.tree import Waiting, could_serve

INIT, READY = SourceStatus.INITIALIZING, SourceStatus.READY


def _changes(client, identity, make_worker, source: str) -> None:
    time.sleep(0.3)
    client.publish(identity, make_worker(0, status=INIT, topology={TOPOLOGY_MAX_READERS: "1"}), "full")  # loading
    client.update_status(source, "full", 0, READY, source_load=1.0)  # READY, but at its cap of 1
    time.sleep(0.5)
    client.update_status(source, "full", 0, READY, source_load=0.0)  # its reader left: a slot


def _wait_through_changes(waiter, client, identity, make_worker, source, helps=None) -> float:
    """Open the watch, then wait while `_changes` runs: the seconds the wait took."""
    waiter.wait(10, helps=helps)  # opens the watch and returns at once: the caller lists
    assert waiter.watching
    changes = threading.Thread(target=_changes, args=(client, identity, make_worker, source))
    started = time.monotonic()
    changes.start()
    waiter.wait(10, helps=helps)
    waited = time.monotonic() - started
    changes.join()
    return waited


def test_a_wait_passes_over_changes_that_give_no_seed_and_ends_on_one_that_does(client, make_identity,
                                                                                make_worker):
    identity = make_identity()
    source = client.publish(identity, make_worker(0, status=INIT), "other")
    waiter = SeedWaiter(client, source, 0, poll_interval_s=60)
    try:
        waited = _wait_through_changes(waiter, client, identity, make_worker, source, could_serve)
    finally:
        waiter.close()
    assert 0.8 <= waited < 9  # not at the first change, nor at the timeout
    assert waiter.woken == 1 and waiter.passed >= 2


def test_a_waiting_targets_watch_is_sent_only_the_change_that_gives_it_a_seed(client, make_identity,
                                                                            make_worker):
    # The server applies the same rule (told when the watch opens): the loading seed and the seed at its cap
    # are never sent, so the waiter has nothing to pass over.
    identity = make_identity()
    source = client.publish(identity, make_worker(0, status=INIT), "other")
    waiter = SeedWaiter(client, source, 0, poll_interval_s=60, waiting=lambda: Waiting())
    plain = client.watch_sources(source, worker_rank=0)  # beside it, a watch of everything (sources --watch)
    try:
        waited = _wait_through_changes(waiter, client, identity, make_worker, source, could_serve)
        seen, snapshot_over = [], False
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and len(seen) < 3:
            for e in plain.wait(0.2):
                if snapshot_over and e.ref is not None:
                    seen.append(e)
                snapshot_over |= e.snapshot_end
    finally:
        waiter.close()
        plain.close()
    assert 0.8 <= waited < 9 and waiter.woken == 1
    assert waiter.passed == 0  # nothing useless arrived
    assert len(seen) >= 2  # the plain watch was sent the changes (two close together may coalesce)


def test_without_a_test_any_change_ends_the_wait(client, make_identity, make_worker):
    identity = make_identity()
    source = client.publish(identity, make_worker(0, status=INIT), "other")
    waiter = SeedWaiter(client, source, 0, poll_interval_s=60)
    try:
        waited = _wait_through_changes(waiter, client, identity, make_worker, source)
    finally:
        waiter.close()
    assert waited < 0.8 and waiter.woken == 1 and waiter.passed == 0


def _ref(worker_id, status=READY, *, load=None, cap=None, depth=None):
    topology = {TOPOLOGY_MAX_READERS: str(cap)} if cap else {}
    if depth is not None:
        topology |= {TOPOLOGY_PIPELINE: "1", TOPOLOGY_DEPTH: str(depth)}
    return SourceRef(mx_source_id="id", worker_id=worker_id, model_name="m", worker_rank=0, status=status,
                     updated_at_ms=1, topology=topology, source_load=load)


def test_could_serve_is_what_the_candidate_order_would_ask():
    assert could_serve(_ref("a"))
    assert could_serve(_ref("a", load=1.0, cap=2))
    assert not could_serve(_ref("a", load=2.0, cap=2))  # at its cap
    assert not could_serve(_ref("a", INIT))  # loading, not a partial seed
    assert not could_serve(_ref("a"), refused={"a"})  # failed this pull: never asked again
    assert not could_serve(_ref("a"), own_worker="a")
    partial = _ref("p", INIT, depth=2)
    assert not could_serve(partial)  # not pipelined: partial seeds are not candidates
    assert could_serve(partial, pipeline=True)
    assert could_serve(partial, pipeline=True, own_depth=3)
    assert not could_serve(partial, pipeline=True, own_depth=2)  # not shallower than us
    assert not could_serve(_ref("p", INIT, depth=1, load=1.0, cap=1), pipeline=True)
