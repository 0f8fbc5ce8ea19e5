"""A same-layout pull of one rank over one or more seeds, round by round: which bytes come from
which seed, and what is good.

`target.policy.pull_weights` (wait, choose seeds, give up within bounds) drives a
`StripedPull`: seeds are added as sources (`target.candidate`: record fetched and
checked, layout compared, reader lease taken), then each `round` reads the bytes
still missing, striped over the sources (`target.stripes`), in parallel. Verification overlaps the
transfer: a tensor whose bytes all come from one read is checked as soon as that
read lands; the others once the round's reads are done. Whatever failed, or
whose digest differs, stays pending for the next round from the other seeds.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import threading
from typing import Callable, Sequence

from sglang_mx import leases
from sglang_mx.chunks import chunk_units, parse_unit, units
from sglang_mx.client import MetadataClient
from sglang_mx.errors import CandidateFailure, LayoutMismatchError, NoSourceError, TransferError, VerificationError
from sglang_mx.leases import ReadLease
from sglang_mx.metrics import metrics
from sglang_mx.records import TOPOLOGY_LEASES, SourceRef, TensorDescriptor
from sglang_mx.target.candidate import Pins, SeedBusyError, fetch, label, take_lease
from sglang_mx.target.progress import PullProgress
from sglang_mx.target.report import PullReport, build_report
from sglang_mx.target.pipeline import VerifiedWatch, depth_of, is_partial
from sglang_mx.target.stripes import (Destination, Slice, assign, chunked, cut, destinations, reads_for,
                                      stripe_count)
from sglang_mx.target.verify import Verifier, VerifyMode, expected_digests
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.plan import Read, build_plan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Source:
    """A seed taken for this pull: its record, what our tensors read from it, its lease."""

    ref: SourceRef
    session: str
    label: str
    remote_addr: dict[str, int]
    expected: dict[str, str]  # name -> digest our bytes must have (per the verify mode)
    lease: ReadLease | None
    watch: VerifiedWatch | None = None  # a partial seed: which of its tensors are verified (target.pipeline)
    depth: int = 0  # its depth in the cascade tree (0: a full seed)
    chunks: dict[str, tuple[int, tuple[str, ...]]] = dataclasses.field(default_factory=dict)  # name -> its chunking

    @property
    def partial(self) -> bool:
        return self.watch is not None and not self.watch.complete


class StripedPull:
    """One striped pull: the destinations still missing, the seeds in use, the seeds that failed."""

    def __init__(self, tensors: Sequence[TensorDescriptor], *, verify: VerifyMode, verifier: Verifier | None,
                 clock: Callable[[], float], prepare: Callable[[Read], None] | None = None,
                 pins: Pins = Pins(), progress: PullProgress | None = None,
                 on_final: Callable[[Destination, dict[str, str]], None] | None = None,
                 window_bytes: int | None = None) -> None:
        """`progress`: fed as reads land and rounds end, and ticked (it logs) while reads move.
        `on_final(dest, checked)`: a destination is kept for good (`checked`: its names and the
        digests they matched, empty when nothing was checked); runs in reading threads.
        `window_bytes` (a pipelined pull): one read per destination, submitted in order with at
        most that many bytes in flight per seed, so destinations become final one by one."""
        self.pins = pins
        self.progress = progress
        self.tensors = tensors
        self.prepare = prepare
        self.verify = verify
        self.verifier = verifier
        self.clock = clock
        self.pending = destinations(tensors)
        self._size = {t.name: t.size for t in tensors}
        self.total_bytes = sum(d.size for d in self.pending)
        self.checked = False  # some seed's layout matched (a model with no bytes needs that much)
        self.sources: list[_Source] = []
        self.bad: set[str] = set()
        self.failures: list[CandidateFailure] = []
        self.served: dict[str, int] = {}  # worker id -> bytes it served that passed
        self.sessions: dict[str, str] = {}
        self.mx_source_id = ""
        self.reads = self.verified = self.rounds = 0
        self.verified_bytes = 0
        self.digests: dict[str, str] = {}  # name -> the digest its pulled bytes were checked against
        self.seconds = self.verify_seconds = self.metadata_seconds = 0.0
        self.on_final = on_final
        self.window_bytes = window_bytes
        self.endpoints: dict[str, str] = {}  # worker id -> its lease endpoint, from its record (see `add`)
        # A chunked pull (pipelined, sglang_mx.chunks): the first source's chunks and whole digests, which every
        # later one must publish too; each chunked tensor's units not yet kept. None until the first source.
        self.chunking: dict[str, tuple[int, tuple[str, ...]]] | None = None
        self.wholes: dict[str, str] = {}
        self.units_left: dict[str, int] = {}
        self.chunk_seed = ""

    @property
    def done(self) -> bool:
        return self.checked and not self.pending

    def add(self, client: MetadataClient, ref: SourceRef, lease_timeout_s: float) -> bool:
        """Take `ref` as a source; True when it was busy (at max_readers) and is left for later.

        A seed is asked for its lease first where the target knows its lease endpoint (the listing's
        `mx_lease_endpoint`, or the record fetched before in this pull), and its record fetched (and
        checked) only once it grants one: a crowd of waiting targets asks the busy seeds, not the
        metadata server, again and again. The lease is kept only if the record names the same endpoint."""
        start = self.clock()
        early: ReadLease | None = None
        try:
            endpoint = self.endpoints.get(ref.worker_id) or ref.topology.get(TOPOLOGY_LEASES, "")
            if endpoint:
                early = leases.acquire(endpoint, ref.mx_source_id, ref.worker_id, timeout_s=lease_timeout_s)
            record = fetch(client, ref, pins=self.pins)
            self.endpoints[ref.worker_id] = record.endpoint
            build_plan(self.tensors, record.tensors, seed=record.label)  # the layouts must agree exactly
            expected = expected_digests(self.tensors, record.tensors, self.verify, record.label)
            remote_addr = {t.name: t.addr for t in record.tensors}
            chunks = {t.name: (t.chunk_bytes, t.chunks) for t in record.tensors if t.chunks}
            chunking = None
            if self.window_bytes is not None and self.verify.checks:  # a pipelined pull verifies chunk by chunk
                chunking = self._chunking(record, chunks, expected, remote_addr)
            if early is not None and record.endpoint != endpoint:  # it moved: a lease where it serves now
                early.release()
                early = None
            lease = early if early is not None else take_lease(record, lease_timeout_s)
            early = None  # (it is the source's lease now)
            watch = _watch(record, lease) if is_partial(ref) else None
        except SeedBusyError as e:
            log.info("%s", e)
            return True
        except (LayoutMismatchError, NoSourceError, VerificationError) as e:
            self._fail(ref, e)
            return False
        finally:
            if early is not None:  # taken, but the seed failed its checks
                early.release()
            self.metadata_seconds += self.clock() - start
        if chunking is not None and self.chunking is None:
            self._cut(chunking, expected, record.label)
        self.checked = True
        self.mx_source_id = ref.mx_source_id
        self.sessions[ref.worker_id] = record.session
        self.sources.append(_Source(ref, record.session, record.label, remote_addr, expected, lease, watch,
                                    depth_of(ref), chunks))
        if watch is not None:
            log.info("reading from partial seed %s (depth %d) as it verifies", record.label, depth_of(ref))
        return False

    def _chunking(self, record, chunks: dict[str, tuple[int, tuple[str, ...]]], expected: dict[str, str],
                  remote_addr: dict[str, int]) -> dict[str, tuple[int, tuple[str, ...]]]:
        """A pipelined pull's chunks from this seed (name -> (chunk_bytes, digests), our tensors with a digest to
        check), with their units' digests and addresses added to `expected` and `remote_addr`. The first source's
        become the pull's (`_cut`); every later one must publish the same chunks and whole digests, since a
        chunk kept from one seed and the rest of its tensor from another are checked whole against one digest
        (else LayoutMismatchError, before any byte is read from it)."""
        ours = {name: chunks[name] for name in expected if name in chunks}
        if self.chunking is not None:
            differ = sorted(name for name in {*ours, *self.chunking}
                            if ours.get(name) != self.chunking.get(name)
                            or name in self.wholes and expected.get(name) != self.wholes[name])
            if differ:
                raise LayoutMismatchError(
                    f"seed {record.label} publishes other chunks or digests than the seed this pipelined pull "
                    f"started from for {len(differ)} tensors (first {differ[0]!r}): a pull verifies each tensor "
                    "against one seed's chunks; seeds of one fleet must share their chunk_bytes")
        for name, (chunk_bytes, digests) in ours.items():
            for unit, offset, _, digest in chunk_units(name, self._size[name], chunk_bytes, digests):
                expected[unit] = digest
                remote_addr[unit] = remote_addr[name] + offset
        return ours

    def _cut(self, chunking: dict[str, tuple[int, tuple[str, ...]]], expected: dict[str, str], label: str) -> None:
        """Make the first source's chunks the pull's units (before any round: nothing is read yet)."""
        self.chunking = chunking
        self.chunk_seed = label
        self.wholes = {name: expected[name] for name in chunking}
        self.pending = chunked(self.pending, {name: cb for name, (cb, _) in chunking.items()})
        self.units_left = {name: len(digests) for name, (_, digests) in chunking.items()}
        if chunking:
            log.info("pipelined pull in chunks: %d tensors verified and served on chunk by chunk (%d units in all)",
                     len(chunking), len(self.pending))

    def drop_broken(self) -> None:
        """Fail every partial source whose stream broke (it died, or its own pull failed)."""
        for src in [s for s in self.sources if s.watch is not None and s.watch.broken]:
            self._fail(src.ref, TransferError(f"partial seed stopped serving: {src.watch.broken}", seed=src.label))

    def wait_for_parents(self, timeout_s: float, versions: dict[int, int]) -> None:
        """Wait up to `timeout_s` for any partial source to verify more (or break) since `versions`."""
        watches = [s.watch for s in self.sources if s.partial]
        if not watches:
            return
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            if self.progress is not None:
                self.progress.tick()  # a long wait still logs a line every interval
            for w in watches:
                if w.wait(versions.get(id(w), -1), min(0.05 if len(watches) > 1 else 1.0, timeout_s)):
                    return

    def versions(self) -> dict[int, int]:
        """The partial sources' stream versions now (for `wait_for_parents`), by stream."""
        return {id(s.watch): s.watch.version for s in self.sources if s.watch is not None}

    def round(self, engine: MooncakeEngine) -> bool:
        """Read the pending bytes striped over the sources; keep what completed and verified.
        False when no source holds any of them yet (partial seeds only: wait for them).

        A destination read whole by one read is verified as soon as that read lands
        (in the reading thread, while other reads move); the rest after the reads.
        With a partial source, or a window, whole destinations go to the sources that
        hold them (`stripes.assign`), each its own read.
        """
        pipelined = self.window_bytes is not None or any(s.partial for s in self.sources)
        if pipelined:
            sources = list(self.sources)
            holders = [s.watch.holder() if s.partial else None for s in sources]
            stripes = assign(self.pending, [(lambda d, h=h: h is None or h(d.names)) for h in holders])
        else:
            sources = self.sources[: stripe_count(sum(d.size for d in self.pending), len(self.sources))]
            stripes = cut(self.pending, len(sources))
        jobs = [(src, slices, reads_for(slices, src.remote_addr, merge=not pipelined))
                for src, slices in zip(sources, stripes) if slices or pipelined]
        if not any(slices for _, slices, _ in jobs):
            return False
        self.rounds += 1
        for src, slices, reads in jobs:
            if slices:
                log.info("pulling %d bytes in %d reads from %s", sum(p.length for p in slices), len(reads),
                         src.label)
        checked: dict[Destination, set[str]] = {}  # verified early -> the names that differ
        lock = threading.Lock()
        by_read = [_whole_by_read(slices, reads) for _, slices, reads in jobs]
        feeds: list[_Feed | None] = [None] * len(jobs)
        if pipelined:
            claimed = {p.dest for _, slices, _ in jobs for p in slices}
            feeds = [_Feed(src, slices, reads, by_read[i], self.pending, claimed, lock, self.window_bytes)
                     for i, (src, slices, reads) in enumerate(jobs)]

        progress = self.progress

        def on_done(src: _Source, reads: Sequence[Read], by_read: list[list[Destination]]) -> Callable[[int], None]:
            def check(index: int) -> None:
                if progress is not None:
                    progress.landed(src.ref.worker_id, reads[index].length)
                for dest in by_read[index] if self.verifier else ():
                    expected = {n: src.expected[n] for n in dest.names if n in src.expected}
                    begin = self.clock()
                    differing = set(self.verifier(expected)) if expected else set()
                    with lock:
                        self.verify_seconds += self.clock() - begin
                        checked[dest] = differing
                    if progress is not None and expected and not differing:
                        progress.verified(dest.size, sum(parse_unit(n) is None for n in expected))
                    if self.on_final is not None and expected and not differing:
                        self.on_final(dest, expected)
                if progress is not None:
                    progress.tick()
            return check

        start = self.clock()
        with progress.ticking() if progress is not None else contextlib.nullcontext():
            errors = read_all(engine, [
                (src.session, reads, self.prepare, on_done(src, reads, by_read[i])
                 if self.verifier or progress is not None or self.on_final is not None else None, feeds[i])
                for i, (src, slices, reads) in enumerate(jobs)],
                window_bytes=self.window_bytes if pipelined else None)
        self.seconds += self.clock() - start
        self.reads += sum(len(reads) for _, _, reads in jobs)
        failed = {src.ref.worker_id for (src, _, _), e in zip(jobs, errors) if e is not None}
        # A destination is complete when every slice of it came from a seed whose reads all succeeded
        # (or when it was read whole by one read that landed and was verified).
        servers: dict[Destination, list[_Source]] = {}
        for src, slices, _ in jobs:
            for p in slices:
                servers.setdefault(p.dest, []).append(src)
        complete = [d for d in self.pending if d in checked or (
            d in servers and not any(s.ref.worker_id in failed for s in servers[d]))]
        # A tensor striped over several seeds is checked against a digest every one of them published;
        # seeds that disagree on it are all refused (no one can tell which is right).
        expected: dict[str, str] = {}
        disputed: set[str] = set()
        for d in complete:
            if d in checked:
                continue
            for name in d.names:
                published = {s.expected.get(name, "") for s in servers[d]}
                if len(published) > 1:
                    disputed.add(name)
                elif published != {""}:
                    expected[name] = published.pop()
        verify_start = self.clock()
        differing = set(self.verifier(expected)) if expected and self.verifier else set()
        differing |= disputed
        self.verify_seconds += self.clock() - verify_start
        for dest_differing in checked.values():
            differing |= dest_differing
        self.verified += sum(1 for d in complete for name in d.names  # tensors (a chunk's whole is checked below)
                             if name in servers[d][0].expected and name not in differing and parse_unit(name) is None)
        good = {d for d in complete if not differing.intersection(d.names)}
        self.verified_bytes += sum(d.size for d in good if any(n in servers[d][0].expected for n in d.names))
        metrics().pulled(sum(d.size for d in good))
        for d in good:
            src = servers[d][0]
            self.digests.update((name, src.expected[name]) for name in d.names if name in src.expected)
            for name in d.names:  # verified whole: its seed's chunk digests pass on with it (a cascade's manifest)
                if name in src.chunks and name in src.expected and name not in self.units_left:
                    self.digests.update((unit, digest) for unit, _, _, digest
                                        in chunk_units(name, self._size[name], *src.chunks[name]))
            if self.on_final is not None and d not in checked:
                self.on_final(d, {name: expected[name] for name in d.names if name in expected})
        self._check_wholes(good)
        wrong: dict[str, set[str]] = {}
        for d in complete:
            for src in servers[d]:
                if differing.intersection(d.names):
                    wrong.setdefault(src.ref.worker_id, set()).update(differing.intersection(d.names))
        for (src, slices, _), error in zip(jobs, errors):
            if error is not None:
                self._fail(src.ref, error)
            elif src.ref.worker_id in wrong:
                names = wrong[src.ref.worker_id]
                why = ("another seed striped with it publishes other digests for the same tensors"
                       if names <= disputed else "bytes pulled do not match the seed's published digests")
                metrics().digest_failed()
                self._fail(src.ref, VerificationError(why, seed=src.label, tensors=sorted(names)))
            ok = sum(p.length for p in slices if p.dest in good)
            if ok:
                self.served[src.ref.worker_id] = self.served.get(src.ref.worker_id, 0) + ok
        self.pending = [d for d in self.pending if d not in good]
        if progress is not None:
            progress.settle(kept=self.total_bytes - sum(d.size for d in self.pending),
                            verified_bytes=self.verified_bytes, checks=self.verified, by_seed=self.served)
            progress.tick()
        return True

    def _check_wholes(self, good: set[Destination]) -> None:
        """Check each chunked tensor whose last chunk was just kept against its whole digest. Its chunks
        all matched, so a difference means the seed's chunk and whole digests disagree; its chunks may be
        served on already and are never written again, so the pull fails (VerificationError)."""
        whole = []
        for d in good:
            for unit in filter(None, map(parse_unit, d.names)):
                if unit[0] in self.units_left:
                    self.units_left[unit[0]] -= 1
                    if not self.units_left[unit[0]]:
                        whole.append(unit[0])
        if not whole or self.verifier is None:
            return
        expected = {name: self.wholes[name] for name in whole}
        begin = self.clock()
        differing = list(self.verifier(expected))
        self.verify_seconds += self.clock() - begin
        if differing:
            metrics().digest_failed()
            raise VerificationError("every chunk matched its digest but the whole tensor does not match the seed's "
                                    "digest: the seed publishes chunk and whole digests that disagree",
                                    seed=self.chunk_seed, tensors=differing)
        self.digests.update(expected)
        self.verified += len(expected)
        if self.progress is not None:
            self.progress.verified(0, len(expected))

    def _fail(self, ref: SourceRef, error: Exception) -> None:
        log.warning("seed %s unusable: %s", ref.worker_id, error)
        self.failures.append(CandidateFailure(label(ref), str(error)))
        self.bad.add(ref.worker_id)
        for src in [s for s in self.sources if s.ref.worker_id == ref.worker_id]:
            self.sources.remove(src)
            _let_go(src)

    def drop_all(self) -> None:
        """Release every lease and forget the sources (they are asked again after the next listing)."""
        for src in self.sources:
            _let_go(src)
        self.sources = []

    def report(self) -> PullReport:
        return build_report(
            mx_source_id=self.mx_source_id, served=self.served, sessions=self.sessions, failed=self.bad,
            tensors=len(self.tensors), bytes=self.total_bytes, reads=self.reads, seconds=self.seconds,
            verified=self.verified, verify_seconds=self.verify_seconds, metadata_seconds=self.metadata_seconds,
            failures=tuple(self.failures), rounds=self.rounds, digests=dict(self.digests),
        )


