"""Pipelined cascade: a target serves each tensor on as soon as it has verified it.

In a store-and-forward cascade a target seeds only after its whole pull is verified, so a
fleet fills in log2(N) generations of the whole model's transfer time. Here a target
publishes itself, as soon as its pull has a first source, as a *partial seed*: an
INITIALIZING record (topology `mx_pipeline` "1" and `mx_depth`, its depth in the tree) with
the digests its reads are checked against, and a lease endpoint that also streams which of
its tensors are verified (`MxPipelineService.WatchVerified`, to holders of a live lease only).
Its children read exactly those tensors, check them against the same digests, and serve
them on in turn, so every link of a chain moves at once.

- `VerifiedSet`: the seed's bitmap over its published units (`chunks.units`: a tensor, or each
  chunk of a tensor its record publishes chunk digests for). A bit is set only after the bytes
  matched the digest the record publishes for that unit, and only once: a verified destination
  is never written again in the pull, so a set bit is final. With chunks, a hop lags its parent
  by one chunk rather than one whole tensor (sglang_mx.chunks).
- `PipelineSeed`: the target's side. `attach(depth, digests)` publishes the partial record;
  the pull reports what became final (`verified`); `finish` turns the same worker (same
  memory registration, lease endpoint and leases, so its children keep reading) into a
  full READY seed; `abort` marks the bitmap failed (children stop waiting) and withdraws.
- `VerifiedWatch`: a child's view of one partial parent, streamed; it says when the parent
  broke (its stream failed: the parent died) so the pull re-attaches elsewhere, keeping what
  it verified.

The tree is planned by `target.choice.order_parents`: full seeds first, then partial seeds
shallowest first; a partial seed is a parent only when it is shallower than the target
(depths never change, so no cycle can form), and each serves at most `max_readers` children
(its leases).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from typing import Callable, Iterable, Mapping, Sequence

import grpc
import torch

from sglang_mx import wire
from sglang_mx.chunks import chunks_of, parse_unit, units
from sglang_mx.client import MetadataClient
from sglang_mx.errors import MxError
from sglang_mx.identity import mx_source_id
from sglang_mx.leases import ReaderLeases
from sglang_mx.manifest import manifest_id
from sglang_mx.records import (DIGEST_VERIFIED, TOPOLOGY_DEPTH, TOPOLOGY_MANIFEST, TOPOLOGY_PIPELINE, ShardSpec,
                               SourceIdentity, SourceStatus)
from sglang_mx.seed import SeedOptions, SeedPublisher, close_on_exit, seed_descriptors
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.tensors import describe
from sglang_mx.tree import depth_of, is_partial  # (re-exported: where pipelined code looks)

__all__ = ["PipelineSeed", "VerifiedSet", "VerifiedWatch", "depth_of", "is_partial"]

log = logging.getLogger(__name__)

MAX_STREAMS = 64
"""Open WatchVerified streams a partial seed serves (each holds a thread); with max_readers set, that many."""
_WAKE_S = 1.0  # a stream re-checks its client and the seed's state at least this often


@dataclasses.dataclass(frozen=True)
class Snapshot:
    version: int
    bits: bytes
    verified_bytes: int
    complete: bool
    failed: bool


class VerifiedSet:
    """Which tensors of a partial seed are verified: one bit each, in the order of its record.

    Zero-size tensors hold no bytes and count as verified from the start. Thread-safe; waiters
    are woken on every change."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int]) -> None:
        self._index = {name: i for i, name in enumerate(names)}
        self._sizes = list(sizes)
        self._bits = bytearray((len(names) + 7) // 8)
        self._set = 0
        self._bytes = 0
        self._version = 0
        self._complete = self._failed = False
        self._cond = threading.Condition()
        self.add(n for n, size in zip(names, sizes) if size == 0)

    @property
    def verified_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def add(self, names: Iterable[str]) -> int:
        """Mark `names` verified (unknown names are ignored); return the bytes newly verified."""
        added = 0
        with self._cond:
            for name in names:
                i = self._index.get(name)
                if i is None or self._bits[i // 8] >> (i % 8) & 1:
                    continue
                self._bits[i // 8] |= 1 << (i % 8)
                self._set += 1
                self._bytes += self._sizes[i]  # per name, as the record's total counts them (aliases too)
                added += 1
            if added:
                self._version += 1
                self._cond.notify_all()
        return added

    def finish(self) -> None:
        """Every tensor is verified (the pull succeeded)."""
        with self._cond:
            self._bits = bytearray(b"\xff" * len(self._bits))
            self._bytes = sum(self._sizes)
            self._set = len(self._sizes)
            self._complete = True
            self._version += 1
            self._cond.notify_all()

    def fail(self) -> None:
        """Nothing more will be verified (the pull failed or the seed closes)."""
        with self._cond:
            if not (self._complete or self._set == len(self._sizes)):
                self._failed = True
                self._version += 1
                self._cond.notify_all()

    def snapshot(self) -> Snapshot:
        with self._cond:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> Snapshot:
        complete = self._complete or self._set == len(self._sizes)
        return Snapshot(self._version, bytes(self._bits), self._bytes, complete, self._failed)

    def wait_newer(self, version: int, timeout_s: float) -> Snapshot:
        """The state once its version differs from `version`, or after `timeout_s` whatever it is."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != version, timeout=timeout_s)
            return self._snapshot_locked()


class _PipelineServicer(wire.MxPipelineServiceServicer):
    """WatchVerified for the holders of this seed's leases."""

    def __init__(self, verified: VerifiedSet, leases: ReaderLeases, worker_id: str, max_streams: int,
                 closed: threading.Event) -> None:
        self._verified = verified
        self._leases = leases
        self._worker_id = worker_id
        self._max_streams = max_streams
        self._closed = closed
        self._lock = threading.Lock()
        self._open = 0

    def WatchVerified(self, request, context):
        if request.worker_id != self._worker_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this endpoint serves worker {self._worker_id}, "
                                                     f"not {request.worker_id or '(none given)'}")
        if not request.lease_id or not self._leases.holds(request.lease_id):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "WatchVerified is for readers holding a live lease of this seed (PrepareTensorRead first)")
        with self._lock:
            if self._open >= self._max_streams:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self._open} WatchVerified streams open already (at most {self._max_streams})")
            self._open += 1
        try:
            version = -1
            while context.is_active() and not self._closed.is_set():
                snap = self._verified.wait_newer(version, _WAKE_S)
                if snap.version != version:
                    version = snap.version
                    yield wire.verified_update(snap.bits, snap.verified_bytes, complete=snap.complete,
                                               failed=snap.failed)
                    if snap.complete or snap.failed:
                        return
            if self._closed.is_set():
                yield wire.verified_update(b"", 0, failed=True)
        finally:
            with self._lock:
                self._open -= 1


