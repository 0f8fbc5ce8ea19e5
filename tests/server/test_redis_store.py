"""What the Redis store promises beyond the contract suite, checked on a real redis-server:
heartbeats never touch the tensor blob, listing never scans the keyspace, concurrent reapers
agree, the TTL safety net, outages and start-up errors that name the URL, and a change feed
that tells each store of the writes of the others and of what it may have missed."""

from __future__ import annotations

import threading
import time

import pytest

from sglang_mx.errors import ConfigError, StoreUnavailableError
from sglang_mx.server import ReapStats, make_store
from sglang_mx.records import SourceIdentity, SourceQuery, SourceStatus, TensorDescriptor, WorkerRecord

pytest.importorskip("redis")
from sglang_mx.server.redis_store import RedisStore  # noqa: E402

SRC = "5a5f555570065064"
IDENTITY = SourceIdentity(model_name="org/model", tensor_parallel_size=1)
T0 = 1_700_000_000_000
HB, GC = 90_000, 3_600_000


def _worker(n_tensors: int, *, rank: int = 0, status: SourceStatus = SourceStatus.READY, at: int = T0) -> WorkerRecord:
    tensors = tuple(TensorDescriptor(name=f"model.layers.{i}.weight", addr=0x7F00_0000_0000 + i * 4096, size=4096,
                                     dtype="bfloat16") for i in range(n_tensors))
    return WorkerRecord(worker_rank=rank, transfer_engine_session_id="127.0.0.1:15000", tensors=tensors,
                        status=status, updated_at_ms=at)


@pytest.fixture
def store(redis_server, redis_prefix):
    with_store = RedisStore(redis_server.url, prefix=redis_prefix, record_ttl_s=3600)
    yield with_store
    with_store.close()


@pytest.fixture
def rclient(redis_server):
    with redis_server.client() as c:
        yield c


def _monitored(rclient, action) -> list[str]:
    """Every command Redis executes while `action()` runs (Lua's inner calls included), via MONITOR."""
    marker = f"end-of-capture-{time.monotonic_ns()}"
    seen: list[str] = []
    ready = threading.Event()

    def watch():
        with rclient.monitor() as m:
            ready.set()
            while True:
                command = m.next_command()["command"]
                if marker in command:
                    return
                seen.append(command)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(5)
    time.sleep(0.1)  # MONITOR is registered once its reply is read
    action()
    rclient.echo(marker)
    watcher.join(10)
    assert not watcher.is_alive(), "MONITOR capture did not end"
    # a new pooled connection's handshake, and loading a Lua script the first time it runs
    return [c for c in seen if c.split(" ", 1)[0].lower() not in _HOUSEKEEPING]


_HOUSEKEEPING = {"hello", "client", "select", "ping", "script"}


def _record_key(store: RedisStore, worker_id: str) -> str:
    return store._record_key(SRC, worker_id)


# --- heartbeats -----------------------------------------------------------------------------------

def test_heartbeat_never_rewrites_the_tensor_blob(store, rclient):
    store.publish(SRC, "big", IDENTITY, _worker(5000))
    store.publish(SRC, "small", IDENTITY, _worker(1))
    key = _record_key(store, "big")
    blob = rclient.hget(key, "worker")
    assert len(blob) > 200_000

    def beats(worker_id):
        return lambda: [store.update_status(SRC, worker_id, 0, SourceStatus.READY, T0 + i, source_load=0.5)
                        for i in range(1, 11)]

    beats("small")()  # warm up: the first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA)
    beats("big")()  # and sets the load: a change, which the script publishes (for watches); plain beats do not
    big = _monitored(rclient, beats("big"))
    small = _monitored(rclient, beats("small"))

    assert rclient.hget(key, "worker") == blob
    assert store.get(SRC, "big").worker.updated_at_ms == T0 + 10
    names = [c.split(" ", 1)[0].lower() for c in big]
    assert names.count("evalsha") == 10 and names.count("hset") == 20, names  # status+time, then load
    assert set(names) <= {"evalsha", "hmget", "hset", "pexpire", "zadd"}, names
    assert not [c for c in big if " worker" in c or " identity" in c], "a heartbeat named the blob fields"
    assert sum(map(len, big)) < 5_000, "heartbeat traffic grew with the tensor count"
    # the same commands, of the same size apart from the key, whatever the tensor count
    assert names == [c.split(" ", 1)[0].lower() for c in small]
    assert sum(map(len, big)) - sum(map(len, small)) <= len(big) * 2


# --- listing --------------------------------------------------------------------------------------