FEED_WAIT_S = 0.2
"""How long a pipelined round's reader, with nothing in flight, waits for its partial seed to verify
more before the round ends (the pull then waits on its parents, and ticks, between rounds)."""


class _Feed:
    """A pipelined round's further reads from one source (`MooncakeEngine.read(more=...)`): the
    pending destinations its seed has verified since the round began, claimed whole, in address
    order, about a window's bytes at a time, so the link never drains between rounds while a
    parent keeps verifying. `slices`, `reads` and `by_read` are the round's lists for this source,
    extended in place (the engine indexes its reads in the same order)."""

    def __init__(self, src: _Source, slices: list[Slice], reads: list[Read], by_read: list[list[Destination]],
                 pending: Sequence[Destination], claimed: set[Destination], lock: threading.Lock,
                 window_bytes: int | None) -> None:
        self.src = src
        self.slices, self.reads, self.by_read = slices, reads, by_read
        self.waiting = [d for d in pending if d not in claimed]  # not yet read by anyone this round
        self.claimed = claimed
        self.lock = lock
        self.budget = window_bytes or 1
        self.seen = src.watch.version if src.watch is not None else None
        self.held = True  # some of `waiting` may be verified already: look before waiting

    def __call__(self, idle: bool, room: int | None = None, may_wait: bool = False) -> list[Read]:
        watch = self.src.watch
        if watch is None or watch.broken or not self.waiting:
            return []
        if watch.version == self.seen and not self.held and not (may_wait and watch.wait(self.seen, FEED_WAIT_S)):
            return []  # nothing verified since we last looked
        self.seen = watch.version
        holds = watch.holder()
        taken: list[Destination] = []
        held = False
        budget = self.budget if room is None else room
        with self.lock:
            size = 0
            keep: list[Destination] = []
            for d in self.waiting:
                if d in self.claimed:
                    continue
                if not holds(d.names):
                    keep.append(d)
                elif size + d.size <= budget or idle and not taken:
                    self.claimed.add(d)
                    taken.append(d)
                    size += d.size
                else:
                    keep.append(d)
                    held = True  # verified, but no room for it yet
            self.waiting = keep
        self.held = held
        slices = [Slice(d, 0, d.size) for d in taken]
        reads = reads_for(slices, self.src.remote_addr, merge=False)  # one per destination, in address order
        self.slices.extend(slices)
        self.reads.extend(reads)
        self.by_read.extend([d] for d in taken)
        return reads


