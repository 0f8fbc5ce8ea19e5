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

Only the holder can renew or release a lease. The lease id is itself the
holder's secret: 128 random bits from `secrets` (a CSPRNG), sent only in the
response to the target that asked. Renewal and release must name the exact id,
so another target can neither end someone's lease nor keep it alive; guessing
an id is hopeless (2**-128 per try). This needs no new wire field, so a
ModelExpress client (which never renews) takes and releases its lease with the
id it got, exactly as before. A separate secret field would not work for it: it
would not send the secret back, so the seed would have to accept its release
without one. The seed keeps only each id's SHA-256 (its table holds no secret,
and a lookup compares digests, not the id) and logs only `lease_tag(id)`, the
first 8 hex digits of that digest, which both sides can compute to match logs.
The id travels in plaintext, like the endpoint itself: someone who can watch
the fleet's network can see it (and can read the seed's Mooncake memory too).

However `max_readers` is set (0: no configured cap), a seed holds at most
MAX_LEASES live leases: beyond that it answers RESOURCE_EXHAUSTED as at its
cap. Every call drops the expired leases first, so the table is bounded by
MAX_LEASES entries, each gone `ttl_s` after its last renewal.

The lease is advisory for the bytes (Mooncake does not check it): it only
spreads load. A seed without the endpoint (a ModelExpress seed) is read without
a lease.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import secrets
import threading
import time
from concurrent import futures
from typing import Callable

import grpc

from sglang_mx import wire
from sglang_mx.config import MAX_LEASES
from sglang_mx.errors import MxError
from sglang_mx.metrics import metrics

log = logging.getLogger(__name__)

LEASE_ID_BYTES = 16
"""Random bytes in a lease id (128 bits; url-safe base64, 22 characters)."""


def lease_tag(lease_id: str) -> str:
    """A name for a lease that is safe to log: 8 hex digits of its SHA-256 (the id is the holder's secret)."""
    return _digest(lease_id)[:8]


def _digest(lease_id: str) -> str:
    return hashlib.sha256(lease_id.encode()).hexdigest()


class SeedBusyError(MxError):
    """A seed refused a lease: it serves `max_readers` targets already."""

    def __init__(self, seed: str, detail: str) -> None:
        super().__init__(f"seed {seed} is busy: {detail}")
        self.seed = seed


