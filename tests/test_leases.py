"""Reader leases: cap, release, expiry, holder-only renew and release, the hard bound, and the seed's gRPC
endpoint."""

import importlib.util
import logging
import pathlib
import string
import subprocess
import sys

import grpc
import pytest

from sglang_mx import leases, wire
from sglang_mx.errors import MxError
from sglang_mx.leases import LeaseServer, ReaderLeases, SeedBusyError


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_cap_refuses_until_a_lease_is_released():
    changes = []
    book = ReaderLeases(max_readers=2, ttl_s=10, clock=Clock(), on_change=changes.append)
    a, b = book.acquire(), book.acquire()
    assert a and b and a != b
    assert book.acquire() is None and book.refused == 1
    assert book.release(a) and not book.release(a)
    assert book.acquire() is not None
    assert book.peak == 2 and changes == [1, 2, 1, 2]


def test_a_lease_never_released_expires():
    clock = Clock()
    book = ReaderLeases(max_readers=1, ttl_s=5, clock=clock)
    lease = book.acquire()
    clock.now = 4.9
    assert book.acquire() is None
    clock.now = 5.0
    assert book.active() == 0 and book.expired == 1
    assert book.acquire() is not None
    assert not book.release(lease)


def test_renewing_moves_the_expiry_and_an_expired_lease_cannot_be_renewed():
    clock = Clock()
    book = ReaderLeases(max_readers=1, ttl_s=5, clock=clock)
    lease = book.acquire()
    clock.now = 4.0
    assert book.renew(lease)
    clock.now = 8.9
    assert book.active() == 1 and book.acquire() is None  # still held: renewed at 4.0
    clock.now = 9.0
    assert not book.renew(lease) and book.active() == 0 and book.expired == 1
    assert not book.renew("never-granted")


def test_no_cap_counts_every_reader():
    book = ReaderLeases(max_readers=0)
    for _ in range(50):
        assert book.acquire()
    assert book.active() == 50


def _guesses_from(lease: str) -> list[str]:
    """What a target holding `lease` might try for another target's: neighbouring counters, near misses."""
    head, _, tail = lease.rpartition("-")
    counters = [f"{head}-{int(tail) + step}" for step in (-2, -1, 1, 2)] if tail.isdigit() else []
    return counters + [lease[:-1], lease + "0", lease[:-1] + ("A" if lease[-1] != "A" else "B"), "", "*"]


def test_lease_ids_are_random_and_unguessable():
    book = ReaderLeases(max_readers=0)
    ids = [book.acquire() for _ in range(200)] + [ReaderLeases().acquire() for _ in range(20)]
    alphabet = set(string.ascii_letters + string.digits + "-_")
    assert all(len(lease) >= 22 and set(lease) <= alphabet for lease in ids)  # 128 bits, url-safe base64
    assert len({lease[:8] for lease in ids}) == len(ids)  # no shared prefix, no counter


def test_only_the_holder_can_release_or_renew_its_lease():
    clock = Clock()
    book = ReaderLeases(max_readers=2, ttl_s=5, clock=clock)
    mine, theirs = book.acquire(), book.acquire()
    for guess in _guesses_from(mine):
        assert not book.release(guess) and not book.renew(guess)
    assert book.active() == 2
    clock.now = 4.0
    assert book.renew(mine)
    for guess in _guesses_from(mine):
        assert not book.renew(guess)
    clock.now = 5.0  # theirs was never renewed by its holder: it expires; mine does not
    assert book.active() == 1 and book.expired == 1
    assert not book.renew(theirs) and book.release(mine)


def test_at_the_endpoint_a_guessed_id_neither_releases_nor_renews_anothers_lease():
    book = ReaderLeases(max_readers=2)
    server = LeaseServer(book, worker_id="w").start()
    try:
        victim = leases.acquire(server.endpoint, "id", "w")
        with grpc.insecure_channel(server.endpoint) as channel:
            stub = wire.WorkerServiceStub(channel)
            mine = stub.PrepareTensorRead(wire.prepare_read_request("id", "w"), timeout=2).lease_id
            for guess in _guesses_from(mine):
                stub.ReleaseTensorRead(wire.release_read_request("id", "w", guess), timeout=2)
                assert book.active() == 2
                with pytest.raises(grpc.RpcError) as refused:  # not a renewal: a new lease, and the seed is full
                    stub.PrepareTensorRead(wire.prepare_read_request("id", "w", renew=guess), timeout=2)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub.ReleaseTensorRead(wire.release_read_request("id", "w", mine), timeout=2)
        assert book.active() == 1
        victim.release()
        assert book.active() == 0
    finally:
        server.stop()


# Runs in a process of its own: the wheel's p2p_pb2 and ours both register "p2p.proto" (tests/compat/mx_wheel.py).
_MODELEXPRESS_CLIENT = """
import sys
import grpc
from mx_wheel import wheel_p2p

with wheel_p2p(with_grpc=True) as pb:
    from mx_wheel_proto import p2p_pb2_grpc
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = p2p_pb2_grpc.WorkerServiceStub(channel)
        granted = stub.PrepareTensorRead(pb.PrepareTensorReadRequest(mx_source_id="id", worker_id="w"), timeout=5)
        print(granted.lease_id, flush=True)
        sys.stdin.readline()
        stub.ReleaseTensorRead(pb.ReleaseTensorReadRequest(mx_source_id="id", worker_id="w",
                                                           lease_id=granted.lease_id), timeout=5)
"""


