"""MxWatchService.WatchSources end to end: a real server in this process, real gRPC, the real client.

What a watch sends (the snapshot, then one event per change, as ListSources lists the record),
what it leaves out (other ranks, progress unless asked, heartbeats that change nothing), the
reaper's removals, the watcher cap, a server without the service, stopping with open streams,
reconnecting, and two replicas over one real redis-server.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from sglang_mx import wire
from sglang_mx.client import MetadataClient, SourceWatch
from sglang_mx.errors import ServerError, WatchUnsupportedError
from sglang_mx.records import TOPOLOGY_VERIFIED_BYTES, SourceEvent, SourceStatus
from sglang_mx.server import MemoryStore
from sglang_mx.server.service import P2pServicer

INIT, READY, STALE = SourceStatus.INITIALIZING, SourceStatus.READY, SourceStatus.STALE


def collect(watch: SourceWatch, until, *, timeout_s: float = 10.0) -> list[SourceEvent]:
    """Events of `watch` until `until(events)` holds; fails after `timeout_s`."""
    events: list[SourceEvent] = []
    deadline = time.monotonic() + timeout_s
    while not until(events):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; got {events}"
        events += watch.wait(min(remaining, 0.5))
    return events


def snapshot(watch: SourceWatch) -> list[SourceEvent]:
    """The snapshot of a watch just opened: its records, without the closing snapshot_end."""
    events = collect(watch, lambda evs: any(e.snapshot_end for e in evs))
    assert events[-1] == SourceEvent(ref=None, removed=False, snapshot_end=True)
    return events[:-1]


def quiet(watch: SourceWatch, seconds: float = 0.3) -> list[SourceEvent]:
    """What arrives within `seconds` (used after a marker event has shown that the server is done)."""
    return watch.wait(seconds)


def _ids(events) -> list[tuple[str, SourceStatus]]:
    return [(e.ref.worker_id, e.ref.status) for e in events]


@pytest.fixture
def source(client, make_identity, make_worker) -> str:
    """Rank 0 READY (w0), rank 1 INITIALIZING (w1), published in that order."""
    client.publish(make_identity(), make_worker(0, status=READY), "w0")
    return client.publish(make_identity(), make_worker(1, status=INIT), "w1")


def test_snapshot_then_one_event_per_change(client, source, make_identity, make_worker):
    with client.watch_sources(source) as watch:
        first = snapshot(watch)
        assert sorted(_ids(first)) == [("w0", READY), ("w1", INIT)]
        assert first[0].ref.updated_at_ms >= first[1].ref.updated_at_ms  # newest first, as ListSources
        listed = {r.worker_id: r for r in client.list_sources(make_identity())}
        for event in first:  # the ref exactly as ListSources builds it, with the status
            assert event.ref == type(event.ref)(**{**vars(listed[event.ref.worker_id]), "status": event.ref.status})

        client.update_status(source, "w1", 1, READY)
        assert _ids(collect(watch, lambda evs: evs)) == [("w1", READY)]
        client.update_status(source, "w0", 0, READY, source_load=2.0)
        [event] = collect(watch, lambda evs: evs)
        assert (event.ref.worker_id, event.ref.source_load) == ("w0", 2.0)
        client.publish(make_identity(), make_worker(2, status=INIT), "w2")
        [event] = collect(watch, lambda evs: evs)
        assert (event.ref.worker_id, event.ref.worker_rank, event.ref.status, event.removed) == ("w2", 2, INIT, False)
        client.publish(make_identity(), make_worker(2, status=INIT), "w2")  # the same again: a publish is news
        assert _ids(collect(watch, lambda evs: evs)) == [("w2", INIT)]


def test_an_empty_source_sends_only_snapshot_end_then_its_first_record(client, make_identity, make_worker):
    from sglang_mx.identity import mx_source_id

    source = mx_source_id(make_identity())
    with client.watch_sources(source) as watch:
        assert snapshot(watch) == []
        client.publish(make_identity(), make_worker(0, status=INIT), "w0")
        assert _ids(collect(watch, lambda evs: evs)) == [("w0", INIT)]


def test_a_rank_filter_sends_that_rank_only(client, source, make_identity, make_worker):
    with client.watch_sources(source, worker_rank=1) as watch:
        assert _ids(snapshot(watch)) == [("w1", INIT)]
        client.update_status(source, "w0", 0, READY, source_load=1.0)  # rank 0: not for this watch
        client.update_status(source, "w1", 1, READY)
        assert _ids(collect(watch, lambda evs: evs)) == [("w1", READY)]
        assert quiet(watch) == []


def test_a_worker_republished_under_another_rank_is_removed_for_watches_of_the_old_one(client, source,
                                                                                    make_identity, make_worker):
    with client.watch_sources(source, worker_rank=0) as old_rank, client.watch_sources(source, worker_rank=2) as new:
        snapshot(old_rank), snapshot(new)
        client.publish(make_identity(), make_worker(2, status=INIT), "w0")
        [gone] = collect(old_rank, lambda evs: evs)
        assert (gone.ref.worker_id, gone.ref.worker_rank, gone.removed) == ("w0", 0, True)
        [moved] = collect(new, lambda evs: evs)
        assert (moved.ref.worker_id, moved.ref.worker_rank, moved.removed) == ("w0", 2, False)


def test_progress_alone_goes_only_to_watches_that_ask_for_it(client, source):
    with client.watch_sources(source, worker_rank=1, progress=True) as eager, \
            client.watch_sources(source, worker_rank=1) as plain:
        snapshot(eager), snapshot(plain)
        client.update_status(source, "w1", 1, INIT, verified_bytes=4096)
        [event] = collect(eager, lambda evs: evs)
        assert (event.ref.status, event.ref.topology[TOPOLOGY_VERIFIED_BYTES]) == (INIT, "4096")
        client.update_status(source, "w1", 1, INIT, verified_bytes=8192)
        assert collect(eager, lambda evs: evs)[-1].ref.topology[TOPOLOGY_VERIFIED_BYTES] == "8192"
        client.update_status(source, "w1", 1, READY)  # a status change: both, with the progress so far
        for watch in (eager, plain):
            [event] = collect(watch, lambda evs: evs)
            assert (event.ref.status, event.ref.topology[TOPOLOGY_VERIFIED_BYTES]) == (READY, "8192")
        assert quiet(plain) == []


def test_a_heartbeat_that_changes_nothing_sends_nothing(client, source):
    with client.watch_sources(source, progress=True) as watch:
        snapshot(watch)
        client.update_status(source, "w0", 0, READY, source_load=1.0)
        collect(watch, lambda evs: evs)
        for _ in range(5):
            client.update_status(source, "w0", 0, READY)
            client.update_status(source, "w0", 0, READY, source_load=1.0)
        client.update_status(source, "w1", 1, READY)  # the marker: everything before it was handled
        assert _ids(collect(watch, lambda evs: evs)) == [("w1", READY)]
        assert quiet(watch) == []


def test_the_reaper_s_stale_mark_and_removal_are_sent(make_server, make_identity, make_worker):
    server = make_server(heartbeat_timeout_s=0.3, gc_timeout_s=0.6, reaper_interval_s=0.05)
    with MetadataClient(server.address, timeout_s=5) as client:
        source = client.publish(make_identity(), make_worker(0, status=READY), "w0")
        with client.watch_sources(source) as watch:
            events = collect(watch, lambda evs: any(e.removed for e in evs))
        assert [(e.ref.worker_id, e.ref.status, e.removed) for e in events if not e.snapshot_end][-2:] == [
            ("w0", STALE, False), ("w0", STALE, True)]


def test_past_max_watchers_a_watch_is_refused_naming_the_flag(make_server):
    server = make_server(max_watchers=2)
    with MetadataClient(server.address, timeout_s=5) as client:
        source = "0123456789abcdef"
        with client.watch_sources(source), client.watch_sources(source, worker_rank=3):
            with pytest.raises(ServerError) as info:
                client.watch_sources(source)
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert "this server has 2 open watches, its limit (--max-watchers 2)" in str(info.value)
        deadline = time.monotonic() + 5
        while server.open_watches:  # the client's cancel reaches the server
            assert time.monotonic() < deadline, f"{server.open_watches} watches still open"
            time.sleep(0.02)
        with client.watch_sources(source) as watch:
            assert snapshot(watch) == []


@pytest.mark.parametrize("request_fields, message", [
    (dict(mx_source_id=""), "WatchSources: mx_source_id is empty"),
    (dict(mx_source_id="x" * 1025), "WatchSources: mx_source_id is 1025 characters long; the limit is 1024"),
    (dict(mx_source_id="s", worker_rank=1_000_001), "WatchSources: worker_rank is 1000001; the limit is 1000000"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(server, request_fields, message):
    with grpc.insecure_channel(server.address) as channel:
        call = wire.MxWatchServiceStub(channel).WatchSources(wire.messages.MxWatchSourcesRequest(**request_fields),
                                                            timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_a_server_without_the_watch_service_raises_watch_unsupported(unused_port):
    """A gRPC server that serves P2pService only (our generated code and servicer), as a ModelExpress
    server does: it answers WatchSources UNIMPLEMENTED, and the client says to poll instead."""
    only_p2p = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    wire.add_servicer_to_server(P2pServicer(MemoryStore(), heartbeat_timeout_s=90), only_p2p)
    only_p2p.add_insecure_port(f"127.0.0.1:{unused_port}")
    only_p2p.start()
    try:
        with MetadataClient(f"127.0.0.1:{unused_port}", timeout_s=5) as client:
            assert client.list_sources() == []
            with pytest.raises(WatchUnsupportedError, match="poll ListSources instead") as info:
                client.watch_sources("0123456789abcdef")
            assert info.value.code == "UNIMPLEMENTED"
    finally:
        only_p2p.stop(None)


def test_open_watches_hold_no_thread(client, server, source):
    before = threading.active_count()
    watches = [client.watch_sources(source, worker_rank=i % 2) for i in range(60)]
    try:
        for watch in watches:
            snapshot(watch)
        assert server.open_watches == 60
        # Each client watch has a reading thread of its own (60 here); the server adds none per stream.
        assert threading.active_count() - before - 60 <= 4
    finally:
        for watch in watches:
            watch.close()


def test_stop_with_open_streams_returns_promptly(make_server, make_identity, make_worker):
    server = make_server()
    with MetadataClient(server.address, timeout_s=5) as client:
        source = client.publish(make_identity(), make_worker(0, status=READY), "w0")
        watches = [client.watch_sources(source) for _ in range(40)]
        for watch in watches:
            snapshot(watch)
        threads_before = {t.name for t in threading.enumerate()}
        assert {"mx-watch", "mx-watch-send"} <= threads_before
        started = time.monotonic()
        server.stop(grace_s=5)
        assert time.monotonic() - started < 2.0
        assert not [t for t in threading.enumerate() if t.name in ("mx-watch", "mx-watch-send") and t.is_alive()]
        for watch in watches:
            assert watch.wait(0.01) == []  # the stream ended; the watch keeps trying, quietly
            watch.close()


def test_a_watch_opens_again_after_the_server_restarts(make_server, make_identity, make_worker, unused_port):
    first = make_server(port=unused_port)
    with MetadataClient(first.address, timeout_s=5, backoff_s=0.05) as client:
        source = client.publish(make_identity(), make_worker(0, status=READY), "w0")
        with client.watch_sources(source) as watch:
            assert _ids(snapshot(watch)) == [("w0", READY)]
            first.stop(grace_s=0.5)
            second = make_server(port=unused_port)  # an empty memory store: the seed publishes again
            client.publish(make_identity(), make_worker(0, status=INIT), "w0-again")
            events = collect(watch, lambda evs: any(e.ref and e.ref.worker_id == "w0-again" for e in evs))
            assert watch.reconnects >= 1
            assert second.open_watches == 1
            assert [e for e in events if e.ref and e.ref.worker_id == "w0"] == []


def test_a_reader_token_may_watch_and_no_token_may_not(make_server, tmp_path, make_identity, make_worker):
    (tmp_path / "writer").write_text("writer-token\n")
    (tmp_path / "reader").write_text("reader-token\n")
    server = make_server(writer_token_file=str(tmp_path / "writer"), reader_token_file=str(tmp_path / "reader"))
    with MetadataClient(server.address, auth_token="writer-token", timeout_s=5) as writer:
        source = writer.publish(make_identity(), make_worker(0, status=READY), "w0")
    with MetadataClient(server.address, auth_token="reader-token", timeout_s=5) as reader, \
            reader.watch_sources(source) as watch:
        assert _ids(snapshot(watch)) == [("w0", READY)]
    with MetadataClient(server.address, timeout_s=5) as anonymous, pytest.raises(ServerError) as info:
        anonymous.watch_sources(source)
    assert info.value.code == "UNAUTHENTICATED"


def test_a_watch_that_falls_behind_gets_the_latest_state_of_each_worker(client, server, source):
    """Many changes of one worker while the client reads nothing: it is sent what was latest when
    its turn came, not every step, and the server holds no backlog for it."""
    with client.watch_sources(source, progress=True) as watch:
        snapshot(watch)
        for step in range(1, 201):
            client.update_status(source, "w1", 1, INIT, verified_bytes=step)
        events = collect(watch, lambda evs: evs and evs[-1].ref.topology[TOPOLOGY_VERIFIED_BYTES] == "200")
        steps = [int(e.ref.topology[TOPOLOGY_VERIFIED_BYTES]) for e in events]
        assert steps == sorted(steps) and len(steps) <= 200


# --- two replicas over one real redis-server -----------------------------------------------------------

@pytest.fixture
def replicas(make_server, redis_server, redis_prefix):
    pytest.importorskip("redis")
    options = dict(store="redis", redis_url=redis_server.url, redis_prefix=redis_prefix,
                   heartbeat_timeout_s=0.5, gc_timeout_s=1.0, reaper_interval_s=0.1)
    return make_server(**options), make_server(**options)


def test_a_change_made_through_one_replica_reaches_watches_on_the_other(replicas, make_identity, make_worker):
    one, two = replicas
    with MetadataClient(one.address, timeout_s=5) as a, MetadataClient(two.address, timeout_s=5) as b:
        source = a.publish(make_identity(), make_worker(0, status=INIT), "w0")
        with b.watch_sources(source, progress=True) as watch:
            assert _ids(snapshot(watch)) == [("w0", INIT)]
            a.update_status(source, "w0", 0, INIT, verified_bytes=512)
            [event] = collect(watch, lambda evs: evs)
            assert event.ref.topology[TOPOLOGY_VERIFIED_BYTES] == "512"
            a.publish(make_identity(), make_worker(1, status=READY), "w1")
            assert _ids(collect(watch, lambda evs: evs)) == [("w1", READY)]
            # Nobody heartbeats now: a reaper (either replica's) marks both STALE, then deletes them.
            events = collect(watch, lambda evs: sum(e.removed for e in evs) == 2, timeout_s=15)
            assert sorted((e.ref.worker_id, e.ref.status) for e in events if e.removed) == [
                ("w0", STALE), ("w1", STALE)]
