"""The target's policy: find READY seeds of our identity and rank, and pull from them.

`pull_weights` waits, takes the least-loaded seeds (`target.choice`), stripes over
up to `max_seeds` of them (`target.striped` runs the rounds), falls back to seed
instances of other layouts (`target.reshard`) and gives up within bounds;
`pull_into` is what an SGLang rank calls with its config.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Callable, Mapping, Sequence

import torch

from sglang_mx.client import MetadataClient
from sglang_mx.config import DEFAULTS, MxConfig
from sglang_mx.errors import CandidateFailure, NoSourceError, TransferError, VerificationError
from sglang_mx.identity import describe_identity, mx_source_id
from sglang_mx.layout import RankInfo, identity_for, model_source_id
from sglang_mx.metrics import metrics
from sglang_mx.records import TOPOLOGY_INSTANCE, ShardSpec, SourceIdentity, SourceRef, SourceStatus, TensorDescriptor
from sglang_mx.target.candidate import Pins
from sglang_mx.target.choice import order_candidates, order_parents
from sglang_mx.target.pipeline import PipelineSeed, is_partial
from sglang_mx.target.progress import PullProgress
from sglang_mx.target.report import PullReport
from sglang_mx.target.reshard import InstanceBusy, MixedLayout, instances, pull_instance
from sglang_mx.target.reshard_plan import ReshardRefused
from sglang_mx.target.striped import StripedPull
from sglang_mx.target.waiting import SeedWaiter
from sglang_mx.target.verify import Verifier, VerifyMode, digest_verifier
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.memory import populate
from sglang_mx.transfer.plan import Read
from sglang_mx.transfer.tensors import describe
from sglang_mx.tree import Waiting, at_cap

__all__ = ["PullOptions", "pull_into", "pull_weights"]

log = logging.getLogger(__name__)

PIPELINE_WINDOW_BYTES = 2 << 20
"""A pipelined pull's bytes in flight per seed: about two tensors of a small model, one read of a large
tensor (a read is never split by the window). Smaller: each link of a chain adds less delay; too small
for the link's bandwidth-delay product and the link idles between reads."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullOptions:
    """How long and how widely to look for a seed. Built from an already validated MxConfig
    (`from_config`) or by callers that choose their own values; not validated again here.
    Defaults are MxConfig's."""

    wait_timeout_s: float = DEFAULTS.wait_timeout_s  # how long to wait for a READY seed to appear
    poll_interval_s: float = 1.0  # how often to list again while waiting, where the server has no watch
    watch: bool = True  # wait for seeds on the metadata server's watch where it has one (target.waiting)
    max_candidates: int = DEFAULTS.max_candidates  # seeds tried before giving up
    verify: VerifyMode = DEFAULTS.verify
    expect: tuple[str, ...] = DEFAULTS.expect  # pinned manifest ids (empty: any seed that verifies)
    allow_weak_digests: bool = DEFAULTS.allow_weak_digests
    max_seeds: int = DEFAULTS.max_seeds  # seeds read from at once, each a stripe of the bytes
    # Equally loaded seeds in random order (spread targets over them), or in the server's (newest first).
    spread: bool = True
    rng: random.Random | None = dataclasses.field(default=None, compare=False)
    lease_timeout_s: float = 2.0  # deadline of a PrepareTensorRead
    # After a pull that succeeded, leave our memory registered: the target is about to seed it (cascade),
    # and its seed then shares the registration instead of registering the same memory again.
    keep_registered: bool = False
    # Pipelined cascade (target.pipeline): also read from partial seeds (targets serving what they have
    # verified), one read per tensor with at most `window_bytes` in flight per seed, so each tensor is
    # verified, and can be served on, as soon as it lands.
    pipeline: bool = False
    window_bytes: int = PIPELINE_WINDOW_BYTES

    @classmethod
    def from_config(cls, config: MxConfig) -> "PullOptions":
        return cls(wait_timeout_s=config.wait_timeout_s, max_candidates=config.max_candidates, verify=config.verify,
                   max_seeds=config.max_seeds, expect=config.expect, allow_weak_digests=config.allow_weak_digests,
                   keep_registered=config.source is not False, pipeline=config.pipeline, watch=config.watch)

    @property
    def pins(self) -> Pins:
        return Pins(frozenset(self.expect), self.allow_weak_digests)


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
    mixed: MixedLayout | None = None,
    pipeline: PipelineSeed | None = None,
    on_verified: Callable[[int], None] | None = None,
) -> PullReport:
    """Fill `tensors` (our memory) from READY seeds of the same identity and rank.

    Candidates are taken least-loaded first (target.choice), up to
    `options.max_seeds` at once, each read under a reader lease when the seed
    offers one (a busy seed is skipped, and waited for when all are busy). The
    bytes still missing are cut into stripes balanced by bytes, one per seed
    (target.stripes), read in parallel. A seed that does not match, fails to
    transfer, or serves bytes that fail their digest is recorded and never asked
    again; only the tensors it left unfinished or wrong are read again, from the
    others. Raises NoSourceError listing every attempt when the tensors cannot be
    completed within the wait time or the candidate cap. When it raises, the
    destination memory may hold partial data. `clock` and `sleep` go together: a
    test passes a fake pair to run the waiting at once.

    `verifier` checks our tensors against the seeds' published digests as their
    reads land (`options.verify` decides what a seed without digests means); a
    seed whose bytes differ fails like one whose transfer failed. Without a
    verifier (`verify: off`) nothing is checked. `prepare(read)` readies a read's
    destination just before it is submitted (`transfer.memory.populate` for host
    memory).

    `mixed`: our layout can be planned (target.reshard); when no seed of our own
    identity can serve, whole seed instances of the same model in another TP layout
    are tried (each counts as one candidate), least loaded first.

    `pipeline` (needs `options.pipeline`): we publish ourselves as a partial seed once the
    pull has a source and serve each tensor as soon as it is final; on success the same
    worker becomes a full READY seed, on failure it withdraws (target.pipeline). With
    `options.pipeline`, partial seeds are candidates too (`choice.order_parents`): only
    their verified tensors are read, as they appear; a parent that breaks is dropped and
    what it served stays. `on_verified(nbytes)`: bytes that just became final (verified,
    or kept unchecked where nothing is checked); runs in reading threads.
    """
    if pipeline is not None and not options.pipeline:
        raise ValueError("a PipelineSeed needs PullOptions(pipeline=True)")
    source_id = mx_source_id(identity)
    deadline = clock() + options.wait_timeout_s
    verify = VerifyMode(options.verify) if verifier else VerifyMode.OFF
    progress = PullProgress(rank=worker_rank, total_bytes=sum(t.size for t in tensors), total_checks=len(tensors),
                            verifying=verify.checks, clock=clock)
    def on_final(dest, checked: dict[str, str]) -> None:
        if pipeline is not None:
            pipeline.verified_names(checked)
        if on_verified is not None:
            on_verified(dest.size)

    pull = StripedPull(tensors, verify=verify, verifier=verifier, clock=clock, prepare=prepare, pins=options.pins,
                       progress=progress, on_final=on_final if pipeline is not None or on_verified else None,
                       window_bytes=options.window_bytes if options.pipeline else None)

    def waiting() -> Waiting:  # what this target waits for, as it is now (its depth once attached)
        if pipeline is None:
            return Waiting(options.pipeline)
        return Waiting(options.pipeline, pipeline.depth, pipeline.worker_id)

    waiter = SeedWaiter(client, source_id, worker_rank, poll_interval_s=options.poll_interval_s, clock=clock,
                        sleep=sleep, use_watch=options.watch, waiting=waiting)
    start = clock()
    regions = engine.register((t.addr, t.size) for t in tensors)
    registered = clock()
    found: float | None = None
    succeeded = False
    try:
        while True:
            queue, busy = _candidates(client, identity, worker_rank, options, pipeline)
            queue = [r for r in queue if r.worker_id not in pull.bad]
            while not pull.done and len(pull.bad) < options.max_candidates:
                while queue and len(pull.sources) < options.max_seeds and len(pull.bad) < options.max_candidates:
                    found = clock() if found is None else found
                    busy |= pull.add(client, queue.pop(0), options.lease_timeout_s)
                if pipeline is not None and pull.sources and not pipeline.attached:
                    pipeline.attach(1 + max(src.depth for src in pull.sources), pull.sources[0].expected)
                if not pull.sources:
                    break
                versions = pull.versions()
                if not pull.round(engine):
                    pull.wait_for_parents(options.poll_interval_s, versions)
                pull.drop_broken()
            if pull.done:
                report = dataclasses.replace(pull.report(), register_seconds=registered - start,
                                             discover_seconds=(found or registered) - registered)
                if pipeline is not None:
                    pipeline.finish(report.digests)
                succeeded = True
                return report
            pull.drop_all()  # leases are not held while we wait
            if mixed is not None and not queue and len(pull.bad) < options.max_candidates:
                found_at = clock()
                report, mixed_busy = _pull_mixed(client, engine, mixed, pull, options, source_id,
                                                 verify=verify, prepare=prepare, clock=clock)
                busy |= mixed_busy
                if report is not None:
                    if pipeline is not None:
                        pipeline.finish(report.digests)
                    succeeded = True
                    return dataclasses.replace(report, register_seconds=registered - start,
                                               discover_seconds=(found or found_at) - registered)
            if len(pull.bad) >= options.max_candidates:
                raise NoSourceError(
                    f"all {len(pull.bad)} candidate seed(s) allowed (max_candidates) failed for "
                    f"{describe_identity(identity)} ({source_id}) rank {worker_rank} on {client.url}",
                    attempts=pull.failures,
                )
            if clock() >= deadline:
                raise NoSourceError(
                    f"no READY seed could serve {describe_identity(identity)} ({source_id}) rank {worker_rank} "
                    f"on metadata server {client.url} within {options.wait_timeout_s:g} s"
                    + (" (the READY seeds were all at max_readers)" if busy else ""),
                    attempts=pull.failures,
                )
            waiter.wait(max(deadline - clock(), 0.0),
                        helps=lambda ref: ref.worker_id not in pull.bad and waiting().useful(ref))
    finally:
        waiter.close()
        pull.drop_all()
        if pipeline is not None and not succeeded:
            pipeline.abort()
        if not (succeeded and options.keep_registered):
            engine.unregister(regions)
        metrics().pull_finished(clock() - start, ok=succeeded)