def test_a_modelexpress_client_takes_and_releases_a_lease_with_the_id_it_got():
    if importlib.util.find_spec("modelexpress") is None:
        pytest.skip("modelexpress is not installed (pip install --no-deps modelexpress==0.7.0)")
    book = ReaderLeases(max_readers=1)
    server = LeaseServer(book, worker_id="w").start()
    client = subprocess.Popen([sys.executable, "-c", _MODELEXPRESS_CLIENT, server.endpoint],
                              cwd=pathlib.Path(__file__).parent / "compat", text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lease_id = client.stdout.readline().strip()
        assert lease_id, client.stderr.read()
        assert book.active() == 1
        _, stderr = client.communicate("\n", timeout=30)
        assert client.returncode == 0, stderr
        assert book.active() == 0
    finally:
        client.kill()
        client.wait()
        server.stop()


def test_without_max_readers_a_seed_still_holds_at_most_max_leases_until_they_expire():
    bound = 4096  # MAX_LEASES, as the README says
    clock = Clock()
    book = ReaderLeases(max_readers=0, ttl_s=5, clock=clock)
    for _ in range(bound):
        assert book.acquire() is not None
    assert book.acquire() is None and book.refused == 1 and book.active() == bound
    assert book.cap == leases.MAX_LEASES == bound
    clock.now = 5.0  # expired entries leave the table
    assert book.active() == 0 and book.expired == bound
    assert book.acquire() is not None


def test_a_seed_at_the_hard_bound_answers_busy(monkeypatch):
    monkeypatch.setattr(leases, "MAX_LEASES", 2)
    book = ReaderLeases(max_readers=0)
    server = LeaseServer(book, worker_id="w").start()
    try:
        held = [leases.acquire(server.endpoint, "id", "w") for _ in range(2)]
        with pytest.raises(SeedBusyError, match=r"2 reader\(s\) already \(the bound of 2 leases a seed holds\)"):
            leases.acquire(server.endpoint, "id", "w")
        for lease in held:
            lease.release()
    finally:
        server.stop()


def test_max_readers_above_the_hard_bound_is_refused():
    with pytest.raises(MxError, match=r"^max_readers=4097 is out of range; allowed: 0 \(no cap\) to 4096$"):
        ReaderLeases(max_readers=leases.MAX_LEASES + 1)
    with pytest.raises(MxError, match=r"^max_readers=-1 is out of range"):
        ReaderLeases(max_readers=-1)


def test_lease_ids_are_logged_only_as_tags(caplog):
    clock = Clock()
    book = ReaderLeases(ttl_s=5, clock=clock)
    lease = book.acquire()
    clock.now = 5.0
    with caplog.at_level(logging.WARNING, logger="sglang_mx.leases"):
        assert book.active() == 0
    assert leases.lease_tag(lease) in caplog.text and lease not in caplog.text
    assert lease not in repr(leases.ReadLease("host:1", "id", "w", lease))


def test_endpoint_grants_refuses_and_releases():
    book = ReaderLeases(max_readers=1)
    server = LeaseServer(book, worker_id="w").start()
    try:
        lease = leases.acquire(server.endpoint, "id", "w")
        assert lease is not None and book.active() == 1
        with pytest.raises(SeedBusyError, match="busy"):
            leases.acquire(server.endpoint, "id", "w")
        lease.release()
        lease.release()  # once only
        assert book.active() == 0
        assert leases.acquire(server.endpoint, "id", "another") is None  # wrong worker: no lease, read anyway
    finally:
        server.stop()


def test_no_endpoint_or_a_dead_one_means_reading_without_a_lease(unused_port):
    assert leases.acquire("", "id", "w") is None
    assert leases.acquire(f"127.0.0.1:{unused_port}", "id", "w", timeout_s=0.5) is None


def test_a_seed_reports_its_readers_as_source_load_soon_after_they_change(server, client, engine, wait_for):
    import torch

    from sglang_mx.records import SourceIdentity, SourceStatus
    from sglang_mx.seed import SeedPublisher
    from sglang_mx.transfer.tensors import describe

    identity = SourceIdentity(model_name="test/leases")
    weights = torch.zeros(16)
    publisher = SeedPublisher(client, engine, identity, worker_rank=0, tensors=describe({"w": weights}),
                              max_readers=2).start()
    try:
        publisher.mark_ready()
        stored = client.get_metadata(publisher.mx_source_id, publisher.worker_id)
        endpoint = stored.worker.worker_grpc_endpoint
        assert endpoint.startswith("127.0.0.1:")

        def load():
            [ref] = client.list_sources(identity, status=SourceStatus.READY)
            return ref.source_load

        assert load() == 0.0
        held = [leases.acquire(endpoint, publisher.mx_source_id, publisher.worker_id) for _ in range(2)]
        wait_for(lambda: load() == 2.0, timeout_s=5, what="source_load 2")  # heartbeat interval is 30 s
        for lease in held:
            lease.release()
        wait_for(lambda: load() == 0.0, timeout_s=5, what="source_load 0")
    finally:
        publisher.close()


def test_a_held_lease_is_renewed_past_its_ttl_and_a_released_one_is_not(wait_for):
    book = ReaderLeases(max_readers=1, ttl_s=0.3)
    server = LeaseServer(book, worker_id="w").start()
    try:
        lease = leases.acquire(server.endpoint, "id", "w")
        assert lease is not None and lease.ttl_s == 0.3
        wait_for(lambda: lease.renewals >= 4, timeout_s=5)  # well past 0.3 s
        assert book.active() == 1 and book.expired == 0
        with pytest.raises(SeedBusyError):  # the slot is still ours
            leases.acquire(server.endpoint, "id", "w")
        lease.release()
        renewals = lease.renewals
        assert book.active() == 0
        other = leases.acquire(server.endpoint, "id", "w")
        assert other is not None and lease.renewals == renewals
        other.release()
    finally:
        server.stop()
