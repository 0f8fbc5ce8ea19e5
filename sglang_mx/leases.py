"""Reader leases: how a seed knows, and caps, how many targets are reading it.

A Mooncake seed serves reads passively: bytes leave its memory without any code
of ours running, so it cannot count its readers by itself. Targets therefore
ask first. Each seed rank serves a tiny gRPC endpoint (ModelExpress's
WorkerService shape: PrepareTensorRead / ReleaseTensorRead), advertised in its
record as `worker_grpc_endpoint`:

- PrepareTensorRead grants a lease id, or answers RESOURCE_EXHAUSTED when the
  seed already has `max_readers` leases (the target reads elsewhere or waits);
- ReleaseTensorRead ends it; a lease not released within `ttl_s` expires (its
  target died), so no slot is held forever. A live target renews its lease every
  third of the TTL the seed announced (PrepareTensorRead naming the lease, an
  sglang-mx extension field), so a pull longer than the TTL keeps its slot;
- the seed's heartbeat reports the count as `source_load`, and sends one early
  when the count changes, so listings show who is busy.

The lease is advisory for the bytes (Mooncake does not check it) and carries no
secret: it only spreads load. A seed without the endpoint (a ModelExpress seed)
is read without a lease.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from concurrent import futures
from typing import Callable

import grpc

from sglang_mx import wire
from sglang_mx.errors import MxError

log = logging.getLogger(__name__)


class SeedBusyError(MxError):
    """A seed refused a lease: it serves `max_readers` targets already."""

    def __init__(self, seed: str, detail: str) -> None:
        super().__init__(f"seed {seed} is busy: {detail}")
        self.seed = seed


class ReaderLeases:
    """Counts a seed's active readers, at most `max_readers` (0: no cap); leases expire after `ttl_s`.

    `on_change(active)` runs (outside the lock) whenever the count changes.
    """

    def __init__(self, *, max_readers: int = 0, ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int], None] | None = None) -> None:
        if max_readers < 0:
            raise MxError(f"max_readers={max_readers} must be >= 0 (0: no cap)")
        if ttl_s <= 0:
            raise MxError(f"lease ttl_s={ttl_s} must be > 0")
        self.max_readers = max_readers
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self.peak = 0  # most leases held at once
        self.granted = 0
        self.refused = 0
        self.expired = 0

    def acquire(self) -> str | None:
        """A new lease id, or None when the seed is at its cap."""
        with self._lock:
            changed = self._expire_locked()
            if self.max_readers and len(self._expiry) >= self.max_readers:
                self.refused += 1
                lease = None
            else:
                lease = f"{self._prefix}-{next(self._ids)}"
                self._expiry[lease] = self._clock() + self.ttl_s
                self.granted += 1
                self.peak = max(self.peak, len(self._expiry))
                changed = True
            active = len(self._expiry)
        if changed:
            self._notify(active)
        return lease

    def renew(self, lease_id: str) -> bool:
        """Move a live lease's expiry to now + ttl_s; False when it is unknown or has expired."""
        with self._lock:
            changed = self._expire_locked()
            known = lease_id in self._expiry
            if known:
                self._expiry[lease_id] = self._clock() + self.ttl_s
            active = len(self._expiry)
        if changed:
            self._notify(active)
        return known

    def release(self, lease_id: str) -> bool:
        """End a lease; False when it was unknown or had already expired."""
        with self._lock:
            known = self._expiry.pop(lease_id, None) is not None
            self._expire_locked()
            active = len(self._expiry)
        if known:
            self._notify(active)
        return known

    def active(self) -> int:
        """Leases held now (expired ones dropped first)."""
        with self._lock:
            changed = self._expire_locked()
            active = len(self._expiry)
        if changed:
            self._notify(active)
        return active

    def _expire_locked(self) -> bool:
        now = self._clock()
        stale = [lease for lease, expiry in self._expiry.items() if expiry <= now]
        for lease in stale:
            del self._expiry[lease]
            log.warning("reader lease %s expired after %g s without a release", lease, self.ttl_s)
        self.expired += len(stale)
        return bool(stale)

    def _notify(self, active: int) -> None:
        if self._on_change is not None:
            self._on_change(active)


