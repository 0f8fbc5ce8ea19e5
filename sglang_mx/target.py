"""Target side: find a READY seed of our identity and rank, and pull from it.

`pull_weights` is the whole policy (wait, try candidates newest first, give up
within bounds); `pull_into` is what an SGLang rank calls with its config.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import threading
import time
from typing import Callable, Mapping, Sequence, TypeVar

import torch

from sglang_mx import leases
from sglang_mx.choice import order_candidates
from sglang_mx.client import MetadataClient
from sglang_mx.config import MxConfig
from sglang_mx.digest import mismatches
from sglang_mx.errors import (CandidateFailure, LayoutMismatchError, MxError, NoSourceError, TransferError,
                              VerificationError)
from sglang_mx.identity import RankInfo, describe_identity, identity_for, mx_source_id
from sglang_mx.records import SourceIdentity, SourceRef, SourceStatus, TensorDescriptor
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.stripes import Destination, destinations, reads_for, split, stripe_count
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
    max_seeds: int = 1  # seeds read from at once, each a stripe of the bytes
    # Equally loaded seeds in random order (spread targets over them), or in the server's (newest first).
    spread: bool = True
    rng: random.Random | None = dataclasses.field(default=None, compare=False)
    lease_timeout_s: float = 2.0  # deadline of a PrepareTensorRead

    @classmethod
    def from_config(cls, config: MxConfig) -> "PullOptions":
        return cls(wait_timeout_s=config.wait_timeout_s, max_candidates=config.max_candidates, verify=config.verify,
                   max_seeds=config.max_seeds)


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
    seconds: float  # the transfer alone
    verified: int = 0  # tensors whose bytes were checked against the seed's digests
    verify_seconds: float = 0.0
    failures: tuple[CandidateFailure, ...] = ()  # seeds that failed along the way
    served: Mapping[str, int] = dataclasses.field(default_factory=dict)  # worker id -> verified bytes it served
    rounds: int = 0  # striped rounds (1 unless a seed failed mid-pull)

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
) -> PullReport:
    """Fill `tensors` (our memory) from READY seeds of the same identity and rank.

    Candidates are taken least-loaded first (sglang_mx.choice), up to
    `options.max_seeds` at once, each read under a reader lease when the seed
    offers one (a busy seed is skipped, and waited for when all are busy). The
    bytes still missing are cut into stripes balanced by bytes, one per seed
    (sglang_mx.stripes), read in parallel. A seed that does not match, fails to
    transfer, or serves bytes that fail their digest is recorded and never asked
    again; only the tensors it left unfinished or wrong are read again, from the
    others. Raises NoSourceError listing every attempt when the tensors cannot be
    completed within the wait time or the candidate cap. When it raises, the
    destination memory may hold partial data. `clock` and `sleep` go together: a
    test passes a fake pair to run the waiting at once.

    `verifier` checks our tensors against the seeds' published digests after each
    round (`options.verify` decides what a seed without digests means). Without a
    verifier (`verify: off`) nothing is checked.
    """
    source_id = mx_source_id(identity)
    deadline = clock() + options.wait_timeout_s
    pull = _Pull(tensors, verify=options.verify if verifier else "off", verifier=verifier, clock=clock)
    regions = engine.register((t.addr, t.size) for t in tensors)
    try:
        while True:
            refs = client.list_sources(identity, status=SourceStatus.READY, worker_rank=worker_rank)
            queue = [r for r in order_candidates(refs, rng=options.rng, spread=options.spread)
                     if r.worker_id not in pull.bad]
            busy = False
            while not pull.done and len(pull.bad) < options.max_candidates:
                while queue and len(pull.sources) < options.max_seeds and len(pull.bad) < options.max_candidates:
                    busy |= pull.add(client, queue.pop(0), options.lease_timeout_s)
                if not pull.sources:
                    break
                pull.round(engine)
            if pull.done:
                return pull.report()
            pull.drop_all()  # leases are not held while we wait
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
            sleep(min(options.poll_interval_s, max(deadline - clock(), 0.0)))
    finally:
        pull.drop_all()
        engine.unregister(regions)


@dataclasses.dataclass
class _Source:
    """A seed taken for this pull: its record, what our tensors read from it, its lease."""

    ref: SourceRef
    session: str
    label: str
    remote_addr: dict[str, int]
    expected: dict[str, str]  # name -> digest our bytes must have (per the verify mode)
    lease: leases.ReadLease | None


class _Pull:
    """One striped pull: the destinations still missing, the seeds in use, the seeds that failed."""

    def __init__(self, tensors: Sequence[TensorDescriptor], *, verify: str, verifier: Verifier | None,
                 clock: Callable[[], float]) -> None:
        self.tensors = tensors
        self.verify = verify
        self.verifier = verifier
        self.clock = clock
        self.pending = destinations(tensors)
        self.total_bytes = sum(d.size for d in self.pending)
        self.checked = False  # some seed's layout matched (a model with no bytes needs that much)
        self.sources: list[_Source] = []
        self.bad: set[str] = set()
        self.failures: list[CandidateFailure] = []
        self.served: dict[str, int] = {}  # worker id -> bytes it served that passed
        self.sessions: dict[str, str] = {}
        self.mx_source_id = ""
        self.reads = self.verified = self.rounds = 0
        self.seconds = self.verify_seconds = 0.0

    @property
    def done(self) -> bool:
        return self.checked and not self.pending

    def add(self, client: MetadataClient, ref: SourceRef, lease_timeout_s: float) -> bool:
        """Take `ref` as a source; True when it was busy (at max_readers) and is left for later."""
        try:
            stored = client.get_metadata(ref.mx_source_id, ref.worker_id)
            if stored is None:
                raise NoSourceError(f"worker {ref.worker_id} vanished from the server before GetMetadata")
            session = stored.worker.transfer_engine_session_id
            if not session:
                raise NoSourceError(f"worker {ref.worker_id} publishes no transfer_engine_session_id (NIXL seed?)")
            label = f"{ref.worker_id}@{session}"
            build_plan(self.tensors, stored.worker.tensors, seed=label)  # the layouts must agree exactly
            expected = _expected_digests(self.tensors, stored.worker.tensors, self.verify, label)
            lease = leases.acquire(stored.worker.worker_grpc_endpoint, ref.mx_source_id, ref.worker_id,
                                   timeout_s=lease_timeout_s)
        except leases.SeedBusyError as e:
            log.info("%s", e)
            return True
        except (LayoutMismatchError, NoSourceError, VerificationError) as e:
            self._fail(ref, e)
            return False
        self.checked = True
        self.mx_source_id = ref.mx_source_id
        self.sessions[ref.worker_id] = session
        self.sources.append(_Source(ref, session, label, {t.name: t.addr for t in stored.worker.tensors},
                                    expected, lease))
        return False

    def round(self, engine: MooncakeEngine) -> None:
        """Read the pending bytes striped over the sources; keep what completed and verified."""
        self.rounds += 1
        sources = self.sources[: stripe_count(sum(d.size for d in self.pending), len(self.sources))]
        stripes = split(self.pending, len(sources))
        jobs = [(src, pieces, reads_for(pieces, src.remote_addr)) for src, pieces in zip(sources, stripes) if pieces]
        for src, pieces, reads in jobs:
            log.info("pulling %d bytes in %d reads from %s", sum(p.length for p in pieces), len(reads), src.label)
        start = self.clock()
        errors = _read_all(engine, [(src.session, reads) for src, _, reads in jobs])
        self.seconds += self.clock() - start
        self.reads += sum(len(reads) for _, _, reads in jobs)
        failed = {src.ref.worker_id for (src, _, _), e in zip(jobs, errors) if e is not None}
        # A destination is complete when every piece of it came from a seed whose reads all succeeded.
        servers: dict[Destination, list[_Source]] = {}
        for src, pieces, _ in jobs:
            for p in pieces:
                servers.setdefault(p.dest, []).append(src)
        complete = [d for d in self.pending if d in servers and
                    not any(s.ref.worker_id in failed for s in servers[d])]
        expected = {name: servers[d][0].expected[name] for d in complete for name in d.names
                    if name in servers[d][0].expected}
        verify_start = self.clock()
        differing = set(self.verifier(expected)) if expected and self.verifier else set()
        self.verify_seconds += self.clock() - verify_start
        self.verified += len(expected) - len(differing & set(expected))
        good = {d for d in complete if not differing.intersection(d.names)}
        wrong: dict[str, set[str]] = {}
        for d in complete:
            for src in servers[d]:
                if differing.intersection(d.names):
                    wrong.setdefault(src.ref.worker_id, set()).update(differing.intersection(d.names))
        for (src, pieces, _), error in zip(jobs, errors):
            if error is not None:
                self._fail(src.ref, error)
            elif src.ref.worker_id in wrong:
                self._fail(src.ref, VerificationError("bytes pulled do not match the seed's published digests",
                                                      seed=src.label, tensors=sorted(wrong[src.ref.worker_id])))
            ok = sum(p.length for p in pieces if p.dest in good)
            if ok:
                self.served[src.ref.worker_id] = self.served.get(src.ref.worker_id, 0) + ok
        self.pending = [d for d in self.pending if d not in good]

    def _fail(self, ref: SourceRef, error: Exception) -> None:
        log.warning("seed %s unusable: %s", ref.worker_id, error)
        self.failures.append(CandidateFailure(_label(ref), str(error)))
        self.bad.add(ref.worker_id)
        for src in [s for s in self.sources if s.ref.worker_id == ref.worker_id]:
            self.sources.remove(src)
            if src.lease is not None:
                src.lease.release()

    def drop_all(self) -> None:
        """Release every lease and forget the sources (they are asked again after the next listing)."""
        for src in self.sources:
            if src.lease is not None:
                src.lease.release()
        self.sources = []

    def report(self) -> PullReport:
        # The seed named is the one that served most of the bytes among those that never failed.
        ranked = sorted(self.served, key=lambda w: (w not in self.bad, self.served[w]), reverse=True)
        main = ranked[0] if ranked else next(iter(self.sessions), "")
        return PullReport(
            mx_source_id=self.mx_source_id,
            seed_worker_id=main,
            seed_session_id=self.sessions.get(main, ""),
            tensors=len(self.tensors),
            bytes=self.total_bytes,
            reads=self.reads,
            seconds=self.seconds,
            verified=self.verified,
            verify_seconds=self.verify_seconds,
            failures=tuple(self.failures),
            served=dict(self.served),
            rounds=self.rounds,
        )


def _read_all(engine: MooncakeEngine, jobs: Sequence[tuple[str, Sequence[Read]]]) -> list[TransferError | None]:
    """Run each (session, reads) job, in parallel threads when there are several; one error (or None) each."""
    errors: list[TransferError | None] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            engine.read(*jobs[i])
        except TransferError as e:
            errors[i] = e

    if len(jobs) == 1:
        run(0)
        return errors
    threads = [threading.Thread(target=run, args=(i,), name=f"mx-stripe-{i}") for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


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
    tensors: Mapping[str, torch.Tensor], engine: MooncakeEngine, info: RankInfo, config: MxConfig
) -> PullReport:
    """Fill `tensors` from a READY seed of this rank's identity, or raise NoSourceError."""
    identity = identity_for(info, config)
    log.info(
        "modelexpress: loading %d tensors of %r (rank %d) from a peer via %s",
        len(tensors), identity.model_name, info.worker_rank, config.url,
    )
    with MetadataClient.for_config(config) as client:
        report = pull_weights(client, engine, identity, worker_rank=info.worker_rank, tensors=describe(tensors),
                              options=PullOptions.from_config(config),
                              verifier=None if config.verify == "off" else digest_verifier(tensors))
    log.info(
        "modelexpress: pulled %d tensors, %.3f GB in %.3f s (%.2f GB/s) from %s (worker %s); "
        "%d verified in %.3f s",
        report.tensors, report.bytes / 1e9, report.seconds, report.gb_per_s,
        report.seed_session_id, report.seed_worker_id, report.verified, report.verify_seconds,
    )
    if len(report.served) > 1 or report.rounds > 1:
        log.info("modelexpress: striped over %d seed(s) in %d round(s): %s", len(report.served), report.rounds,
                 ", ".join(f"{worker} {n / 1e9:.3f} GB" for worker, n in report.served.items()))
    return report


M = TypeVar("M")


def load_with_fallback(build: Callable[[], M], pull: Callable[[M], M], from_disk: Callable[[], M], *,
                       fall_back: bool, what: str) -> M:
    """`pull(build())`, or, when no seed could serve (an MxError) and `fall_back` is set,
    `from_disk()` once the built model is gone.

    The built model is dropped, and the failure's traceback with it (it holds the
    frames that held the model's tensors), before the disk load allocates a second
    copy: on a GPU two copies of the weights would not fit for any model over half
    its memory. Without `fall_back` the error propagates.
    """
    model = build()
    try:
        return pull(model)
    except MxError as e:
        if not fall_back:
            raise
        reason = str(e)
    del model
    gc.collect()  # cycles through the dropped traceback's frames
    log.warning("modelexpress: no usable seed, loading %s from disk instead (fallback=disk): %s", what, reason)
    return from_disk()


def digest_verifier(tensors: Mapping[str, torch.Tensor]) -> Verifier:
    """Checks `tensors` against a seed's digests (on their own device; CUDA is synchronized first)."""
    return lambda expected: mismatches(tensors, expected)