def _candidates(client: MetadataClient, identity: SourceIdentity, worker_rank: int, options: PullOptions,
                pipeline: PipelineSeed | None) -> tuple[list[SourceRef], bool]:
    """The seeds to ask, in order: READY ones least loaded first; with `options.pipeline`, then the
    partial seeds the tree allows (choice.order_parents). Seeds listed at their cap are left out
    (tree.at_cap); the flag says whether any was."""
    refs = client.list_sources(identity, status=SourceStatus.READY, worker_rank=worker_rank)
    if not options.pipeline:
        return order_candidates(refs, rng=options.rng, spread=options.spread), any(map(at_cap, refs))
    partial = [r for r in client.list_sources(identity, status=SourceStatus.INITIALIZING, worker_rank=worker_rank)
               if is_partial(r)]
    order = order_parents(refs, partial, own_depth=pipeline.depth if pipeline is not None else None,
                          own_worker=pipeline.worker_id if pipeline is not None else "", rng=options.rng,
                          spread=options.spread)
    return order, any(map(at_cap, refs + partial))


def _pull_mixed(client: MetadataClient, engine: MooncakeEngine, mixed: MixedLayout, pull: StripedPull,
                options: PullOptions, source_id: str, *, verify: VerifyMode, prepare,
                clock) -> tuple[PullReport | None, bool]:
    """Try whole seed instances of our model in other layouts; (report, any was busy).

    A failed or refused instance is recorded in `pull` (each of its workers is bad) and counts as
    one candidate."""
    busy = False
    refs = client.list_sources(status=SourceStatus.READY, model_name=mixed.model_name)
    groups = [g for g in instances(refs, mixed, exclude_source_id=source_id, rng=options.rng)
              if not any(r.worker_id in pull.bad for r in g)]
    for group in groups:
        if len(pull.bad) >= options.max_candidates:
            break
        try:
            report = pull_instance(client, engine, group, mixed, verify=verify, prepare=prepare,
                                   lease_timeout_s=options.lease_timeout_s, clock=clock, pins=options.pins)
            return dataclasses.replace(report, failures=tuple(pull.failures)), busy
        except InstanceBusy as e:
            log.info("%s", e)
            busy = True
        except (ReshardRefused, NoSourceError, TransferError, VerificationError) as e:
            log.warning("seed instance %s (TP %d) unusable: %s", group[0].topology.get(TOPOLOGY_INSTANCE, "?"),
                        len(group), e)
            pull.failures.append(CandidateFailure(
                f"instance of workers {', '.join(r.worker_id for r in group)} (TP {len(group)}, other layout)",
                str(e)))
            pull.bad.update(r.worker_id for r in group)
    return None, busy