class PipelineSeed:
    """A target that publishes itself while it pulls (see the module docstring).

    Nothing is published until `attach`: the pull calls it once it has a first source, whose
    digests it will check its bytes against."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], engine: MooncakeEngine, identity: SourceIdentity,
                 client: MetadataClient, *, worker_rank: int, worker_id: str | None = None,
                 options: SeedOptions = SeedOptions(), shards: Mapping[str, ShardSpec] | None = None,
                 topology: Mapping[str, str] | None = None) -> None:
        if options.max_readers is None:
            raise MxError("a pipelined target needs reader leases (max_readers 0 or more, not None): its children "
                          "are streamed its verified tensors over its lease endpoint")
        self.tensors = dict(tensors)
        self.engine = engine
        self.identity = identity
        self.client = client
        self.worker_rank = worker_rank
        self.worker_id = worker_id or str(uuid.uuid4())
        self.options = options
        self.shards = shards
        self.topology = dict(topology or {})
        self.publisher: SeedPublisher | None = None
        self.depth: int | None = None
        self.verified: VerifiedSet | None = None
        self._published: dict[str, str] = {}  # name -> digest the partial record publishes
        self._closed = threading.Event()

    @property
    def attached(self) -> bool:
        return self.publisher is not None

    def attach(self, depth: int, digests: Mapping[str, str]) -> None:
        """Publish our memory as a partial seed at `depth`, with `digests` (name, or a chunk's unit name
        (sglang_mx.chunks) -> the digest our bytes will be checked against): INITIALIZING, heartbeating the
        bytes verified so far."""
        if self.publisher is not None:
            return
        self._published = {name: d for name, d in digests.items()
                           if d and (name in self.tensors or (parse_unit(name) or ("",))[0] in self.tensors)}
        whole = {name: d for name, d in self._published.items() if name in self.tensors}
        origins = {name: DIGEST_VERIFIED for name in whole}
        descriptors = tuple(describe(self.tensors, whole, self.shards, None, origins, chunks_of(self._published)))
        topology = {**self.topology, TOPOLOGY_PIPELINE: "1", TOPOLOGY_DEPTH: str(depth),
                    TOPOLOGY_MANIFEST: manifest_id(mx_source_id(self.identity), self.worker_rank, descriptors)}
        names, sizes, _ = zip(*units(descriptors)) if descriptors else ((), (), ())
        verified = VerifiedSet(names, sizes)
        publisher = self._start_publisher(descriptors, topology, verified)  # INITIALIZING
        publisher.start_heartbeat()
        self.publisher, self.depth, self.verified = publisher, depth, verified
        log.info("pipelined: serving verified tensors as partial seed %s at depth %d (%d tensors)",
                 publisher.worker_id, depth, len(descriptors))

    def verified_names(self, checked: Mapping[str, str]) -> None:
        """`checked`: names (or chunks' unit names) whose bytes just matched a digest (-> that digest), now final.
        Only those checked against the digest we publish are served on."""
        if self.verified is None:
            return
        self.verified.add(name for name, digest in checked.items() if self._published.get(name) == digest)

    def finish(self, digests: Mapping[str, str]) -> SeedPublisher:
        """The pull succeeded: publish the full record (`digests`: those the pull verified; any other
        tensor is hashed) and go READY on the same worker, leases and registration."""
        descriptors, topology = seed_descriptors(self.tensors, self.identity, worker_rank=self.worker_rank,
                                                 options=self.options, shards=self.shards, topology=self.topology,
                                                 known_digests=digests)
        if self.publisher is None:  # never attached (nothing to pull): an ordinary seed from here on
            self.publisher = self._start_publisher(descriptors, topology)
        else:
            self.publisher.replace(descriptors, topology, SourceStatus.INITIALIZING)
            self.verified.finish()
        self.publisher.mark_ready()
        log.info("pipelined: worker %s is a full seed (READY)", self.publisher.worker_id)
        return self.publisher

    def _start_publisher(self, descriptors, topology: Mapping[str, str],
                         verified: VerifiedSet | None = None) -> SeedPublisher:
        """This worker's SeedPublisher, registered and published (INITIALIZING); closed at exit. With
        `verified` (a partial seed) it also streams that bitmap and heartbeats its progress."""
        extra = {}
        if verified is not None:
            streams = min(self.options.max_readers or MAX_STREAMS, MAX_STREAMS)

            def serve_verified(server: grpc.Server) -> None:  # runs in publisher.start(), once it exists
                wire.add_pipeline_servicer_to_server(
                    _PipelineServicer(verified, publisher.leases, self.worker_id, streams, self._closed), server)

            extra = {"extra_service": serve_verified, "streams": streams, "progress": lambda: verified.verified_bytes}
        publisher = SeedPublisher(
            self.client, self.engine, self.identity, worker_rank=self.worker_rank, tensors=descriptors,
            worker_id=self.worker_id, heartbeat_interval_s=self.options.heartbeat_interval_s,
            accelerator=self.options.accelerator, max_readers=self.options.max_readers,
            lease_ttl_s=self.options.lease_ttl_s, topology=topology, **extra)
        close_on_exit(publisher)
        publisher.start()
        return publisher

    def abort(self) -> None:
        """The pull failed: tell the children nothing more comes, and withdraw (STALE)."""
        self._closed.set()
        if self.verified is not None:
            self.verified.fail()
        if self.publisher is not None:
            self.publisher.close()


class VerifiedWatch:
    """A child's live view of one partial parent's verified tensors (its WatchVerified stream)."""

    def __init__(self, endpoint: str, mx_source_id: str, worker_id: str, lease_id: str,
                 names: Sequence[str]) -> None:
        self._index = {name: i for i, name in enumerate(names)}
        self._cond = threading.Condition()
        self._bits = b""
        self.version = 0
        self.complete = False
        self.broken = ""  # why the parent can serve nothing more ("" while it can)
        self._channel = grpc.insecure_channel(endpoint)
        self._call = wire.MxPipelineServiceStub(self._channel).WatchVerified(
            wire.watch_verified_request(mx_source_id, worker_id, lease_id))
        self._thread = threading.Thread(target=self._run, name=f"mx-watch-{worker_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        why = "its stream ended before it was complete"
        try:
            for update in self._call:
                with self._cond:
                    if update.failed:
                        why = "its own pull failed"
                        break
                    self._bits = update.verified
                    self.complete = update.complete
                    self.version += 1
                    self._cond.notify_all()
                if update.complete:
                    return
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}"
        with self._cond:
            if not self.complete:
                self.broken = why
                self.version += 1
                self._cond.notify_all()

    def holder(self) -> Callable[[Iterable[str]], bool]:
        """A test of whether every one of some names is verified, against the bitmap as it is now."""
        with self._cond:
            bits, complete = self._bits, self.complete
        index = self._index

        def holds(names: Iterable[str]) -> bool:
            if complete:
                return True
            for name in names:
                i = index.get(name)
                if i is None or i // 8 >= len(bits) or not bits[i // 8] >> (i % 8) & 1:
                    return False
            return True
        return holds

    def wait(self, version: int, timeout_s: float) -> bool:
        """Wait until something changed since `version` (or `timeout_s`); True when it did."""
        with self._cond:
            return self._cond.wait_for(lambda: self.version != version, timeout=timeout_s)

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()
