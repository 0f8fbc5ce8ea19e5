"""Target side: find a READY seed of our identity and rank, and pull from it.

`pull_weights` is the whole policy (wait, try candidates newest first, give up
within bounds); `pull_into` is what an SGLang rank calls with its config.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from typing import Callable, Mapping, Sequence

import torch

from sglang_mx.client import MetadataClient
from sglang_mx.config import MxConfig
from sglang_mx.digest import mismatches
from sglang_mx.errors import (CandidateFailure, LayoutMismatchError, MxError, NoSourceError, TransferError,
                              VerificationError)
from sglang_mx.identity import RankInfo, describe_identity, identity_for, mx_source_id
from sglang_mx.records import SourceIdentity, SourceRef, SourceStatus, TensorDescriptor
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.memory import populate
from sglang_mx.transfer.plan import Read, build_plan
from sglang_mx.transfer.tensors import describe

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullOptions:
    """How long and how widely to look for a seed. Built from an already validated MxConfig
    (`from_config`) or by callers that choose their own values; not validated again here."""

    wait_timeout_s: float = 60.0  # how long to wait for a READY seed to appear
    poll_interval_s: float = 1.0
    max_candidates: int = 5  # seeds tried before giving up
    verify: str = "if_present"  # MxConfig.verify: "require" | "if_present" | "off"

    @classmethod
    def from_config(cls, config: MxConfig) -> "PullOptions":
        return cls(wait_timeout_s=config.wait_timeout_s, max_candidates=config.max_candidates, verify=config.verify)


# Given the digests a seed published (name -> digest), the names of our tensors that differ.
Verifier = Callable[[Mapping[str, str]], Sequence[str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullReport:
    mx_source_id: str
    seed_worker_id: str
    seed_session_id: str
    tensors: int
    bytes: int
    reads: int
    seconds: float  # the transfer, from the first read submitted to the last one done (verification inside it)
    verified: int = 0  # tensors whose bytes were checked against the seed's digests
    verify_seconds: float = 0.0  # hashing, mostly while later reads were still moving
    register_seconds: float = 0.0  # registering our memory with Mooncake
    discover_seconds: float = 0.0  # ListSources until a candidate was found (waiting included)
    metadata_seconds: float = 0.0  # GetMetadata and planning for the seed that served
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
    sleep: Callable[[float], None] = time.sleep,
    verifier: Verifier | None = None,
    prepare: Callable[[Read], None] | None = None,
) -> PullReport:
    """Fill `tensors` (our memory) from a READY seed of the same identity and rank.

    Candidates are tried newest first; one that does not match or fails to
    transfer is recorded and the next is tried. Raises NoSourceError listing
    every attempt when none succeeds within the wait time or the candidate cap.
    When it raises, the destination memory may hold partial data. `clock` and
    `sleep` go together: a test passes a fake pair to run the waiting at once.

    `verifier` checks our tensors against the seed's published digests after each
    pull (`options.verify` decides what a seed without digests means); a seed whose
    bytes differ is a failed candidate like one whose transfer failed. Without a
    verifier (`verify: off`) nothing is checked. Tensors are verified one read at a
    time, as soon as that read's bytes have all arrived, while the others move.
    `prepare(read)` readies a read's destination just before it is submitted
    (`transfer.memory.populate` for host memory).
    """
    source_id = mx_source_id(identity)
    deadline = clock() + options.wait_timeout_s
    failures: list[CandidateFailure] = []
    tried: set[str] = set()
    start = clock()
    regions = engine.register((t.addr, t.size) for t in tensors)
    registered = clock()
    try:
        while True:
            refs = client.list_sources(identity, status=SourceStatus.READY, worker_rank=worker_rank)
            for ref in refs:
                if ref.worker_id in tried or len(tried) >= options.max_candidates:
                    continue
                tried.add(ref.worker_id)
                found = clock()
                try:
                    report = _pull_from(client, engine, ref, tensors, clock, options.verify, verifier, prepare)
                except (LayoutMismatchError, TransferError, NoSourceError, VerificationError) as e:
                    log.warning("seed %s unusable: %s", ref.worker_id, e)
                    failures.append(CandidateFailure(_label(ref), str(e)))
                    continue
                return dataclasses.replace(report, failures=tuple(failures), register_seconds=registered - start,
                                           discover_seconds=found - registered)
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
            sleep(min(options.poll_interval_s, max(deadline - clock(), 0.0)))
    finally:
        engine.unregister(regions)


def _pull_from(
    client: MetadataClient,
    engine: MooncakeEngine,
    ref: SourceRef,
    tensors: Sequence[TensorDescriptor],
    clock: Callable[[], float],
    verify: str,
    verifier: Verifier | None,
    prepare: Callable[[Read], None] | None,
) -> PullReport:
    metadata_start = clock()
    stored = client.get_metadata(ref.mx_source_id, ref.worker_id)
    if stored is None:
        raise NoSourceError(f"worker {ref.worker_id} vanished from the server before GetMetadata")
    session = stored.worker.transfer_engine_session_id
    if not session:
        raise NoSourceError(f"worker {ref.worker_id} publishes no transfer_engine_session_id (NIXL seed?)")
    label = f"{ref.worker_id}@{session}"
    plan = build_plan(tensors, stored.worker.tensors, seed=label)
    expected = _expected_digests(tensors, stored.worker.tensors, verify if verifier else "off", label)
    by_read = _names_by_read(plan.reads, tensors, expected)
    metadata_seconds = clock() - metadata_start
    log.info(
        "pulling %d tensors (%d bytes in %d reads) from %s", plan.tensor_count, plan.total_bytes,
        len(plan.reads), label,
    )
    differing: list[str] = []
    verify_seconds = 0.0

    unchecked = {index for index, names in enumerate(by_read) if names}

    def check(index: int) -> None:  # runs as soon as read `index` has all its bytes
        nonlocal verify_seconds
        if index in unchecked:
            unchecked.discard(index)
            begin = clock()
            differing.extend(verifier({name: expected[name] for name in by_read[index]}))
            verify_seconds += clock() - begin

    start = clock()
    # Every read has finished (or failed and been drained) when read() returns or raises.
    engine.read(session, plan.reads, prepare=prepare, on_done=check if expected else None)
    for index in sorted(unchecked):  # an engine that did not report a read: checked now, never skipped
        check(index)
    seconds = clock() - start
    if differing:
        raise VerificationError("bytes pulled do not match the seed's published digests", seed=label,
                                tensors=[name for name in expected if name in set(differing)])
    return PullReport(
        verified=len(expected),
        verify_seconds=verify_seconds,
        metadata_seconds=metadata_seconds,
        mx_source_id=ref.mx_source_id,
        seed_worker_id=ref.worker_id,
        seed_session_id=session,
        tensors=plan.tensor_count,
        bytes=plan.total_bytes,
        reads=len(plan.reads),
        seconds=seconds,
    )


def _names_by_read(reads: Sequence[Read], tensors: Sequence[TensorDescriptor],
                   expected: Mapping[str, str]) -> list[list[str]]:
    """For each read (sorted by local address, as plans are), the expected tensors that lie inside it."""
    starts = [r.local_addr for r in reads]
    out: list[list[str]] = [[] for _ in reads]
    for t in tensors:
        if t.name not in expected:
            continue
        index = bisect.bisect_right(starts, t.addr) - 1
        read = reads[index] if index >= 0 else None
        if read is None or t.addr + t.size > read.local_addr + read.length:
            raise MxError(f"tensor {t.name!r} is not inside one read of the plan")  # plans cover every tensor
        out[index].append(t.name)
    return out


def _expected_digests(
    local: Sequence[TensorDescriptor], remote: Sequence[TensorDescriptor], verify: str, seed: str
) -> dict[str, str]:
    """Name -> the digest our bytes must have after the pull, per the verify mode.

    Checked before any byte moves: with "require", a seed lacking a digest for any
    tensor with bytes is refused (VerificationError) without being read.
    """
    if verify == "off":
        return {}
    published = {t.name: t.digest for t in remote if t.digest}
    with_bytes = [t.name for t in local if t.size > 0]
    missing = [name for name in with_bytes if name not in published]
    if missing and verify == "require":
        raise VerificationError("seed publishes no digest for some tensors and verify is 'require'", seed=seed,
                                tensors=missing)
    if missing:
        log.warning("seed %s publishes no digest for %d of %d tensors: those are not verified (verify=if_present)",
                    seed, len(missing), len(with_bytes))
    return {name: published[name] for name in with_bytes if name in published}


def _label(ref: SourceRef) -> str:
    return f"worker {ref.worker_id} (rank {ref.worker_rank})"


def pull_into(
    tensors: Mapping[str, torch.Tensor], engine: MooncakeEngine, info: RankInfo, config: MxConfig, *,
    client: MetadataClient | None = None,
) -> PullReport:
    """Fill `tensors` from a READY seed of this rank's identity, or raise NoSourceError.

    `client`: one already connecting (made while the model was built); it is closed here.
    Host-memory destinations are populated (`populate`) read by read just before
    each is submitted: they need not have been written before.
    """
    identity = identity_for(info, config)
    log.info(
        "modelexpress: loading %d tensors of %r (rank %d) from a peer via %s",
        len(tensors), identity.model_name, info.worker_rank, config.url,
    )
    on_host = all(t.device.type == "cpu" for t in tensors.values())
    with client or MetadataClient.for_config(config) as client:
        report = pull_weights(client, engine, identity, worker_rank=info.worker_rank, tensors=describe(tensors),
                              options=PullOptions.from_config(config),
                              verifier=None if config.verify == "off" else digest_verifier(tensors),
                              prepare=_populate if on_host else None)
    log.info(
        "modelexpress: pulled %d tensors, %.3f GB in %.3f s (%.2f GB/s) from %s (worker %s); "
        "%d verified in %.3f s",
        report.tensors, report.bytes / 1e9, report.seconds, report.gb_per_s,
        report.seed_session_id, report.seed_worker_id, report.verified, report.verify_seconds,
    )
    log.info(
        "modelexpress: phases register=%.3f discover=%.3f metadata=%.3f transfer=%.3f verify=%.3f "
        "(verify overlaps transfer)",
        report.register_seconds, report.discover_seconds, report.metadata_seconds, report.seconds,
        report.verify_seconds,
    )
    return report


def _populate(read: Read) -> None:
    populate(read.local_addr, read.length)


def digest_verifier(tensors: Mapping[str, torch.Tensor]) -> Verifier:
    """Checks `tensors` against a seed's digests (on their own device; CUDA is synchronized first)."""
    return lambda expected: mismatches(tensors, expected)