def test_listing_and_reaping_never_scan_the_keyspace_nor_read_blobs(store, rclient):
    for i in range(20):
        store.publish(f"{i:016x}", f"w{i}", IDENTITY, _worker(500, at=T0 - i * 60_000))
    rclient.config_resetstat()

    def work():
        store.list(SourceQuery())
        store.list(SourceQuery(mx_source_id=f"{3:016x}", status=SourceStatus.READY))
        store.list(SourceQuery(min_updated_at_ms=T0 - 5 * 60_000, limit=3))
        store.reap(T0, HB, GC)

    commands = _monitored(rclient, work)
    # small fields of 20 + 1 + 6 listed records, and of the 18 older than the heartbeat timeout (reap)
    assert len([c for c in commands if c.lower().startswith("hmget")]) == 20 + 1 + 6 + 18, commands
    stats = rclient.info("commandstats")
    assert not {"cmdstat_scan", "cmdstat_keys", "cmdstat_hgetall"} & set(stats), sorted(stats)
    assert not [c for c in commands if c.lower().startswith(("scan", "keys"))]
    assert not [c for c in commands if " worker" in c or " identity" in c], "listing read a tensor blob"
    assert len(store.list(SourceQuery())) == 20


def test_ids_with_colons_do_not_collide(store):
    store.publish("a:b", "c", IDENTITY, _worker(1, rank=1))
    store.publish("a", "b:c", IDENTITY, _worker(1, rank=2))
    assert store.get("a:b", "c").worker.worker_rank == 1
    assert store.get("a", "b:c").worker.worker_rank == 2
    assert [r.worker_id for r in store.list(SourceQuery(mx_source_id="a"))] == ["b:c"]


# --- reaping --------------------------------------------------------------------------------------