def _let_go(src: _Source) -> None:
    if src.watch is not None:
        src.watch.close()
    if src.lease is not None:
        src.lease.release()


def _watch(record, lease: ReadLease | None) -> VerifiedWatch:
    """The stream of a partial seed's verified tensors; NoSourceError when it gives no lease to watch with."""
    if lease is None:
        raise NoSourceError(f"partial seed {record.label} granted no reader lease (no endpoint, or unreachable): "
                            "its verified tensors cannot be watched")
    return VerifiedWatch(record.endpoint, record.ref.mx_source_id, record.ref.worker_id, lease.lease_id,
                         [name for name, _, _ in units(record.tensors)])


def _whole_by_read(slices: Sequence[Slice], reads: Sequence[Read]) -> list[list[Destination]]:
    """For each read (sorted by local address, as `reads_for` makes them), the destinations it holds whole."""
    starts = [r.local_addr for r in reads]
    out: list[list[Destination]] = [[] for _ in reads]
    for p in slices:
        if p.offset != 0 or p.length != p.dest.size:
            continue  # a destination cut between stripes is verified after the round
        index = bisect.bisect_right(starts, p.dest.addr) - 1
        if index >= 0 and p.dest.addr + p.dest.size <= reads[index].local_addr + reads[index].length:
            out[index].append(p.dest)
    return out


Job = tuple  # (session, reads, prepare, on_done[, more])


def read_all(engine: MooncakeEngine, jobs: Sequence[Job], *,
             window_bytes: int | None = None) -> list[TransferError | None]:
    """Run each (session, reads, prepare, on_done[, more]) job, in parallel threads when there are
    several; one error (or None) each. Every read of every job has ended when this returns.
    `window_bytes`: each job's bytes in flight; `more`: its further reads (MooncakeEngine.read)."""
    errors: list[TransferError | None] = [None] * len(jobs)

    raised: list[BaseException] = []

    def run(i: int) -> None:
        session, reads, prepare, on_done, *rest = jobs[i]
        more = {"more": rest[0]} if rest and rest[0] is not None else {}  # (test fakes of the engine take none)
        try:
            engine.read(session, reads, prepare=prepare, on_done=on_done, window_bytes=window_bytes, **more)
        except TransferError as e:
            errors[i] = e
        except BaseException as e:  # a verifier or prepare that raised: re-raised once all reads ended
            raised.append(e)

    if len(jobs) == 1:
        run(0)
    else:
        threads = [threading.Thread(target=run, args=(i,), name=f"mx-stripe-{i}") for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if raised:
        raise raised[0]
    return errors
