"""One seed worker becoming a candidate: its record fetched and checked, and its reader lease.

Both pull paths take seeds this way: `fetch` (GetMetadata; the worker must still
exist and name a Mooncake session; its digests must be ones this target can check)
and `take_lease` (a reader lease when the seed offers them). Anything wrong fails
that seed only: NoSourceError or VerificationError from `fetch`, SeedBusyError
(try again later) from `take_lease`.
"""

from __future__ import annotations

import dataclasses

from sglang_mx import leases
from sglang_mx.client import MetadataClient
from sglang_mx.errors import NoSourceError
from sglang_mx.leases import SeedBusyError
from sglang_mx.records import SourceRef, TensorDescriptor
from sglang_mx.target.verify import check_published

__all__ = ["SeedBusyError", "SeedRecord", "fetch", "label", "take_lease"]


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


def fetch(client: MetadataClient, ref: SourceRef, *, within: str = "") -> SeedRecord:
    """The record of seed worker `ref`, checked. `within` names what it belongs to, for messages."""
    where = f" of {within}" if within else ""
    stored = client.get_metadata(ref.mx_source_id, ref.worker_id)
    if stored is None:
        raise NoSourceError(f"worker {ref.worker_id}{where} vanished from the server before GetMetadata")
    session = stored.worker.transfer_engine_session_id
    if not session:
        raise NoSourceError(f"worker {ref.worker_id}{where} publishes no transfer_engine_session_id (NIXL seed?)")
    record = SeedRecord(ref, session, tuple(stored.worker.tensors), stored.worker.worker_grpc_endpoint)
    check_published(record.tensors, seed=record.label)
    return record


def take_lease(record: SeedRecord, timeout_s: float) -> leases.ReadLease | None:
    """A reader lease on the seed (None when it offers none); SeedBusyError when it is at max_readers."""
    return leases.acquire(record.endpoint, record.ref.mx_source_id, record.ref.worker_id, timeout_s=timeout_s)


def label(ref: SourceRef) -> str:
    """How a seed worker is named in failures."""
    return f"worker {ref.worker_id} (rank {ref.worker_rank})"
