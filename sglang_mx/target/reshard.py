"""Target side of a mixed-layout pull: find a seed instance of the same model in another
layout, plan (sglang_mx.shards), read, verify, place.

Seeds whose every tensor carries split facts advertise, in their worker record's
`topology`, the id of what the model *is* (`layout.model_source_id`: the
identity without TP/PP/EP sizes and layout) and their layout. A target whose own
layout can be planned (`MixedLayout`) lists READY workers of its model name,
keeps those of its model id in another layout, and takes one whole instance
(every rank of it) at a time: its records, a reader lease per rank, one plan,
then the reads of every seed rank in parallel. Anything wrong (a rank missing,
a plan refused, a failed read, a digest that differs) rejects that instance
as a whole; the caller moves on to the next, and finally to its `fallback`.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import logging
import random
import threading
import time
from typing import Callable, Mapping, Sequence

import torch

from sglang_mx.client import MetadataClient
from sglang_mx.digest import byte_view, mismatches
from sglang_mx.errors import TransferError, VerificationError
from sglang_mx.leases import ReadLease
from sglang_mx.metrics import metrics
from sglang_mx.records import TOPOLOGY_INSTANCE, TOPOLOGY_MODEL_ID, TOPOLOGY_PP_SIZE, TOPOLOGY_TP_SIZE, SourceRef, \
    SourceStatus, TensorDescriptor
from sglang_mx.target.candidate import Pins, SeedBusyError, fetch, take_lease
from sglang_mx.target.choice import least_loaded
from sglang_mx.target.progress import PullProgress
from sglang_mx.target.report import PullReport, build_report
from sglang_mx.target.reshard_plan import RangeCheck, ReshardPlan, Staged, plan_reshard
from sglang_mx.target.striped import read_all
from sglang_mx.target.verify import VerifyMode
from sglang_mx.transfer.engine import MooncakeEngine, ReadsInFlightError
from sglang_mx.transfer.plan import Read

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedLayout:
    """What a target of a plannable layout brings to a mixed-layout pull."""

    model_id: str  # layout.model_source_id of our rank
    model_name: str  # the identity's model_name (the listing filter)
    tp_size: int
    tp_rank: int
    tensors: Mapping[str, torch.Tensor]  # ours, by name
    descriptors: Sequence[TensorDescriptor]  # ours, each with its ShardSpec


def instances(refs: Sequence[SourceRef], mixed: MixedLayout, *, exclude_source_id: str,
              rng: random.Random | None = None) -> list[list[SourceRef]]:
    """Whole seed instances of our model in another layout, least loaded first (random among equals).

    An instance is the workers sharing (mx_source_id, topology mx_instance); it is
    whole when it has exactly ranks 0..tp-1 of a single pipeline stage.
    """
    groups: dict[tuple[str, str], dict[int, SourceRef]] = {}
    for ref in refs:
        top = ref.topology
        if ref.status != SourceStatus.READY or top.get(TOPOLOGY_MODEL_ID) != mixed.model_id:
            continue
        if ref.mx_source_id == exclude_source_id or top.get(TOPOLOGY_PP_SIZE, "1") != "1":
            continue
        group = groups.setdefault((ref.mx_source_id, top.get(TOPOLOGY_INSTANCE, "")), {})
        if ref.worker_rank not in group or ref.updated_at_ms > group[ref.worker_rank].updated_at_ms:
            group[ref.worker_rank] = ref
    whole = []
    for group in groups.values():
        try:
            tp = int(next(iter(group.values())).topology.get(TOPOLOGY_TP_SIZE, "0"))
        except ValueError:
            continue
        if tp > 0 and sorted(group) == list(range(tp)):
            whole.append([group[r] for r in range(tp)])
    return least_loaded(whole, load=lambda g: sum(r.source_load or 0.0 for r in g) / len(g), rng=rng)


class InstanceBusy(Exception):
    """A rank of the instance is at its max_readers: try it again later."""


def pull_instance(
    client: MetadataClient,
    engine: MooncakeEngine,
    group: Sequence[SourceRef],
    mixed: MixedLayout,
    *,
    verify: VerifyMode,
    prepare: Callable[[Read], None] | None = None,
    lease_timeout_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    pins: Pins = Pins(),
) -> PullReport:
    """Fill our tensors from every rank of one seed instance of another layout.

    Raises ReshardRefused (nothing read), NoSourceError (a rank vanished),
    TransferError or VerificationError (our tensors may hold partial data),
    InstanceBusy. Our tensors' memory must already be registered with `engine`.
    """
    verify = VerifyMode(verify)
    seed_tp = len(group)
    near = mixed.tp_rank * seed_tp // mixed.tp_size  # the seed rank over our rows (replicated tensors, ties)
    label = f"instance {group[0].topology.get(TOPOLOGY_INSTANCE, '?')} (TP {seed_tp}, {group[0].mx_source_id})"
    start = clock()
    held: list[ReadLease] = []
    try:
        records = {ref.worker_rank: fetch(client, ref, within=label, pins=pins) for ref in group}
        sessions = {rank: record.session for rank, record in records.items()}
        plan = plan_reshard(mixed.descriptors, {rank: record.tensors for rank, record in records.items()},
                            near=near, verify=verify, seed=label)
        for ref in group:
            if ref.worker_rank in plan.ranks:
                try:
                    lease = take_lease(records[ref.worker_rank], lease_timeout_s)
                except SeedBusyError as e:
                    raise InstanceBusy(str(e)) from e
                if lease is not None:
                    held.append(lease)
        metadata_s = clock() - start
        if plan.unverified:
            log.warning("%s publishes no digest for %d tensor(s) read here: not verified (verify=if_present): %s",
                        label, len(plan.unverified), ", ".join(plan.unverified[:5]))
        log.info("resharding from %s: TP %d -> TP %d rank %d, %.3f GB into place, %.3f GB read "
                 "(%d tensors staged whole)", label, seed_tp, mixed.tp_size, mixed.tp_rank, plan.total_bytes / 1e9,
                 plan.read_bytes / 1e9, len(plan.staged))
        progress = PullProgress(rank=mixed.tp_rank, total_bytes=plan.read_bytes, clock=clock, unit="checks",
                                total_checks=len(plan.checks) + sum(1 for s in plan.staged if s.digest),
                                verifying=verify.checks)
        seeds = {ref.worker_rank: ref.worker_id for ref in group}
        seconds, verify_s, reads = _execute(engine, plan, sessions, mixed.tensors, prepare, clock, label,
                                            progress=progress, seeds=seeds)
        metrics().pulled(plan.read_bytes)
    finally:
        for lease in held:
            lease.release()
    by_rank = {ref.worker_rank: ref for ref in group}
    served: dict[str, int] = {}
    for r, rank_reads in plan.direct.items():
        served[by_rank[r].worker_id] = served.get(by_rank[r].worker_id, 0) + sum(x.length for x in rank_reads)
    for s in plan.staged:
        served[by_rank[s.rank].worker_id] = served.get(by_rank[s.rank].worker_id, 0) + s.size
    nearest_first = sorted(group, key=lambda ref: abs(ref.worker_rank - near))
    return build_report(
        mx_source_id=group[0].mx_source_id, served=served,
        sessions={ref.worker_id: sessions[ref.worker_rank] for ref in nearest_first},
        tensors=len(mixed.descriptors), bytes=plan.total_bytes, reads=reads, seconds=seconds,
        verified=len(plan.checks) + sum(1 for s in plan.staged if s.digest), verify_seconds=verify_s,
        metadata_seconds=metadata_s, rounds=1, resharded_from=seed_tp,
    )


def _execute(engine: MooncakeEngine, plan: ReshardPlan, sessions: Mapping[int, str],
             tensors: Mapping[str, torch.Tensor], prepare, clock, label: str, *,
             progress: PullProgress | None = None, seeds: Mapping[int, str] | None = None) -> tuple[float, float, int]:
    """Run the plan: (seconds from the first read to the last byte verified and placed, seconds spent
    verifying and placing, reads). Raises TransferError, VerificationError.

    Each read is verified as it lands, in its rank's reading thread while the other reads
    move: the range checks it holds, or, for a staged tensor, its whole digest and then the
    copy of its columns into place (staged tensors of one destination fill disjoint columns).
    `progress` is fed as reads land (by seed: `seeds`, rank -> name; the rank number without) and
    ticked while they move.
    """
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    staged_bytes = sum(s.size for s in plan.staged)
    staging = torch.empty(staged_bytes, dtype=torch.uint8, device=device) if staged_bytes else None
    regions = engine.register([(staging.data_ptr(), staged_bytes)]) if staging is not None else []
    flat = {name: byte_view(name, t) for name, t in tensors.items()}
    lock = threading.Lock()
    differing: list[str] = []
    spent = [0.0]

    def check(c: RangeCheck) -> None:
        if mismatches({c.name: flat[c.name][c.offset:c.offset + c.length]}, {c.name: c.digest}):
            with lock:
                differing.append(c.name)
        elif progress is not None:
            progress.verified(c.length, 1)

    def place(s: Staged, off: int) -> None:
        src = staging[off:off + s.size]
        if s.digest and mismatches({s.name: src}, {s.name: s.digest}):
            with lock:
                differing.append(s.name)
            return
        if s.digest and progress is not None:
            progress.verified(s.size, 1)
        dst = flat[s.name].view(*s.dst_view)
        view = src.view(*s.src_view)
        for c in s.copies:
            dst.narrow(1, c.dst_start, c.length).copy_(view.narrow(1, c.src_start, c.length))

    try:
        work: dict[int, list[tuple[Read, list[Callable[[], None]]]]] = {
            r: [(read, []) for read in reads] for r, reads in plan.direct.items()}
        for r, items in work.items():
            starts = [read.local_addr for read, _ in items]
            for c in (c for c in plan.checks if c.rank == r):
                addr = flat[c.name].data_ptr() + c.offset
                items[bisect.bisect_right(starts, addr) - 1][1].append(functools.partial(check, c))
        at = 0
        for s in plan.staged:
            work.setdefault(s.rank, []).append(
                (Read(staging.data_ptr() + at, s.remote_addr, s.size), [functools.partial(place, s, at)]))
            at += s.size
        ranks = sorted(work)
        jobs = []
        for r in ranks:
            items = sorted(work[r], key=lambda item: item[0].local_addr)
            work[r] = items
            seed = (seeds or {}).get(r, f"rank {r}")
            jobs.append((sessions[r], [read for read, _ in items], prepare,
                         _landing(items, lock, spent, clock, progress, seed)))
        start = clock()
        with progress.ticking() if progress is not None else contextlib.nullcontext():
            errors = read_all(engine, jobs)
        failed = [(r, e) for r, e in zip(ranks, errors) if e is not None]
        if failed:
            r, e = failed[0]
            raise TransferError(f"reading from seed rank {r} of {label} failed: {e}", seed=label,
                                code=getattr(e, "code", None))
        if differing:
            metrics().digest_failed()
            raise VerificationError("bytes pulled do not match the seed's published digests (whole or piece)",
                                    seed=label, tensors=sorted(set(differing)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start, spent[0], sum(len(items) for items in work.values())
    except ReadsInFlightError:
        if staging is not None:
            engine.quarantine(staging)  # a read may still write into it: never freed nor reused
        raise
    finally:
        engine.unregister(regions)
        staging = None  # noqa: F841  (the staging buffer goes once unregistered, unless quarantined)


def _landing(items, lock: threading.Lock, spent: list[float], clock, progress: PullProgress | None = None,
             seed: str = "") -> Callable[[int], None]:
    """on_done for one rank's reads: run what waits on read i, adding its time to `spent`."""
    def on_done(index: int) -> None:
        if progress is not None:
            progress.landed(seed, items[index][0].length)
        begin = clock()
        for task in items[index][1]:
            task()
        with lock:
            spent[0] += clock() - begin
        if progress is not None:
            progress.tick()
    return on_done