class _Servicer(wire.WorkerServiceServicer):
    def __init__(self, leases: ReaderLeases, worker_id: str) -> None:
        self._leases = leases
        self._worker_id = worker_id

    def PrepareTensorRead(self, request, context):
        if request.worker_id and request.worker_id != self._worker_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this endpoint serves worker {self._worker_id}, "
                                                     f"not {request.worker_id}")
        renew = request.mx_renew_lease_id
        lease = renew if renew and self._leases.renew(renew) else self._leases.acquire()
        if lease is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self._leases.max_readers} reader(s) already (max_readers)")
        return wire.prepare_read_response(lease, self._leases.ttl_s)

    def ReleaseTensorRead(self, request, context):
        self._leases.release(request.lease_id)
        return wire.release_read_response()


class LeaseServer:
    """Serves one seed rank's leases on `host` (a free port); `endpoint` is "host:port"."""

    def __init__(self, leases: ReaderLeases, *, worker_id: str, host: str = "127.0.0.1") -> None:
        self.leases = leases
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="mx-lease"))
        wire.add_worker_servicer_to_server(_Servicer(leases, worker_id), self._server)
        port = self._server.add_insecure_port(f"{host}:0")
        if port == 0:
            raise MxError(f"could not listen for reader leases on {host}")
        self.endpoint = f"{host}:{port}"

    def start(self) -> "LeaseServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=0.5).wait(2)


@dataclasses.dataclass
class ReadLease:
    """A granted lease, renewed in the background every third of its TTL while held;
    `release()` ends it (once; errors are logged, the lease then expires)."""

    endpoint: str
    mx_source_id: str
    worker_id: str
    lease_id: str
    _channel: grpc.Channel | None = dataclasses.field(default=None, repr=False)
    ttl_s: float = 0.0  # as the seed announced it; 0: unknown (not renewed)
    renewals: int = 0
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _keeper: threading.Thread | None = dataclasses.field(default=None, repr=False)

    def keep_alive(self) -> "ReadLease":
        """Start renewing (a no-op when the seed announced no TTL)."""
        if self.ttl_s > 0 and self._channel is not None and self._keeper is None:
            self._keeper = threading.Thread(target=self._renew_loop, name=f"mx-lease-{self.lease_id}", daemon=True)
            self._keeper.start()
        return self

    def _renew_loop(self) -> None:
        period = max(self.ttl_s / 3, 0.05)
        stub = wire.WorkerServiceStub(self._channel)
        while not self._stop.wait(period):
            try:
                response = stub.PrepareTensorRead(
                    wire.prepare_read_request(self.mx_source_id, self.worker_id, renew=self.lease_id),
                    timeout=period)
            except grpc.RpcError as e:  # busy after an expiry, or the seed is gone: the pull finds out
                log.info("renewing lease %s at %s failed (%s); no longer renewed", self.lease_id, self.endpoint,
                         e.code().name)
                return
            if response.lease_id != self.lease_id:
                log.info("lease %s at %s had expired; holding %s instead", self.lease_id, self.endpoint,
                         response.lease_id)
                self.lease_id = response.lease_id
            self.renewals += 1

    def release(self, timeout_s: float = 2.0) -> None:
        if self._channel is None:
            return
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
        channel, self._channel = self._channel, None
        try:
            wire.WorkerServiceStub(channel).ReleaseTensorRead(
                wire.release_read_request(self.mx_source_id, self.worker_id, self.lease_id), timeout=timeout_s)
        except grpc.RpcError as e:
            log.info("releasing lease %s at %s failed (%s): it expires on its own", self.lease_id, self.endpoint,
                     e.code().name)
        finally:
            channel.close()


def acquire(endpoint: str, mx_source_id: str, worker_id: str, *, timeout_s: float = 2.0) -> ReadLease | None:
    """Ask the seed at `endpoint` for a read lease.

    Returns the lease, or None when the seed grants none for another reason than
    being busy (no endpoint, unreachable, not implemented): the read then goes
    ahead unleased. Raises SeedBusyError when the seed is at its cap.
    """
    if not endpoint:
        return None
    channel = grpc.insecure_channel(endpoint)
    try:
        response = wire.WorkerServiceStub(channel).PrepareTensorRead(
            wire.prepare_read_request(mx_source_id, worker_id), timeout=timeout_s)
    except grpc.RpcError as e:
        channel.close()
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise SeedBusyError(f"{worker_id}@{endpoint}", e.details() or "at max_readers") from None
        log.info("no reader lease from %s (%s: %s); reading without one", endpoint, e.code().name, e.details())
        return None
    return ReadLease(endpoint, mx_source_id, worker_id, response.lease_id, channel,
                     ttl_s=response.mx_lease_ttl_ms / 1000).keep_alive()