class ReaderLeases:
    """Counts a seed's active readers, at most `cap` of them; leases expire after `ttl_s`.

    `cap` is `max_readers`, or MAX_LEASES when `max_readers` is 0 (no configured cap).
    `on_change(active)` runs (outside the lock) whenever the count changes. `published_bytes`: what
    the rank publishes, counted once per lease granted as the upper bound of bytes served (metrics).
    """

    def __init__(self, *, max_readers: int = 0, ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int], None] | None = None, published_bytes: int = 0) -> None:
        if not 0 <= max_readers <= MAX_LEASES:
            raise MxError(f"max_readers={max_readers} is out of range; allowed: 0 (no cap) to {MAX_LEASES}")
        if ttl_s <= 0:
            raise MxError(f"lease ttl_s={ttl_s} must be > 0")
        self.max_readers = max_readers
        self.cap = max_readers or MAX_LEASES
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_change = on_change
        self.published_bytes = published_bytes
        self._reported = 0  # the count last added to the leases-held gauge
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}  # by _digest(lease id), so it holds no secret; in expiry order
        self.peak = 0  # most leases held at once
        self.granted = 0
        self.refused = 0
        self.expired = 0

    def acquire(self) -> str | None:
        """A new lease id (the holder's secret), or None when the seed is at its cap."""
        with self._lock:
            changed = self._expire_locked()
            if len(self._expiry) >= self.cap:
                self.refused += 1
                lease = None
            else:
                lease = secrets.token_urlsafe(LEASE_ID_BYTES)
                self._expiry[_digest(lease)] = self._clock() + self.ttl_s
                self.granted += 1
                self.peak = max(self.peak, len(self._expiry))
                changed = True
            active = len(self._expiry)
        if lease is not None:
            metrics().lease_granted(self.published_bytes)
        if changed:
            self._notify(active)
        return lease

    def renew(self, lease_id: str) -> bool:
        """Move a live lease's expiry to now + ttl_s; False when it is unknown or has expired."""
        key = _digest(lease_id)
        with self._lock:
            changed = self._expire_locked()
            known = self._expiry.pop(key, None) is not None
            if known:  # last again: see _expire_locked
                self._expiry[key] = self._clock() + self.ttl_s
            active = len(self._expiry)
        if changed:
            self._notify(active)
        return known

    def release(self, lease_id: str) -> bool:
        """End a lease; False when it was unknown or had already expired."""
        key = _digest(lease_id)
        with self._lock:
            expired = self._expire_locked()
            known = self._expiry.pop(key, None) is not None
            active = len(self._expiry)
        if expired or known:
            self._notify(active)
        return known

    def holds(self, lease_id: str) -> bool:
        """Whether `lease_id` is a live lease of this seed (a stream of ours is only for holders)."""
        key = _digest(lease_id)
        with self._lock:
            changed = self._expire_locked()
            known = key in self._expiry
            active = len(self._expiry)
        if changed:
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
        # The table is in expiry order (each lease gets now + ttl_s when granted or renewed, and goes last),
        # so the expired ones are its first entries: a call costs what it drops, not the table's size.
        now = self._clock()
        stale = [key for key, _ in itertools.takewhile(lambda entry: entry[1] <= now, self._expiry.items())]
        for key in stale:
            del self._expiry[key]
        if stale:
            log.warning("%d reader lease(s) expired after %g s without a release: %s", len(stale), self.ttl_s,
                        ", ".join(key[:8] for key in stale[:8]) + (", ..." if len(stale) > 8 else ""))
        self.expired += len(stale)
        return bool(stale)

    def close(self) -> None:
        """Forget every lease (the seed stops serving them): the held count goes to 0."""
        with self._lock:
            self._expiry.clear()
        self._notify(0)

    def _notify(self, active: int) -> None:
        with self._lock:  # the count now (a racing change may have come first): the gauge ends right
            now = len(self._expiry)
            delta, self._reported = now - self._reported, now
        metrics().leases_held_changed(delta)
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
            bound = (f"max_readers={self._leases.max_readers}" if self._leases.max_readers
                     else f"the bound of {MAX_LEASES} leases a seed holds")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self._leases.cap} reader(s) already ({bound})")
        return wire.prepare_read_response(lease, self._leases.ttl_s)

    def ReleaseTensorRead(self, request, context):
        self._leases.release(request.lease_id)
        return wire.release_read_response()


class LeaseServer:
    """Serves one seed rank's leases on `host` (a free port); `endpoint` is "host:port".

    `extra(server)` adds services of the same seed on the same port (a partial seed's
    MxPipelineService); each of its `streams` open streams holds a thread of its own, so the
    pool is that much larger than the four the lease calls need.
    """

    def __init__(self, leases: ReaderLeases, *, worker_id: str, host: str = "127.0.0.1",
                 extra: Callable[[grpc.Server], None] | None = None, streams: int = 0) -> None:
        self.leases = leases
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4 + streams, thread_name_prefix="mx-lease"))
        wire.add_worker_servicer_to_server(_Servicer(leases, worker_id), self._server)
        if extra is not None:
            extra(self._server)
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
    lease_id: str = dataclasses.field(repr=False)  # the holder's secret: logged as lease_tag(lease_id)
    _channel: grpc.Channel | None = dataclasses.field(default=None, repr=False)
    ttl_s: float = 0.0  # as the seed announced it; 0: unknown (not renewed)
    renewals: int = 0
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _keeper: threading.Thread | None = dataclasses.field(default=None, repr=False)

    def keep_alive(self) -> "ReadLease":
        """Start renewing (a no-op when the seed announced no TTL)."""
        if self.ttl_s > 0 and self._channel is not None and self._keeper is None:
            self._keeper = threading.Thread(target=self._renew_loop, name=f"mx-lease-{lease_tag(self.lease_id)}",
                                            daemon=True)
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
                log.info("renewing lease %s at %s failed (%s); no longer renewed", lease_tag(self.lease_id),
                         self.endpoint, e.code().name)
                return
            if response.lease_id != self.lease_id:
                log.info("lease %s at %s had expired; holding %s instead", lease_tag(self.lease_id), self.endpoint,
                         lease_tag(response.lease_id))
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
            log.info("releasing lease %s at %s failed (%s): it expires on its own", lease_tag(self.lease_id),
                     self.endpoint, e.code().name)
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
