"""Target side: find a READY seed of our identity and rank, and pull from it."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

from sglang_mx.client import MetadataClient
from sglang_mx.errors import CandidateFailure, LayoutMismatchError, MxError, NoSourceError, TransferError
from sglang_mx.identity import mx_source_id
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.plan import build_plan
from sglang_mx.types import SourceIdentity, SourceRef, SourceStatus, TensorDescriptor

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullOptions:
    wait_timeout_s: float = 60.0  # how long to wait for a READY seed to appear
    poll_interval_s: float = 1.0
    max_candidates: int = 5  # seeds tried before giving up

    def __post_init__(self) -> None:
        if self.wait_timeout_s < 0:
            raise MxError(f"wait_timeout_s={self.wait_timeout_s} must be >= 0")
        if self.poll_interval_s <= 0:
            raise MxError(f"poll_interval_s={self.poll_interval_s} must be > 0")
        if self.max_candidates < 1:
            raise MxError(f"max_candidates={self.max_candidates} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullReport:
    mx_source_id: str
    seed_worker_id: str
    seed_session_id: str
    tensors: int
    bytes: int
    reads: int
    seconds: float  # the transfer alone
    failures: tuple[CandidateFailure, ...] = ()  # candidates tried before the one that worked

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def pull_weights(
    client: MetadataClient,
    engine: MooncakeEngine,
    identity: SourceIdentity,
    *,
    worker_rank: int,
    tensors: Sequence[TensorDescriptor],
    options: PullOptions = PullOptions(),
    clock: Callable[[], float] = time.monotonic,
) -> PullReport:
    """Fill `tensors` (our memory) from a READY seed of the same identity and rank.

    Candidates are tried newest first; one that does not match or fails to
    transfer is recorded and the next is tried. Raises NoSourceError listing
    every attempt when none succeeds within the wait time or the candidate cap.
    When it raises, the destination memory may hold partial data.
    """
    source_id = mx_source_id(identity)
    deadline = clock() + options.wait_timeout_s
    failures: list[CandidateFailure] = []
    tried: set[str] = set()
    regions = engine.register((t.addr, t.size) for t in tensors)
    try:
        while True:
            refs = client.list_sources(identity, status=SourceStatus.READY, worker_rank=worker_rank)
            for ref in refs:
                if ref.worker_id in tried or len(tried) >= options.max_candidates:
                    continue
                tried.add(ref.worker_id)
                try:
                    report = _pull_from(client, engine, ref, tensors, clock)
                except (LayoutMismatchError, TransferError, NoSourceError) as e:
                    log.warning("seed %s unusable: %s", ref.worker_id, e)
                    failures.append(CandidateFailure(_label(ref), str(e)))
                    continue
                return dataclasses.replace(report, failures=tuple(failures))
            if len(tried) >= options.max_candidates:
                raise NoSourceError(
                    f"all {len(tried)} candidate seed(s) allowed (max_candidates) failed for "
                    f"{describe_identity(identity)} ({source_id}) rank {worker_rank} on {client.url}",
                    attempts=failures,
                )
            if clock() >= deadline:
                raise NoSourceError(
                    f"no READY seed could serve {describe_identity(identity)} ({source_id}) rank {worker_rank} "
                    f"on metadata server {client.url} within {options.wait_timeout_s:g} s",
                    attempts=failures,
                )
            time.sleep(min(options.poll_interval_s, max(deadline - clock(), 0.0)))
    finally:
        engine.unregister(regions)


def _pull_from(
    client: MetadataClient,
    engine: MooncakeEngine,
    ref: SourceRef,
    tensors: Sequence[TensorDescriptor],
    clock: Callable[[], float],
) -> PullReport:
    stored = client.get_metadata(ref.mx_source_id, ref.worker_id)
    if stored is None:
        raise NoSourceError(f"worker {ref.worker_id} vanished from the server before GetMetadata")
    session = stored.worker.transfer_engine_session_id
    if not session:
        raise NoSourceError(f"worker {ref.worker_id} publishes no transfer_engine_session_id (NIXL seed?)")
    label = f"{ref.worker_id}@{session}"
    plan = build_plan(tensors, stored.worker.tensors, seed=label)
    log.info(
        "pulling %d tensors (%d bytes in %d reads) from %s", plan.tensor_count, plan.total_bytes,
        len(plan.reads), label,
    )
    start = clock()
    engine.read(session, plan.reads)
    seconds = clock() - start
    return PullReport(
        mx_source_id=ref.mx_source_id,
        seed_worker_id=ref.worker_id,
        seed_session_id=session,
        tensors=plan.tensor_count,
        bytes=plan.total_bytes,
        reads=len(plan.reads),
        seconds=seconds,
    )


def describe_identity(identity: SourceIdentity) -> str:
    """A one-line summary for error messages: what a seed must match."""
    parts = [
        repr(identity.model_name),
        f"TP {identity.tensor_parallel_size} PP {identity.pipeline_parallel_size} EP {identity.expert_parallel_size}",
        f"dtype {identity.dtype or '-'}",
    ]
    if identity.quantization:
        parts.append(f"quantization {identity.quantization}")
    if identity.revision:
        parts.append(f"revision {identity.revision}")
    if identity.backend_framework_version:
        parts.append(f"{identity.backend_framework.name.lower()} {identity.backend_framework_version}")
    parts += [f"{k}={v}" for k, v in sorted(identity.extra_parameters.items())]
    return ", ".join(parts)


def _label(ref: SourceRef) -> str:
    return f"worker {ref.worker_id} (rank {ref.worker_rank})"
