"""Seed side: publish one rank's weights and keep them advertised.

Lifecycle: register memory -> publish INITIALIZING -> mark READY -> heartbeat
(status only) -> mark STALE and unregister on close. `close` runs on normal
exit and on SIGTERM when `close_on_exit` is used. `start_seed` is the one way
the SGLang glue, the demo and the tests' seed processes assemble a seed.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import signal
import threading
import time
import uuid
from typing import Callable, Mapping, Sequence

import grpc
import torch

from sglang_mx.client import MetadataClient
from sglang_mx.config import DEFAULTS, MxConfig
from sglang_mx.digest import digest_many
from sglang_mx.errors import MxError, RequestRejectedError, ServerError
from sglang_mx.leases import LeaseServer, ReaderLeases
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.tensors import describe
from sglang_mx.identity import mx_source_id
from sglang_mx.manifest import manifest_id
from sglang_mx.records import (
    DIGEST_FROM_CHECKPOINT, DIGEST_UNVERIFIED, DIGEST_VERIFIED, TOPOLOGY_LEASES, TOPOLOGY_MANIFEST,
    TOPOLOGY_MAX_READERS, PieceDigest, ShardSpec, SourceIdentity, SourceStatus, TensorDescriptor, WorkerRecord,
)
from sglang_mx.chunks import chunk_digests_of
from sglang_mx.shards import pieces_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedOptions:
    """How a seed publishes and serves (mirrors target.PullOptions). Built from an already validated
    MxConfig (`from_config`) or by callers that choose their own values; defaults are MxConfig's."""

    heartbeat_interval_s: float = DEFAULTS.heartbeat_interval_s
    accelerator: str = ""  # "cuda", "cpu", ... (the worker record's accelerator)
    ready: bool = False  # READY at once (weights final) instead of INITIALIZING until mark_ready()
    digests: bool = True  # publish every tensor's content digest (and its dim-0 pieces' with shards)
    # The digest algorithm (sglang_mx.digest.ALGORITHMS); "" each device's default (xxh3-64 on CPU,
    # mxh64 on GPUs). "blake3" is cryptographic: what a pinned manifest (`expect`) needs.
    digest: str = ""
    max_readers: int | None = DEFAULTS.max_readers  # reader-lease cap (0: no cap; None: no lease endpoint)
    lease_ttl_s: float = DEFAULTS.reader_lease_s
    # Also digest every larger tensor in chunks of this many bytes (sglang_mx.chunks; 0: none), for pipelined
    # targets; a cascading target (known_digests) publishes its seed's chunks instead and cuts none of its own.
    chunk_bytes: int = DEFAULTS.chunk_bytes

    @classmethod
    def from_config(cls, config: MxConfig, *, accelerator: str = "") -> "SeedOptions":
        return cls(heartbeat_interval_s=config.heartbeat_interval_s, accelerator=accelerator,
                   max_readers=config.max_readers, lease_ttl_s=config.reader_lease_s, digest=config.digest,
                   chunk_bytes=config.chunk_bytes)


