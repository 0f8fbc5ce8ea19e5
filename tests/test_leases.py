"""Reader leases: cap, release, expiry, and the seed's gRPC endpoint."""

import pytest

from sglang_mx import leases
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
