"""One seed worker becoming a candidate: its record fetched and checked, and its reader lease.

Both pull paths take seeds this way: `fetch` (GetMetadata; the worker must still
exist and name a Mooncake session; the identity the server returns must hash to the
id we asked for; its digests must be ones this target can check; with pins, its
manifest must be one the operator listed, over cryptographic digests) and
`take_lease` (a reader lease when the seed offers them). Anything wrong fails that
seed only: NoSourceError or VerificationError from `fetch`, SeedBusyError (try
again later) from `take_lease`.
"""

from __future__ import annotations

import dataclasses

from sglang_mx import leases
from sglang_mx.client import MetadataClient
from sglang_mx.errors import NoSourceError, VerificationError
from sglang_mx.identity import mx_source_id
from sglang_mx.leases import SeedBusyError
from sglang_mx.manifest import manifest_id, weak_digests
from sglang_mx.records import SourceRef, TensorDescriptor
from sglang_mx.target.verify import check_published

__all__ = ["Pins", "SeedBusyError", "SeedRecord", "fetch", "label", "take_lease"]


@dataclasses.dataclass(frozen=True)
class Pins:
    """The manifests a target accepts (MxConfig.expect; empty: any) and whether their digests may be
    non-cryptographic (MxConfig.allow_weak_digests)."""

    expect: frozenset[str] = frozenset()
    allow_weak: bool = False


@dataclasses.dataclass(frozen=True)
class SeedRecord:
    """A seed worker's record as a target uses it."""

    ref: SourceRef
    session: str  # its Mooncake session ("host:port")
    tensors: tuple[TensorDescriptor, ...]
    endpoint: str  # its WorkerService (leases), "" when it offers none

    @property
    def label(self) -> str:
        return f"{self.ref.worker_id}@{self.session}"


def fetch(client: MetadataClient, ref: SourceRef, *, within: str = "", pins: Pins = Pins()) -> SeedRecord:
    """The record of seed worker `ref`, checked. `within` names what it belongs to, for messages."""
    where = f" of {within}" if within else ""
    stored = client.get_metadata(ref.mx_source_id, ref.worker_id)
    if stored is None:
        raise NoSourceError(f"worker {ref.worker_id}{where} vanished from the server before GetMetadata")
    session = stored.worker.transfer_engine_session_id
    if not session:
        raise NoSourceError(f"worker {ref.worker_id}{where} publishes no transfer_engine_session_id (NIXL seed?)")
    record = SeedRecord(ref, session, tuple(stored.worker.tensors), stored.worker.worker_grpc_endpoint)
    got = mx_source_id(stored.identity)
    if got != ref.mx_source_id:
        raise VerificationError(f"the metadata server answered for source {ref.mx_source_id} with an identity "
                                f"that hashes to {got}", seed=record.label)
    check_published(record.tensors, seed=record.label)
    if pins.expect:
        check_pins(record, pins)
    return record


def check_pins(record: SeedRecord, pins: Pins) -> None:
    """The seed's manifest, recomputed from its record for the id and rank we asked for, is pinned, and
    (unless allowed otherwise) its digests are cryptographic; else VerificationError naming it."""
    manifest = manifest_id(record.ref.mx_source_id, record.ref.worker_rank, record.tensors)
    if manifest not in pins.expect:
        raise VerificationError(f"its manifest {manifest} is not one of the {len(pins.expect)} this target expects",
                                seed=record.label)
    weak = [] if pins.allow_weak else weak_digests(record.tensors)
    if weak:
        raise VerificationError(f"its manifest {manifest} is pinned, but over digests a forger can match (not "
                                "blake3; seeds choose with the `digest` key); set allow_weak_digests to accept them",
                                seed=record.label, tensors=weak)


def take_lease(record: SeedRecord, timeout_s: float) -> leases.ReadLease | None:
    """A reader lease on the seed (None when it offers none); SeedBusyError when it is at max_readers."""
    return leases.acquire(record.endpoint, record.ref.mx_source_id, record.ref.worker_id, timeout_s=timeout_s)


def label(ref: SourceRef) -> str:
    """How a seed worker is named in failures."""
    return f"worker {ref.worker_id} (rank {ref.worker_rank})"