def pull_into(
    tensors: Mapping[str, torch.Tensor], engine: MooncakeEngine, info: RankInfo, config: MxConfig, *,
    client: MetadataClient | None = None, shards: Mapping[str, ShardSpec] | None = None,
    pipeline: PipelineSeed | None = None,
) -> PullReport:
    """Fill `tensors` from READY seeds of this rank's identity, or raise NoSourceError.

    `client`: one already connecting (made while the model was built); it is closed here.
    `shards`: the split facts of every tensor (our layout can be planned): with the
    config's `any_layout`, seeds of the same model in another TP layout may serve too.
    Host-memory destinations are populated (`populate`) read by read just before
    each is submitted: they need not have been written before. `pipeline`: this rank serves its
    verified tensors while it pulls (config `pipeline`; pull_weights says how).
    """
    identity = identity_for(info, config)
    log.info(
        "modelexpress: loading %d tensors of %r (rank %d) from a peer via %s",
        len(tensors), identity.model_name, info.worker_rank, config.url,
    )
    on_host = all(t.device.type == "cpu" for t in tensors.values())
    descriptors = describe(tensors, shards=shards)
    mixed = None
    if shards is not None and config.any_layout:
        mixed = MixedLayout(model_id=model_source_id(info, config), model_name=identity.model_name,
                            tp_size=info.tp_size, tp_rank=info.tp_rank, tensors=tensors, descriptors=descriptors)
    with client or MetadataClient.for_config(config) as client:
        report = pull_weights(client, engine, identity, worker_rank=info.worker_rank, tensors=descriptors,
                              options=PullOptions.from_config(config),
                              verifier=digest_verifier(tensors) if config.verify.checks else None,
                              prepare=_populate if on_host else None, mixed=mixed, pipeline=pipeline)
    if report.resharded_from:
        log.info("modelexpress: resharded from a TP %d seed instance to TP %d rank %d", report.resharded_from,
                 info.tp_size, info.tp_rank)
    log.info(
        "modelexpress: pulled %d tensors, %.3f GB in %.3f s (%.2f GB/s) from %s (worker %s); "
        "%d verified in %.3f s",
        report.tensors, report.bytes / 1e9, report.seconds, report.gb_per_s,
        report.seed_session_id, report.seed_worker_id, report.verified, report.verify_seconds,
    )
    if len(report.served) > 1 or report.rounds > 1:
        log.info("modelexpress: striped over %d seed(s) in %d round(s): %s", len(report.served), report.rounds,
                 ", ".join(f"{worker} {n / 1e9:.3f} GB" for worker, n in report.served.items()))
    log.info(
        "modelexpress: phases register=%.3f discover=%.3f metadata=%.3f transfer=%.3f verify=%.3f "
        "(verify overlaps transfer)",
        report.register_seconds, report.discover_seconds, report.metadata_seconds, report.seconds,
        report.verify_seconds,
    )
    return report


def _populate(read: Read) -> None:
    populate(read.local_addr, read.length)