def test_concurrent_reapers_count_each_change_once(redis_server, redis_prefix):
    stores = [RedisStore(redis_server.url, prefix=redis_prefix) for _ in range(4)]
    try:
        for i in range(100):
            stores[0].publish(SRC, f"silent{i}", IDENTITY, _worker(3, at=T0 - HB - 1 - i))  # -> STALE
            stores[0].publish(SRC, f"stale{i}", IDENTITY, _worker(3, status=SourceStatus.STALE, at=T0 - GC - 1))
            stores[0].publish(SRC, f"fresh{i}", IDENTITY, _worker(3, at=T0 - i))
        for i in range(50):  # silent for longer than GC: marked and deleted in the same pass
            stores[0].publish(f"{i:016x}", "ancient", IDENTITY, _worker(3, at=T0 - GC - 1))
        results: list[ReapStats] = []
        start = threading.Barrier(len(stores))

        def reap(store):
            start.wait()
            for _ in range(3):
                results.append(store.reap(T0, HB, GC))

        threads = [threading.Thread(target=reap, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(r.marked_stale for r in results) == 150
        assert sum(r.deleted for r in results) == 150
        left = stores[1].list(SourceQuery())
        assert sorted(r.worker_id for r in left) == sorted([f"silent{i}" for i in range(100)]
                                                          + [f"fresh{i}" for i in range(100)])
        assert {r.status for r in left if r.worker_id.startswith("silent")} == {SourceStatus.STALE}
        assert stores[2].reap(T0, HB, GC) == ReapStats(0, 0)
        with redis_server.client() as c:
            assert c.smembers(f"{redis_prefix}sources") == {SRC.encode()}
    finally:
        for s in stores:
            s.close()


def test_ttl_safety_net_expires_silent_records_and_reap_cleans_the_index(redis_server, redis_prefix, rclient):
    store = RedisStore(redis_server.url, prefix=redis_prefix, record_ttl_s=0.5)
    try:
        store.publish(SRC, "silent", IDENTITY, _worker(3))
        store.publish(SRC, "beating", IDENTITY, _worker(3))
        for i in range(10):  # every heartbeat renews the TTL
            time.sleep(0.1)
            store.update_status(SRC, "beating", 0, SourceStatus.READY, T0 + i)
        assert store.get(SRC, "silent") is None
        assert [r.worker_id for r in store.list(SourceQuery())] == ["beating"]
        assert rclient.zcard(f"{redis_prefix}src:{SRC}") == 2  # the expired record's index entry ...
        # ... goes at the next reap that looks at it: one past the heartbeat timeout (a real TTL is
        # longer than heartbeat timeout + GC timeout, so every expired record is that old)
        later = T0 + HB + 100
        assert store.reap(later, HB, GC) == ReapStats(marked_stale=1, deleted=0)  # only "beating" was there
        assert rclient.zcard(f"{redis_prefix}src:{SRC}") == 1
        time.sleep(0.7)
        assert store.reap(later, HB, GC) == ReapStats(0, 0)
        assert rclient.exists(f"{redis_prefix}src:{SRC}", f"{redis_prefix}sources") == 0
    finally:
        store.close()


def test_an_expired_record_leaves_the_model_index_and_its_owners_quota_at_the_next_reap(redis_server, redis_prefix,
                                                                                      rclient):
    from sglang_mx import wire
    from sglang_mx.server.store import Capacity, QuotaError

    capacity = Capacity(max_records_per_principal=1)
    store = RedisStore(redis_server.url, prefix=redis_prefix, record_ttl_s=0.3)
    try:
        store.put(wire.encode_record(SRC, "silent", IDENTITY, _worker(3), owner="alice"), capacity)
        time.sleep(0.5)
        assert store.list(SourceQuery(model_name="org/model")) == []
        with pytest.raises(QuotaError, match="writer 'alice' holds 1 records"):  # until the reap: counted
            store.put(wire.encode_record(SRC, "next", IDENTITY, _worker(3), owner="alice"), capacity)
        assert store.reap(T0 + HB + 100, HB, GC) == ReapStats(0, 0)
        assert not [k for k in rclient.keys(f"{redis_prefix}*") if k != f"{redis_prefix}layout".encode()]
        store.put(wire.encode_record(SRC, "next", IDENTITY, _worker(3), owner="alice"), capacity)
    finally:
        store.close()


def test_records_of_the_previous_layout_are_adopted_at_start(store, redis_server, redis_prefix, rclient):
    """Records written before the model index and the quotas: a server that starts puts them in both."""
    from sglang_mx import wire
    from sglang_mx.server.store import Capacity, QuotaError

    store.put(wire.encode_record(SRC, "w0", IDENTITY, _worker(3), owner="alice"))
    store.put(wire.encode_record("0123456789abcdef", "w1", IDENTITY, _worker(3), owner="bob"))
    keys = [k for k in rclient.keys(f"{redis_prefix}*") if k.split(b":")[1] in (b"meta", b"model", b"usage", b"layout")]
    rclient.delete(*keys)  # what the previous version wrote: records, their indexes, nothing else
    assert store.list(SourceQuery(model_name="org/model")) == []
    restarted = RedisStore(redis_server.url, prefix=redis_prefix)
    try:
        assert sorted(r.worker_id for r in restarted.list(SourceQuery(model_name="org/model"))) == ["w0", "w1"]
        with pytest.raises(QuotaError, match="writer 'alice' holds 1 records"):
            restarted.put(wire.encode_record(SRC, "w2", IDENTITY, _worker(3), owner="alice"),
                          Capacity(max_records_per_principal=1))
        assert restarted.reap(T0 + GC + HB + 1, HB, GC) == ReapStats(marked_stale=2, deleted=2)
        assert rclient.keys(f"{redis_prefix}*") == [f"{redis_prefix}layout".encode()]
    finally:
        restarted.close()


# --- outages and configuration ----------------------------------------------------------------------

def test_outage_raises_store_unavailable_then_recovers(make_redis_server):
    redis_server = make_redis_server()
    store = RedisStore(redis_server.url)
    try:
        store.publish(SRC, "w", IDENTITY, _worker(3))
        redis_server.kill()
        for call in (lambda: store.get(SRC, "w"), lambda: store.list(SourceQuery()),
                     lambda: store.update_status(SRC, "w", 0, SourceStatus.READY, T0),
                     lambda: store.publish(SRC, "w", IDENTITY, _worker(3)), lambda: store.reap(T0, HB, GC)):
            with pytest.raises(StoreUnavailableError, match=f"store at {redis_server.url} is unavailable: Redis"):
                call()
        redis_server.start()  # no persistence: empty, but usable again without a new store
        assert store.get(SRC, "w") is None
        store.publish(SRC, "w", IDENTITY, _worker(3))
        assert store.update_status(SRC, "w", 0, SourceStatus.READY, T0 + 1) == 1
    finally:
        store.close()


def test_unreachable_at_startup_names_the_url_without_its_password(unused_port):
    with pytest.raises(StoreUnavailableError) as e:
        RedisStore(f"redis://:hunter2@127.0.0.1:{unused_port}/0")
    assert f"store at redis://:***@127.0.0.1:{unused_port}/0 is unavailable: cannot reach Redis" in str(e.value)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("kwargs, named", [
    (dict(kind="mongo"), "store='mongo' is not a store; allowed: memory, redis"),
    (dict(kind="redis", redis_url="http://127.0.0.1:1"), "redis_url='http://127.0.0.1:1' is not a Redis URL"),
    (dict(kind="redis", redis_prefix=""), "redis_prefix is empty"),
    (dict(kind="redis", record_ttl_s=0), "record_ttl_s=0 must be > 0"),
])
def test_bad_configuration_is_refused(kwargs, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        make_store(**kwargs)


def test_records_written_by_the_previous_version_are_served_and_claimable(store, rclient):
    """Earlier servers kept status inside the worker bytes and no owner: the small fields win, and
    the first writer to publish or heartbeat it takes it over."""
    from sglang_mx import wire
    from sglang_mx.records import SourceQuery

    worker = _worker(20, status=SourceStatus.INITIALIZING)
    rclient.hset(_record_key(store, "old"), mapping={
        "identity": wire.identity_to_pb(IDENTITY).SerializeToString(),
        "worker": wire.worker_to_pb(worker).SerializeToString(),  # status INITIALIZING inside
        "status": int(SourceStatus.READY), "updated_at": T0 + 5, "rank": 0, "model": IDENTITY.model_name,
        "accelerator": "", "topology": "{}"})
    rclient.zadd(store._index_key(SRC), {"old": T0 + 5})
    rclient.sadd(store._sources_key(), SRC)
    got = store.get(SRC, "old")
    assert (got.worker.status, got.worker.updated_at_ms, got.worker.tensors) == (SourceStatus.READY, T0 + 5,
                                                                               worker.tensors)
    assert [r.worker_id for r in store.list(SourceQuery(worker_rank=0, status=SourceStatus.READY))] == ["old"]
    assert store.update_status(SRC, "old", 0, SourceStatus.READY, T0 + 6, owner="seeds") == 1


def test_get_reads_the_blobs_only_for_a_version_it_does_not_hold(store, redis_server, redis_prefix, rclient):
    """A second read of an unchanged record fetches only small fields; a publish through another
    replica (a new version) is seen at once; a cache of 0 bytes always reads the blobs."""
    store.publish(SRC, "w", IDENTITY, _worker(2000))
    replica = RedisStore(redis_server.url, prefix=redis_prefix)
    try:
        assert replica.get(SRC, "w").worker.tensors == _worker(2000).tensors  # first read: the blobs
        commands = _monitored(rclient, lambda: replica.get_bytes(SRC, "w"))
        assert [c.split(" ", 1)[0].lower() for c in commands] == ["hmget"]
        assert " worker" not in commands[0] and " identity" not in commands[0], commands
        store.publish(SRC, "w", IDENTITY, _worker(3, status=SourceStatus.INITIALIZING))
        got = replica.get(SRC, "w")
        assert got.worker.tensors == _worker(3).tensors and got.worker.status == SourceStatus.INITIALIZING
    finally:
        replica.close()
    uncached = RedisStore(redis_server.url, prefix=redis_prefix, cache_bytes=0)
    try:
        uncached.get_bytes(SRC, "w")
        commands = _monitored(rclient, lambda: uncached.get_bytes(SRC, "w"))
        assert len(commands) == 2 and " worker" in commands[1]
    finally:
        uncached.close()


# --- the change feed (watches) -----------------------------------------------------------------------

def test_a_store_is_told_of_the_writes_and_reaps_of_another_on_the_same_prefix(store, redis_server, redis_prefix):
    from tests.server.test_store_contract import RecordingListener

    other = RedisStore(redis_server.url, prefix=redis_prefix, record_ttl_s=3600)
    elsewhere = RedisStore(redis_server.url, prefix=redis_prefix + "other:", record_ttl_s=3600)
    listener = RecordingListener()
    try:
        store.subscribe(listener)
        other.publish(SRC, "probe", IDENTITY, _worker(1))
        listener.wait_for((SRC, "probe"))
        elsewhere.publish(SRC, "not-ours", IDENTITY, _worker(1))  # another deployment's prefix: not told
        other.publish(SRC, "w1", IDENTITY, _worker(1, status=SourceStatus.INITIALIZING, at=T0 - HB - 1))
        other.update_status(SRC, "w1", 0, SourceStatus.INITIALIZING, T0 - HB - 1, verified_bytes=10)
        other.reap(T0, HB, GC)
        other.publish(SRC, "marker", IDENTITY, _worker(1))
        assert listener.wait_for((SRC, "marker")) == [(SRC, "w1")] * 3 + [(SRC, "marker")]
    finally:
        for s in (other, elsewhere):
            s.close()


def test_the_feed_tells_missed_when_it_subscribes_again(store, rclient):
    from tests.server.test_store_contract import RecordingListener

    listener = RecordingListener()
    store.subscribe(listener)
    store.publish(SRC, "probe", IDENTITY, _worker(1))
    listener.wait_for((SRC, "probe"))
    first = listener.missed_count  # 1: told when it first subscribed
    rclient.client_kill_filter(_type="pubsub")  # the feed's connection drops, as in a Redis restart
    deadline = time.monotonic() + 10
    while listener.missed_count == first:
        assert time.monotonic() < deadline, "missed() was not called after the feed reconnected"
        time.sleep(0.02)
    store.publish(SRC, "after", IDENTITY, _worker(1))
    assert listener.wait_for((SRC, "after"))[-1] == (SRC, "after")
    store.close()
    assert not [t for t in threading.enumerate() if t.name == "mx-redis-changes" and t.is_alive()]