class SeedPublisher:
    """Advertises one rank's tensors on the metadata server."""

    def __init__(
        self,
        client: MetadataClient,
        engine: MooncakeEngine,
        identity: SourceIdentity,
        *,
        worker_rank: int,
        tensors: Sequence[TensorDescriptor],
        worker_id: str | None = None,
        heartbeat_interval_s: float = 30.0,
        accelerator: str = "",
        max_readers: int | None = None,
        lease_ttl_s: float = 60.0,
        load_report_gap_s: float = 0.2,
        topology: Mapping[str, str] | None = None,
        extra_service: Callable[[grpc.Server], None] | None = None,
        streams: int = 0,
        progress: Callable[[], int] | None = None,
    ) -> None:
        """`max_readers`: serve reader leases (sglang_mx.leases) capped at that many (0: no cap) and
        report their count as source_load; None: no lease endpoint. A change of the count is
        heartbeated at once, at most one heartbeat per `load_report_gap_s`.

        A partial seed (sglang_mx.target.pipeline) adds its MxPipelineService to the lease
        endpoint (`extra_service`, with `streams` threads for its open streams) and heartbeats
        while INITIALIZING, reporting `progress()` (bytes verified) with each heartbeat."""
        if heartbeat_interval_s <= 0:
            raise MxError(f"heartbeat_interval_s={heartbeat_interval_s} must be > 0")
        self._client = client
        self._engine = engine
        self.identity = identity
        self.worker_rank = worker_rank
        self.worker_id = worker_id or str(uuid.uuid4())
        self._tensors = tuple(tensors)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._accelerator = accelerator
        self._topology = dict(topology or {})
        self._extra_service = extra_service
        self._streams = streams
        self._progress = progress
        self.leases = None if max_readers is None else ReaderLeases(
            max_readers=max_readers, ttl_s=lease_ttl_s, on_change=lambda active: self._load_changed.set(),
            published_bytes=sum(t.size for t in self._tensors))
        self._lease_server: LeaseServer | None = None
        self._load_report_gap_s = load_report_gap_s
        self._load_changed = threading.Event()
        self.mx_source_id = ""
        self._regions: list[tuple[int, int]] = []
        self._status = SourceStatus.UNKNOWN
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._closed = False
        self._close_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------

    @property
    def digests(self) -> dict[str, str]:
        """Name -> the digest published for it ("" none)."""
        return {t.name: t.digest for t in self._tensors}

    @property
    def manifest(self) -> str:
        """The rank's manifest id (sglang_mx.manifest) as published in its topology; "" when none."""
        return self._topology.get(TOPOLOGY_MANIFEST, "")

    def start(self) -> "SeedPublisher":
        """Register the tensors' memory and publish them as INITIALIZING."""
        try:
            self._regions = self._engine.register((t.addr, t.size) for t in self._tensors)
            if self.leases is not None:
                host = self._engine.session_id.rsplit(":", 1)[0]
                self._lease_server = LeaseServer(self.leases, worker_id=self.worker_id, host=host,
                                                 extra=self._extra_service, streams=self._streams).start()
            self._status = SourceStatus.INITIALIZING
            self._publish()
        except BaseException:
            self.close()
            raise
        log.info(
            "seed rank %d published %d tensors (%d bytes) as %s worker %s, session %s",
            self.worker_rank, len(self._tensors), sum(t.size for t in self._tensors),
            self.mx_source_id, self.worker_id, self._engine.session_id,
        )
        return self

    def mark_ready(self) -> None:
        """Advertise READY and start heartbeating."""
        self._set_status(SourceStatus.READY)
        self.start_heartbeat()

    def start_heartbeat(self) -> None:
        """Heartbeat the current status (a partial seed: INITIALIZING, with its progress)."""
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="mx-heartbeat", daemon=True)
            self._heartbeat.start()

    def replace(self, tensors: Sequence[TensorDescriptor], topology: Mapping[str, str], status: SourceStatus) -> None:
        """Publish a new record for the same worker (a partial seed turning into a full one): the
        same memory, lease endpoint and leases, new descriptors, topology and status."""
        self._tensors = tuple(tensors)
        self._topology = dict(topology)
        self._progress = None
        self._status = status
        if self.leases is not None:
            self.leases.published_bytes = sum(t.size for t in self._tensors)
        self._publish()

    def close(self) -> None:
        """Stop heartbeating, mark STALE (best effort), release the memory."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._load_changed.set()  # wakes the heartbeat
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        if self.mx_source_id:
            try:
                self._client.update_status(self.mx_source_id, self.worker_id, self.worker_rank, SourceStatus.STALE)
                log.info("seed rank %d worker %s marked STALE", self.worker_rank, self.worker_id)
            except ServerError as e:
                log.warning("could not mark worker %s STALE: %s", self.worker_id, e)
        if self._lease_server is not None:
            self._lease_server.stop()
            self._lease_server = None
        if self.leases is not None:
            self.leases.close()
        self._engine.unregister(self._regions)
        self._regions = []

    def __enter__(self) -> "SeedPublisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ---------------------------------------------------------

    def _record(self) -> WorkerRecord:
        topology = dict(self._topology)
        if self.leases is not None and self.leases.max_readers:
            topology[TOPOLOGY_MAX_READERS] = str(self.leases.max_readers)
        if self._lease_server is not None:
            topology[TOPOLOGY_LEASES] = self._lease_server.endpoint
        return WorkerRecord(
            worker_rank=self.worker_rank,
            transfer_engine_session_id=self._engine.session_id,
            tensors=self._tensors,
            status=self._status,
            accelerator=self._accelerator,
            worker_grpc_endpoint=self._lease_server.endpoint if self._lease_server else "",
            topology=topology,
        )

    def _publish(self) -> None:
        self.mx_source_id = self._client.publish(self.identity, self._record(), self.worker_id)

    def _set_status(self, status: SourceStatus) -> None:
        self._status = status
        load = None if self.leases is None else float(self.leases.active())
        progress = self._progress
        extra = {} if progress is None else {"verified_bytes": progress()}
        try:
            self._client.update_status(self.mx_source_id, self.worker_id, self.worker_rank, status, source_load=load,
                                       **extra)
        except RequestRejectedError as e:
            # The server forgot us (restarted, or reaped us during a partition).
            log.warning("metadata server %s refused worker %s's %s (%s); publishing again", self._client.url,
                        self.worker_id, status.name, e)
            self._publish()

    def _heartbeat_loop(self) -> None:
        """The status every heartbeat_interval_s, and soon after the reader count changes (rate-limited)."""
        while True:
            self._load_changed.wait(self._heartbeat_interval_s)
            if self._stop.is_set():
                return
            if self._load_changed.is_set():  # gather a burst of lease changes into one heartbeat
                self._stop.wait(self._load_report_gap_s)
                self._load_changed.clear()
                if self._stop.is_set():
                    return
            try:
                self._set_status(self._status)
            except ServerError as e:
                log.warning("heartbeat of worker %s failed, will retry: %s", self.worker_id, e)


def close_on_exit(publisher: SeedPublisher) -> None:
    """Close `publisher` at interpreter exit and on SIGTERM.

    The SIGTERM handler chains to the one it replaces (or exits with 143 where
    there was none); it can only be installed from the main thread.
    """
    atexit.register(publisher.close)
    if threading.current_thread() is not threading.main_thread():
        log.debug("not in the main thread: worker %s closes at exit only", publisher.worker_id)
        return
    previous = signal.getsignal(signal.SIGTERM)

    def _on_sigterm(signum, frame):
        publisher.close()
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _on_sigterm)


def start_seed(
    tensors: Mapping[str, torch.Tensor],
    engine: MooncakeEngine,
    identity: SourceIdentity,
    client: MetadataClient,
    *,
    worker_rank: int,
    worker_id: str | None = None,
    options: SeedOptions = SeedOptions(),
    shards: Mapping[str, ShardSpec] | None = None,
    topology: Mapping[str, str] | None = None,
    known_digests: Mapping[str, str] | None = None,
) -> SeedPublisher:
    """Register and publish one rank's `tensors` as INITIALIZING (READY at once with `options.ready`).

    With `options.digests`, every tensor's content digest is computed first (on its
    own device, after every kernel queued before: sglang_mx.digest synchronizes) and
    published with its descriptor, for targets to verify their pulls against.
    The seed serves reader leases capped at `options.max_readers` (0: no cap; None:
    no lease endpoint) and heartbeats their count as source_load.
    `shards` (name -> ShardSpec, sglang_mx.shards) are published with the descriptors for
    targets of other layouts, with the digests of each dim-0 split's pieces; `topology`
    is the worker record's topology (sglang_mx.layout.seed_topology). `known_digests`: digests
    these very bytes were just checked against (a target that pulled and verified them
    seeds in cascade), published as they are instead of hashing the bytes again; given at
    all (even empty), it says the tensors were pulled, so every other digest is published
    as "unverified" (computed over bytes nobody checked); without it, as "checkpoint".
    The record's topology carries the rank's manifest id (`mx_manifest`, sglang_mx.manifest).
    The publisher closes (STALE, memory unregistered) at interpreter exit and on
    SIGTERM; call `mark_ready()` once the rank serves.
    """
    descriptors, topology = seed_descriptors(tensors, identity, worker_rank=worker_rank, options=options,
                                             shards=shards, topology=topology, known_digests=known_digests)
    publisher = SeedPublisher(
        client, engine, identity, worker_rank=worker_rank, tensors=descriptors,
        worker_id=worker_id, heartbeat_interval_s=options.heartbeat_interval_s, accelerator=options.accelerator,
        max_readers=options.max_readers, lease_ttl_s=options.lease_ttl_s, topology=topology,
    )
    close_on_exit(publisher)
    publisher.start()
    if options.ready:
        publisher.mark_ready()
    return publisher


def seed_descriptors(
    tensors: Mapping[str, torch.Tensor],
    identity: SourceIdentity,
    *,
    worker_rank: int,
    options: SeedOptions = SeedOptions(),
    shards: Mapping[str, ShardSpec] | None = None,
    topology: Mapping[str, str] | None = None,
    known_digests: Mapping[str, str] | None = None,
) -> tuple[tuple[TensorDescriptor, ...], dict[str, str]]:
    """What a seed publishes (`start_seed` says how): its descriptors, digests and their origins
    included, and its topology with the manifest id."""
    start = time.perf_counter()
    published, known = {}, {}
    digests = options.digests
    if digests:
        known = {name: d for name, d in (known_digests or {}).items() if name in tensors}
        published = {**known, **digest_many({n: t for n, t in tensors.items() if n not in known}, options.digest)}
        published = {name: published[name] for name in tensors}
    rest = DIGEST_FROM_CHECKPOINT if known_digests is None else DIGEST_UNVERIFIED
    origins = {name: DIGEST_VERIFIED if name in known else rest for name in published}
    pieces = piece_digests_of(tensors, shards, options.digest) if digests and shards else {}
    # A target that pulled publishes its seed's chunks as it checked them and cuts none of its own: its manifest
    # stays its seed's, so a pin holds down the cascade.
    cut_at = options.chunk_bytes if known_digests is None else 0
    chunks = chunk_digests_of(tensors, cut_at, options.digest, known_digests) if digests else {}
    if published:
        log.info("seed rank %d: digests of %d tensors (%d of them verified in the pull, not hashed again), %d "
                 "split pieces and %d chunks in %.3f s", worker_rank, len(published), len(known),
                 sum(len(p) for p in pieces.values()), sum(len(c) for _, c in chunks.values()),
                 time.perf_counter() - start)
    descriptors = tuple(describe(tensors, published, shards, pieces, origins, chunks))
    topology = {**(topology or {}), TOPOLOGY_MANIFEST: manifest_id(mx_source_id(identity), worker_rank, descriptors)}
    return descriptors, topology


def piece_digests_of(tensors: Mapping[str, torch.Tensor], shards: Mapping[str, ShardSpec],
                     algorithm: str = "") -> dict[str, tuple[PieceDigest, ...]]:
    """Name -> the digests of its dim-0 split pieces (sglang_mx.shards.pieces_of), hashed together."""
    views, where = {}, {}
    for name, spec in shards.items():
        t = tensors.get(name)
        if t is None or spec.replicated or spec.dim != 0 or t.numel() == 0:
            continue
        rows = t.reshape(spec.shape)
        for local_start, global_start, length in pieces_of(spec):
            key = f"{name}@{global_start}"
            views[key] = rows.narrow(0, local_start, length)
            where[key] = (name, global_start, length)
    digests = digest_many(views, algorithm)
    out: dict[str, list[PieceDigest]] = {}
    for key, digest in digests.items():
        name, global_start, length = where[key]
        out.setdefault(name, []).append(PieceDigest(global_start, length, digest))
    return {name: tuple(p) for name, p in out.items()}
