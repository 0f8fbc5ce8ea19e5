"""Time until N targets are all verified, and the metadata server's load: a discrete-event simulation
that runs the target's own decision code over simulated links and a simulated clock.

    PYTHONPATH=. .venv/bin/python benchmarks/fleet_sim.py --table
    PYTHONPATH=. .venv/bin/python benchmarks/fleet_sim.py --rate-mb-s 25 --size-mb 64 --tensors 64 --targets 16
    PYTHONPATH=. .venv/bin/python benchmarks/fleet_sim.py --emulated-json run.json   # benchmarks/fleet.py --emulate

One seed (or `seeds`) and N targets of one rank start at t=0. Every host has a full-duplex NIC
(`nic_gb_s` each way); the reads in flight share the NICs max-min fairly (progressive filling,
recomputed whenever a read starts or ends), each connection optionally capped at `link_gb_s` (one
Mooncake stream). Nothing sleeps and no thread runs: events on a heap, deterministic for a `seed`.

What a target does is what `target.policy.pull_weights` does, step by step, and wherever the code
decides, the sim calls the code itself:

- listing and choosing: the READY seeds (and with the pipeline the partial seeds, `pipeline.is_partial`)
  as the server would list them, as real `SourceRef`s (topology `mx_pipeline`/`mx_depth`, `source_load`
  as last heartbeated), ordered by `choice.order_candidates` / `choice.order_parents`;
- each candidate in that order costs a GetMetadata and a lease call, and takes a lease from the seed's
  real `leases.ReaderLeases` (on the simulated clock); a busy seed is skipped; up to `max_seeds`;
- waiting: the real `waiting.SeedWaiter` says how (poll every `poll_interval_s`, or the metadata watch:
  the first wait returns at once, later ones on the next change), and the target lists again;
- rounds: the pending destinations (`stripes.destinations` of real `TensorDescriptor`s) are cut with
  `stripes.stripe_count`/`stripes.cut` over the sources (a pipelined pull: `stripes.assign` over what
  each partial parent has verified), read per `stripes.reads_for`; a round ends with its slowest
  stripe; the sources stay fixed until the pull ends, and so do the leases (dropped after the pull);
- a pipelined read keeps at most `PullOptions.window_bytes` in flight per seed (or two reads), each
  read verified as it lands, in the reading thread, once the next went out; a partial parent's verified
  tensors reach a child after `stream_s`, and join a round under way through `striped._Feed` itself
  (within the window's room, or one read when nothing is in flight); a round's reader with nothing in
  flight waits up to `striped.FEED_WAIT_S` for its parent's news, then the child waits between rounds;
- store-and-forward: a target becomes a READY seed after its pull (publish + READY), found by the
  waiting targets at their next listing; pipelined: it publishes itself as a partial seed at depth
  1 + its parent's once it has a source, and turns READY at the end (publish + READY).

Fixed costs are `Costs` (defaults from the code and from measurements named there). The metadata server's
load is counted per kind (ListSources, GetMetadata, PublishMetadata, UpdateStatus: READY, heartbeats on a
lease change at most every `load_report_gap_s` and every `heartbeat_interval_s`; WatchSources and the watch
events sent). A read of one seed's stripe that outlasts MooncakeEngine.read's deadline is flagged (the real
pull fails), as is a target that waited longer than `wait_timeout_s`; a round planned from bytes a parent has
not verified, or a stripe that loses bytes, raises PlanError (the real pull would fail its digests).

Approximations: a walk over the candidates takes its lease when it starts (its calls' time and count are
paid, but another walker cannot overtake it), and a seed that refused since its last release is counted as
refused without calling it again; a connection's reads move one after another (FIFO); `Fleet.per_group`
coarsens neighbouring tensors into groups for speed (each group pays its tensors' per-read gaps). Not
modelled: failures, lease renewals and expiry, CPU contention (the emulated runs share 2 cores), the
server's own queueing (its CPU is estimated from measured per-call costs instead), a network core slower
than the NICs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import heapq
import inspect
import json
import math
import random
import statistics
import sys
import threading
import time
import types
from typing import Callable, Sequence

from sglang_mx import chunks, leases, tree
from sglang_mx.config import DEFAULTS
from sglang_mx.records import (TOPOLOGY_DEPTH, TOPOLOGY_LEASES, TOPOLOGY_MAX_READERS, TOPOLOGY_PIPELINE, SourceEvent,
                               SourceRef, SourceStatus, TensorDescriptor)
from sglang_mx.seed import SeedOptions, SeedPublisher
from sglang_mx.target import choice, striped, stripes, waiting
from sglang_mx.target.pipeline import is_partial
from sglang_mx.target.policy import PullOptions
from sglang_mx.transfer.engine import POLL_S

MX_ID = "sim"
RANKS_PER_NODE = 8
LEASE_TTL_S = 1e12  # renewals are not simulated: a lease lives until released
# MooncakeEngine.read's default deadline for one call (one source's reads of a round): 30 s + 1 ns per byte.
READ_BUDGET_S, READ_BUDGET_S_PER_BYTE = 30.0, 1e-9
# Server CPU per call: README (metadata_load.py: memory store, 10,000-tensor records) and, per watch event
# delivered, server/watch.py's docstring (metadata_load.py --modes watch: 8,000 watches on one core).
SERVER_CPU_S = {"ListSources": 0.60e-3, "GetMetadata": 0.85e-3, "watch events": 0.05e-3}
KINDS = ("ListSources", "GetMetadata", "PublishMetadata", "UpdateStatus", "WatchSources", "watch events")


class Mode(enum.Enum):
    ALONE = "alone"
    ONE_SEED = "one-seed"
    STORE_AND_FORWARD = "store-and-forward"
    PIPELINED = "pipelined"


def _default(cls, name: str):
    return inspect.signature(cls.__init__).parameters[name].default


@dataclasses.dataclass(frozen=True, kw_only=True)
class Costs:
    """Fixed costs, seconds unless named otherwise."""

    rpc_s: float = 0.002  # one metadata-server call (metadata_load.py: ListSources p50 1.6 ms under load)
    lease_s: float = 0.003  # PrepareTensorRead/ReleaseTensorRead at a seed, a new gRPC channel each (assumed)
    handshake_s: float = 0.005  # the first read from a seed's Mooncake session (assumed)
    read_rtt_s: float = 1e-4  # a read submitted -> its first byte moves (assumed)
    poll_gap_s: float = POLL_S / 2  # the engine notices a landed read after its poll sleep, on average
    digest_gb_s: float = 21.0  # verification, one thread (README: xxh3-64 on one CPU core)
    register_s_per_gb: float = 0.0  # README: 0.00 s for 0.98 GB on tcp; RDMA not measured
    stream_s: float = 0.001  # a partial seed's verified update reaching its child (WatchVerified; assumed)
    event_s: float = 0.045  # a change reaching the watches (server/watch.py: p50 with 8,000 watches)
    serve_s: float = 0.01  # a target starting to serve (SeedPublisher.start: lease endpoint; assumed)
    rehash_on_publish: bool = False  # the new seed hashes its weights again (fleet.py's store-and-forward does)
    payload: float = 1.0  # payload share of a NIC's rate (netem over TCP: 0.96)

    def verify_s(self, nbytes: int) -> float:
        return nbytes / (self.digest_gb_s * 1e9) if self.digest_gb_s else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fleet:
    """One rank's fleet: `seeds` READY seeds and `targets` targets of the same rank, all started at t=0."""

    mode: Mode
    targets: int
    sizes: tuple[int, ...]  # bytes of each tensor of the rank (or of each group of `per_group` tensors)
    nic_gb_s: float  # every host's NIC, each way, GB/s
    per_group: tuple[int, ...] = ()  # tensors each entry of `sizes` stands for (coarsened); () all 1
    link_gb_s: float | None = None  # one connection's cap (a Mooncake stream); None: only the NICs limit
    seed_nic_gb_s: tuple[float, ...] = ()  # the first seeds' NICs, when they differ
    max_readers: int = 0  # every publisher's reader-lease cap (0: no cap)
    seeds: int = 1
    options: PullOptions = PullOptions()  # poll_interval_s, watch, max_seeds, spread, window_bytes
    heartbeat_s: float = SeedOptions().heartbeat_interval_s
    report_gap_s: float = _default(SeedPublisher, "load_report_gap_s")
    wait_timeout_s: float = DEFAULTS.wait_timeout_s  # a target waiting longer would have given up (flagged)
    horizon_s: float = 86400.0  # simulated time after which a run that has not ended raises Stalled
    costs: Costs = Costs()
    seed: int = 0

    @property
    def pipelined(self) -> bool:
        return self.mode is Mode.PIPELINED

    @property
    def cascade(self) -> bool:
        return self.mode in (Mode.STORE_AND_FORWARD, Mode.PIPELINED)


# --- events and links ------------------------------------------------------------------------------

class _Loop:
    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._heap: list = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn, args))
        self._seq += 1

    def after(self, dt: float, fn: Callable, *args) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, until: Callable[[], bool]) -> None:
        still = 0  # events in a row at one instant
        while self._heap and not until():
            t, _, fn, args = heapq.heappop(self._heap)
            still = still + 1 if t == self.now else 0
            if still > 1_000_000:
                raise Stalled(f"a million events at {t:.6f} s without time passing (the last: {fn.__qualname__})")
            self.now = t
            self.events += 1
            fn(*args)


class _Flow:
    """One connection (source host -> target host): its reads move one after another."""

    __slots__ = ("out", "inn", "reads", "left", "rate", "at", "token", "serial")

    def __init__(self, src: str, dst: str, serial: int) -> None:
        self.out, self.inn = ("out", src), ("in", dst)
        self.serial = serial  # the order events are scheduled in, for equal times: deterministic
        self.reads: collections.deque = collections.deque()
        self.left = self.rate = self.at = 0.0
        self.token = 0


class _Network:
    """Full-duplex NICs shared max-min fairly by the connections moving bytes."""

    def __init__(self, loop: _Loop, nic_Bps: Callable[[str], float], cap_Bps: float | None) -> None:
        self._loop = loop
        self._nic = nic_Bps
        self._cap = cap_Bps
        self._flows: dict[tuple[str, str], _Flow] = {}
        self._active: dict[tuple, set[_Flow]] = collections.defaultdict(set)
        self._changed: set[_Flow] = set()  # rates to compute again once this instant's events have run

    def read(self, src: str, dst: str, nbytes: int, on_land: Callable[[], None]) -> None:
        flow = self._flows.get((src, dst)) or self._flows.setdefault((src, dst), _Flow(src, dst, len(self._flows)))
        flow.reads.append((nbytes, on_land))
        if len(flow.reads) == 1:
            flow.left, flow.rate, flow.at = nbytes, 0.0, self._loop.now
            self._active[flow.out].add(flow)
            self._active[flow.inn].add(flow)
            self._touch([flow])

    def _land(self, flow: _Flow, token: int) -> None:
        if token != flow.token:
            return
        _, on_land = flow.reads.popleft()
        if flow.reads:  # the next read of the connection moves at the same rate
            flow.left, flow.at = flow.reads[0][0], self._loop.now
            self._schedule(flow)
        else:
            flow.token += 1
            self._active[flow.out].discard(flow)
            self._active[flow.inn].discard(flow)
            self._touch(self._active[flow.out] | self._active[flow.inn])
        on_land()

    def _schedule(self, flow: _Flow) -> None:
        flow.token += 1
        if flow.rate > 0:
            self._loop.after(max(flow.left, 0.0) / flow.rate, self._land, flow, flow.token)

    def _touch(self, flows) -> None:
        """Rates change: computed once after every event of this instant (1,000 flows starting together
        cost one filling, not 1,000)."""
        if flows and not self._changed:
            self._loop.after(0.0, self._refill)
        self._changed.update(flows)

    def _refill(self) -> None:
        """Progressive filling over the connections that share a NIC side with a changed one, transitively."""
        comp: set[_Flow] = set()
        stack = [f for f in self._changed if f.reads]
        self._changed = set()
        while stack:
            f = stack.pop()
            if f not in comp:
                comp.add(f)
                stack += [g for r in (f.out, f.inn) for g in self._active[r] if g not in comp]
        if not comp:
            return
        now = self._loop.now
        for f in comp:
            f.left -= f.rate * (now - f.at)
            f.at = now
        room = {r: self._nic(r) for f in comp for r in (f.out, f.inn)}
        count = collections.Counter(r for f in comp for r in (f.out, f.inn))
        unfrozen = set(comp)
        while unfrozen:
            level = max(min(room[r] / n for r, n in count.items() if n), 0.0)
            if self._cap is not None:
                level = min(level, self._cap)
            full = {r for r, n in count.items() if n and room[r] / n <= level * (1 + 1e-12)}
            done = unfrozen if self._cap is not None and self._cap <= level else \
                {f for f in unfrozen if f.out in full or f.inn in full}
            for f in done:
                f.rate = level
                for r in (f.out, f.inn):
                    room[r] -= level
                    count[r] -= 1
            unfrozen -= done
        for f in sorted(comp, key=lambda f: f.serial):
            self._schedule(f)


# --- the metadata server and its publishers --------------------------------------------------------

class _Load:
    """What the metadata server answers (and sends), by kind, in one-second bins."""

    def __init__(self) -> None:
        self.bins: dict[str, dict[int, float]] = {k: collections.defaultdict(float) for k in KINDS}
        self.seed_calls = 0  # PrepareTensorRead/ReleaseTensorRead: at the seeds, not the server

    def add(self, kind: str, n: float, t0: float, t1: float | None = None) -> None:
        """`n` calls at `t0`, or spread evenly over [t0, t1)."""
        bins = self.bins[kind]
        if n <= 0:
            return
        if t1 is None or int(t1) == int(t0):
            bins[int(t0)] += n
            return
        rate = n / (t1 - t0)
        bins[int(t0)] += rate * (int(t0) + 1 - t0)
        for b in range(int(t0) + 1, int(t1)):
            bins[b] += rate
        bins[int(t1)] += rate * (t1 - int(t1))

    def summary(self, end_s: float, ranks: int = 1) -> dict[str, tuple[float, float, float]]:
        """kind -> (calls in all, mean per second, the busiest second), times `ranks` rank fleets."""
        out = {}
        for kind, bins in self.bins.items():
            total = sum(bins.values())
            out[kind] = (total * ranks, total * ranks / max(end_s, 1e-9), max(bins.values(), default=0) * ranks)
        return out


class _Publisher:
    """A seed or a target serving as one: its reader leases (the real ReaderLeases), its record's state."""

    def __init__(self, sim: "_Sim", name: str, *, partial: bool, depth: int) -> None:
        self.sim, self.name, self.depth = sim, name, depth
        self.partial = partial
        self.status = SourceStatus.INITIALIZING if partial else SourceStatus.READY
        self.reported = 0.0  # source_load as last heartbeated
        self.leases = leases.ReaderLeases(max_readers=sim.fleet.max_readers, ttl_s=LEASE_TTL_S,
                                          clock=sim.loop.clock, on_change=self._leases_changed)
        self._active = 0
        self._beat_due = False
        self.beats_from = sim.loop.now
        self.verified_at: dict[str, float] = {}  # a partial seed: name -> when it was verified
        self.last_verified = -math.inf
        self.complete_at = -math.inf if not partial else math.inf
        self.waiters: list[Callable[[], None]] = []
        self._ref: SourceRef | None = None

    def ref(self) -> SourceRef:
        if self._ref is None:
            topology = {TOPOLOGY_PIPELINE: "1", TOPOLOGY_DEPTH: str(self.depth)} if self.partial else {}
            if self.sim.fleet.max_readers:  # SeedPublisher._record: the cap, for targets to skip a full seed
                topology[TOPOLOGY_MAX_READERS] = str(self.sim.fleet.max_readers)
            topology[TOPOLOGY_LEASES] = f"{self.name}:lease"  # ... and where to ask for a lease first
            self._ref = SourceRef(mx_source_id=MX_ID, worker_id=self.name, model_name="sim", worker_rank=0,
                                  status=self.status, updated_at_ms=int(self.sim.loop.now * 1000),
                                  topology=topology, source_load=self.reported)
        return self._ref

    def _leases_changed(self, active: int) -> None:
        if active < self._active:
            self.sim.server.open.add(self)  # a slot may be free again
        self._active = active
        if not self._beat_due:  # SeedPublisher: a heartbeat soon after a change, at most one per gap
            self._beat_due = True
            self.sim.loop.after(self.sim.fleet.report_gap_s, self._beat)

    def _beat(self) -> None:
        self._beat_due = False
        self.sim.load.add("UpdateStatus", 1, self.sim.loop.now)
        load = float(self.leases.active())
        if load != self.reported:
            self.reported = load
            self.sim.server.changed(self)

    def verified(self, names: Sequence[str]) -> None:
        now = self.sim.loop.now
        for name in names:
            self.verified_at[name] = now
        self.last_verified = now
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            self.sim.loop.after(self.sim.fleet.costs.stream_s, w)

    def holds(self) -> Callable[[stripes.Destination], bool]:
        """What a child sees this seed hold now, its updates `stream_s` late (VerifiedWatch.holder)."""
        now, late = self.sim.loop.now, self.sim.fleet.costs.stream_s
        if self.complete_at + late <= now:
            return lambda d: True
        times, inf = self.verified_at, math.inf

        def holds(d: stripes.Destination) -> bool:
            for n in d.names:
                if times.get(n, inf) + late > now:
                    return False
            return True
        return holds

    def ready(self) -> None:
        self.status, self.partial, self._ref = SourceStatus.READY, False, None
        self.sim.server.changed(self)


class _Server:
    """The records the metadata server lists; a change is sent to every open watch it could help (a waiting
    target's watch, server/watch.py: `tree.Waiting.useful`)."""

    def __init__(self, sim: "_Sim") -> None:
        self.sim = sim
        self.pubs: dict[str, _Publisher] = {}
        self.open: set[_Publisher] = set()  # publishers whose last lease call did not refuse
        self.watchers: dict["_Target", tree.Waiting | None] = {}  # in the order they opened (events go out in it)
        self._listing: tuple[list[SourceRef], list[SourceRef]] | None = None

    def publish(self, pub: _Publisher) -> None:
        self.pubs[pub.name] = pub
        self.open.add(pub)
        self.changed(pub)

    def changed(self, pub: _Publisher) -> None:
        pub._ref = None
        self._listing = None
        if self.watchers:
            ref = pub.ref()
            useful = tree.Useful(ref)
            told = [t for t, w in self.watchers.items() if useful(w)]
            if told:
                self.sim.load.add("watch events", len(told), self.sim.loop.now)
                self.sim.loop.after(self.sim.fleet.costs.event_s, self._deliver, told, ref)

    def _deliver(self, targets: list["_Target"], ref: SourceRef) -> None:
        for t in targets:
            t.event(ref)

    def listing(self) -> tuple[list[SourceRef], list[SourceRef]]:
        """(READY refs, partial refs), newest first as the server lists them."""
        if self._listing is None:
            pubs = list(reversed(self.pubs.values()))
            ready = [p.ref() for p in pubs if p.status == SourceStatus.READY]
            starting = [p.ref() for p in pubs if p.status == SourceStatus.INITIALIZING]
            self._listing = (ready, [r for r in starting if is_partial(r)])
        return self._listing


# --- a target ----------------------------------------------------------------------------------------

class _Probe:
    """The client and sleep a real SeedWaiter is given: they record what it asked for."""

    url = "sim"

    def __init__(self, target: "_Target") -> None:
        self.target = target
        self.asked: tuple[str, float] | None = None
        self.open = False
        self.pending = False  # a change arrived since the last wait
        self.snapshot_due = False

    def watch_sources(self, mx_source_id: str, worker_rank: int, waiting: tree.Waiting | None = None) -> "_Probe":
        self.open = True
        sim = self.target.sim
        sim.load.add("WatchSources", 1, sim.loop.now)
        sim.load.add("watch events", len(sim.server.pubs) + 1, sim.loop.now)  # the snapshot
        sim.server.watchers[self.target] = waiting
        self.snapshot_due = True  # SeedWaiter takes the snapshot at once (its first wait after opening)
        return self

    def wait(self, timeout_s: float) -> list:
        if self.snapshot_due:
            self.snapshot_due = False
            return [SourceEvent(ref=None, snapshot_end=True)]
        self.asked = ("event", timeout_s)
        return []

    def sleep(self, seconds: float) -> None:
        self.asked = ("sleep", seconds)

    def close(self) -> None:
        self.open = False
        self.target.sim.server.watchers.pop(self.target, None)


@dataclasses.dataclass
class _Source:
    pub: _Publisher
    lease: str
    partial: bool  # listed as a partial seed when taken: read as it verifies
    fresh: bool = True  # no read from it yet (the first pays the Mooncake handshake)

    @property
    def depth(self) -> int:
        return self.pub.depth if self.partial else 0


class _Target:
    def __init__(self, sim: "_Sim", index: int) -> None:
        self.sim = sim
        self.name = f"t{index}"
        self.rng = random.Random(f"{sim.fleet.seed}:{self.name}")
        self.pending = list(sim.dests)
        self.sources: list[_Source] = []
        self.queue: list[SourceRef] = []
        self.publisher: _Publisher | None = None
        self.state = "start"
        self.probe = _Probe(self)
        opts = sim.fleet.options
        self.waiter = waiting.SeedWaiter(self.probe, MX_ID, 0, poll_interval_s=opts.poll_interval_s,
                                         clock=sim.loop.clock, sleep=self.probe.sleep, use_watch=opts.watch,
                                         waiting=self._waiting)
        self.found = self.verified = self.returned = self.ready = math.nan
        self.rounds = self.walks = self.tries = self.timed_out = 0
        self.known: set[str] = set()  # seeds whose record this pull fetched (StripedPull.endpoints)
        self.late = False
        self._wait_token = 0
        self._jobs = 0
        self._round_slices: list[list[stripes.Slice]] = []
        self._post: list[stripes.Destination] = []

    # listing, choosing, waiting
    def start(self) -> None:
        c = self.sim.fleet.costs
        self.sim.loop.after(c.register_s_per_gb * self.sim.total_bytes / 1e9, self._list)

    def _list(self) -> None:
        self.state = "listing"
        calls = 2 if self.sim.fleet.pipelined else 1  # READY, then INITIALIZING partial seeds
        self.sim.load.add("ListSources", calls, self.sim.loop.now)
        self.sim.loop.after(calls * self.sim.fleet.costs.rpc_s, self._walk)

    def _walk(self) -> None:
        """pull_weights' inner loop over the listing, as of now: GetMetadata + lease per candidate tried."""
        sim, fleet = self.sim, self.sim.fleet
        self.state = "walking"
        self.walks += 1
        ready, partial = sim.server.listing()
        if not any(p is not self.publisher for p in sim.server.open):
            listed = ready + (partial if fleet.pipelined else [])  # all busy: each tried, refused
            fetched = sum(r.worker_id not in self.known and TOPOLOGY_LEASES not in r.topology for r in listed)
            tries, got, extra = (len(listed), fetched), [], 0.0
            self.known.update(r.worker_id for r in listed)
        else:
            if fleet.pipelined:
                own_depth = self.publisher.depth if self.publisher else None  # PipelineSeed.depth once attached
                order = choice.order_parents(ready, partial, own_depth=own_depth, own_worker=self.name, rng=self.rng,
                                             spread=fleet.options.spread)
            else:
                order = choice.order_candidates(ready, rng=self.rng, spread=fleet.options.spread)
            tries, got, self.queue, extra = self._take(order)
        dt = self._tried(tries) + extra
        if got:
            self.sources = got
            self.sim.loop.after(dt, self._start_pull)
        else:
            self.sim.loop.after(dt, self._wait)

    def _take(self, order: Sequence[SourceRef]) -> tuple[tuple[int, int], list[_Source], list[SourceRef], float]:
        """Candidates in `order` until `max_seeds` sources: ((tries, GetMetadata calls), new sources, the rest,
        stream opens' time). As StripedPull.add: a seed that lists its lease endpoint, or whose record this pull
        fetched before, is asked for its lease first, and its record fetched only when it grants one."""
        got: list[_Source] = []
        tries = fetched = 0
        extra = 0.0
        for i, ref in enumerate(order):
            if len(self.sources) + len(got) >= self.sim.fleet.options.max_seeds:
                return (tries, fetched), got, list(order[i:]), extra
            tries += 1
            known = ref.worker_id in self.known or TOPOLOGY_LEASES in ref.topology
            self.known.add(ref.worker_id)
            pub = self.sim.server.pubs[ref.worker_id]
            if pub not in self.sim.server.open:
                fetched += not known
                continue  # refused since its last release: its lease call is counted, not made
            lease = pub.leases.acquire()
            fetched += not known or lease is not None
            if lease is None:
                self.sim.server.open.discard(pub)
                continue
            got.append(_Source(pub, lease, partial=is_partial(ref)))
            if is_partial(ref):
                extra += self.sim.fleet.costs.lease_s  # the WatchVerified stream to it
        return (tries, fetched), got, [], extra

    def _tried(self, calls: tuple[int, int]) -> float:
        """Count a walk's calls; the time they take."""
        tries, fetched = calls
        now, c = self.sim.loop.now, self.sim.fleet.costs
        self.tries += tries
        took = fetched * c.rpc_s + tries * c.lease_s
        self.sim.load.add("GetMetadata", fetched, now, now + took)
        self.sim.load.seed_calls += tries
        return took

    def _wait(self) -> None:
        """No source: SeedWaiter.wait decides how long (poll) or until what (watch event)."""
        now = self.sim.loop.now
        if now - self.sim.t0 >= self.sim.fleet.wait_timeout_s:
            self.late = True  # pull_weights would have raised NoSourceError here
        self.probe.asked = None
        self.waiter.wait(math.inf)
        asked = self.probe.asked
        if asked is None:  # the watch just opened (once its first event came): list again
            self.state = "opening the watch"
            self.sim.loop.after(self.sim.fleet.costs.event_s, self._list)
        elif asked[0] == "sleep":
            self.state = "sleeping"
            self.sim.loop.after(asked[1], self._list)
        elif self.probe.pending:
            self.probe.pending = False
            self._list()
        else:
            self.state = "waiting"
            self._wait_token += 1
            self.sim.loop.after(asked[1], self._waited, self._wait_token)

    def _waiting(self) -> tree.Waiting:
        """What this target waits for, as pull_weights tells it (its depth once it is a partial seed)."""
        return tree.Waiting(self.sim.fleet.pipelined, self.publisher.depth if self.publisher else None, self.name)

    def event(self, ref: SourceRef) -> None:
        """A watch event: SeedWaiter.wait ends only on a record `tree.could_serve` accepts (as pull_weights
        asks it); the others are passed over."""
        if not self.probe.open:
            return
        if not self._waiting().useful(ref):
            return
        if self.state == "waiting":
            self._wait_token += 1
            self._list()
        else:
            self.probe.pending = True

    def _waited(self, token: int) -> None:
        if token == self._wait_token and self.state == "waiting":
            self._list()

    # the pull
    def _start_pull(self) -> None:
        sim = self.sim
        self.state = "pulling"
        if math.isnan(self.found):
            self.found = sim.loop.now
        if sim.fleet.pipelined and self.publisher is None:  # PipelineSeed.attach: a partial seed at its depth
            self.publisher = _Publisher(sim, self.name, partial=True, depth=1 + max(s.depth for s in self.sources))
            sim.load.add("PublishMetadata", 1, sim.loop.now + sim.fleet.costs.serve_s)
            sim.loop.after(sim.fleet.costs.serve_s + sim.fleet.costs.rpc_s, self._attached)
        else:
            self._round()

    def _attached(self) -> None:
        self.sim.server.publish(self.publisher)
        self._round()

    def _round(self) -> None:
        """StripedPull.round: the pending destinations over the sources; False (wait) when none holds any."""
        sim, fleet = self.sim, self.sim.fleet
        if self.queue and len(self.sources) < fleet.options.max_seeds:  # the inner loop adds from the queue
            tries, got, self.queue, extra = self._take(self.queue)
            took = self._tried(tries)
            self.sources += got
            if tries[0]:
                sim.loop.after(took + extra, self._round)
                return
        if fleet.pipelined:
            has = [s.pub.holds() if s.partial else (lambda d: True) for s in self.sources]
            plan = stripes.assign(self.pending, has)
        else:
            n = stripes.stripe_count(sum(d.size for d in self.pending), len(self.sources))
            plan = stripes.cut(self.pending, n)
        holders = has if fleet.pipelined else [None] * len(plan)
        jobs = [(s, slices, h) for s, slices, h in zip(self.sources, plan, holders) if slices or fleet.pipelined]
        _check_round(jobs, self.pending)
        if not any(slices for _, slices, _ in jobs):
            self._wait_for_parents()
            return
        self.rounds += 1
        self._jobs = len(jobs)
        self._round_slices, self._post = [], []
        claimed, lock = {p.dest for _, slices, _ in jobs for p in slices}, threading.Lock()
        for src, slices, _ in jobs:
            reads = stripes.reads_for(slices, sim.addrs, merge=not fleet.pipelined)
            whole = striped._whole_by_read(slices, reads)
            feed = None
            if fleet.pipelined:  # striped._Feed itself: what the parent verifies during the round joins it
                view = types.SimpleNamespace(watch=_SeenWatch(src.pub, sim) if src.partial else None,
                                             remote_addr=sim.addrs)
                feed = striped._Feed(view, slices, reads, whole, self.pending, claimed, lock,
                                     fleet.options.window_bytes)
            self._round_slices.append(slices)  # (a feed extends it)
            self._post += [p.dest for p in slices if p.offset or p.length != p.dest.size]
            _Job(self, src, reads, whole, feed).start(fleet.costs.handshake_s if src.fresh else 0.0)
            src.fresh = False

    def _wait_for_parents(self) -> None:
        self.state = "waiting for parents"
        token = self._wait_token = self._wait_token + 1
        wake = lambda: self._parent_news(token)  # noqa: E731
        late = self.sim.fleet.costs.stream_s
        for s in self.sources:
            if s.partial:
                if s.pub.last_verified + late > self.sim.loop.now:  # already on its way to us
                    self.sim.loop.at(s.pub.last_verified + late, wake)
                else:
                    s.pub.waiters.append(wake)

    def _parent_news(self, token: int) -> None:
        if token == self._wait_token:  # the first news since we began to wait
            self._wait_token += 1
            self.state = "pulling"
            self._round()

    def final(self, dest: stripes.Destination) -> None:
        if self.publisher is not None:
            self.publisher.verified(dest.names)

    def job_done(self) -> None:
        self._jobs -= 1
        if self._jobs:
            return
        # Destinations cut between stripes are checked after the round, in the pulling thread.
        post = list(dict.fromkeys(self._post))
        self.sim.loop.after(self.sim.fleet.costs.verify_s(sum(d.size for d in post)), self._round_end, post)

    def _round_end(self, post: list) -> None:
        for d in post:
            self.final(d)
        done = {p.dest for slices in self._round_slices for p in slices}
        self.pending = [d for d in self.pending if d not in done]
        if self.pending:
            self._wait_token += 1
            self._round()
        else:
            self._finish()

    def _finish(self) -> None:
        """pull_weights' end: (pipelined) finish as a READY seed; then drop the leases; (store-and-forward)
        then start_seed: publish and mark READY."""
        sim, c = self.sim, self.sim.fleet.costs
        self.verified = sim.loop.now
        self.state = "done"
        t = 0.0
        if sim.fleet.pipelined:
            sim.load.add("PublishMetadata", 1, sim.loop.now)
            sim.load.add("UpdateStatus", 1, sim.loop.now + c.rpc_s)
            sim.loop.after(c.rpc_s, self._complete)
            sim.loop.after(2 * c.rpc_s, self._ready)
            t = 2 * c.rpc_s
        for src in self.sources:
            t += c.lease_s
            sim.load.seed_calls += 1
            sim.loop.after(t, src.pub.leases.release, src.lease)
        sim.loop.after(t, self._returned)
        if sim.fleet.mode is Mode.STORE_AND_FORWARD:
            t += (c.verify_s(sim.total_bytes) if c.rehash_on_publish else 0.0) + c.serve_s
            sim.load.add("PublishMetadata", 1, sim.loop.now + t)
            sim.load.add("UpdateStatus", 1, sim.loop.now + t + c.rpc_s)
            self.publisher = _Publisher(sim, self.name, partial=False, depth=0)
            sim.loop.after(t + 2 * c.rpc_s, self._published)

    def _complete(self) -> None:
        self.publisher.complete_at = self.sim.loop.now

    def _ready(self) -> None:
        self.publisher.ready()
        self.ready = self.sim.loop.now

    def _published(self) -> None:
        self.publisher.beats_from = self.sim.loop.now
        self.sim.server.publish(self.publisher)
        self.ready = self.sim.loop.now

    def _returned(self) -> None:
        self.waiter.close()  # the watch stays open until the pull ends
        self.returned = self.sim.loop.now
        self.sim.finished += 1


class Stalled(RuntimeError):
    """A run that did not end within `Fleet.horizon_s` (a policy that never finds a seed, for one)."""


class PlanError(RuntimeError):
    """A round's plan the real pull would fail on (bytes the simulated links cannot show as wrong)."""


def _check_round(jobs, pending) -> None:
    """Every destination planned is planned whole, and (pipelined) only from a source that holds it: else
    the real pull reads bytes that fail their digests. Raises PlanError naming the destination."""
    covered: collections.Counter = collections.Counter()
    for src, slices, holds in jobs:
        for p in slices:
            covered[p.dest] += p.length
            if holds is not None and not holds(p.dest):
                raise PlanError(f"{p.dest.names[0]} planned from {src.pub.name}, which has not verified it yet")
    short = [d for d in pending if d in covered and covered[d] != d.size]
    if short:
        raise PlanError(f"{short[0].names[0]}: {covered[short[0]]} of its {short[0].size} bytes planned")


class _SeenWatch:
    """A partial parent as `striped._Feed` sees it (VerifiedWatch): what it verified, `stream_s` late. Never
    blocks: a job that finds nothing new waits for the parent's news itself (`_Job._idle`)."""

    broken = ""

    def __init__(self, pub: _Publisher, sim: "_Sim") -> None:
        self.pub, self.sim = pub, sim

    @property
    def complete(self) -> bool:
        return self.pub.complete_at + self.sim.fleet.costs.stream_s <= self.sim.loop.now

    @property
    def version(self) -> float:
        return self.sim.loop.now  # news may have come at any event: the feed looks again each time

    def holder(self) -> Callable[[Sequence[str]], bool]:
        holds = self.pub.holds()
        return lambda names: holds(stripes.Destination(0, 0, tuple(names)))

    def wait(self, version, timeout_s: float) -> bool:
        return False


class _Job:
    """One source's reads of a round (MooncakeEngine.read): all submitted at once, or (pipelined) in order
    within the window or while fewer than two are in flight, the next submitted as one lands, before this
    thread verifies it; (pipelined) what the parent verifies meanwhile is fed in by `striped._Feed` (within
    the window's room, or one read when idle), and with nothing in flight the job waits up to
    `striped.FEED_WAIT_S` for the parent's news before it ends."""

    def __init__(self, target: _Target, src: _Source, reads: list, whole: list, feed=None) -> None:
        self.t, self.src, self.reads, self.whole, self.feed = target, src, reads, whole, feed
        sim = target.sim
        # A coarsened group stands for several reads: each pays its own gaps, and the window holds as
        # many groups as it would hold of their tensors.
        self.count = [self._count(w) for w in whole]
        self.window = sim.fleet.options.window_bytes * statistics.fmean(self.count or [1]) \
            if sim.fleet.pipelined else None
        self.next = self.in_flight = self.landed = self.checked = 0
        self.busy_until = 0.0
        self.deadline = math.inf
        self._news = 0  # token of the current wait for the parent's news
        self.ended = False

    def _count(self, whole: list) -> int:
        return max(1, sum(self.t.sim.per_group[d] for d in whole))

    def start(self, delay: float) -> None:
        sim = self.t.sim
        self.deadline = sim.loop.now + READ_BUDGET_S + READ_BUDGET_S_PER_BYTE * sum(r.length for r in self.reads)
        sim.loop.after(delay, self._submit)

    def _submit(self) -> None:
        self._fill()
        if self.next == self.checked == len(self.reads) and not self.ended:
            self._idle()

    def _fill(self) -> None:
        sim, c = self.t.sim, self.t.sim.fleet.costs
        while True:
            idle = self.next == self.landed  # nothing in flight
            if self.feed is not None and self.next == len(self.reads) and (idle or self.in_flight < self.window):
                self.feed(idle, max(int(self.window - self.in_flight), 0))
                self.count += [self._count(w) for w in self.whole[len(self.count):]]
            # MooncakeEngine.read: within the window, or while fewer than two reads are in flight.
            if not (self.next < len(self.reads) and (self.window is None or self.next - self.landed < 2 or
                                                     self.in_flight + self.reads[self.next].length <= self.window)):
                break
            i, read = self.next, self.reads[self.next]
            self.next += 1
            self.in_flight += read.length
            sim.loop.after(c.read_rtt_s * self.count[i], sim.net.read, self.src.pub.name, self.t.name, read.length,
                           lambda i=i: self._landed(i))

    def _idle(self) -> None:
        """Nothing in flight, nothing to verify, nothing fed: end, or (a partial parent) wait for its news
        first, as the feed does (a full seed's feed, or one with nothing left to wait for, ends at once)."""
        if self.feed is None or self.feed.src.watch is None or not self.feed.waiting:
            self._end()
            return
        sim = self.t.sim
        self._news += 1
        token = self._news
        sim.loop.after(striped.FEED_WAIT_S, self._no_news, token)
        pub, late = self.src.pub, sim.fleet.costs.stream_s
        if self.src.partial and pub.last_verified + late > sim.loop.now:
            sim.loop.at(pub.last_verified + late, self._parent_news, token)
        elif self.src.partial:
            pub.waiters.append(lambda: self._parent_news(token))

    def _parent_news(self, token: int) -> None:
        """The feed's wait returned: it looks once more, and the read ends if nothing of ours came."""
        if token == self._news and not self.ended:
            self._news += 1
            before = self.next
            self._fill()
            if self.next == before:
                self._end()

    def _no_news(self, token: int) -> None:
        if token == self._news and not self.ended:
            self._end()

    def _end(self) -> None:
        self.ended = True
        self.t.job_done()

    def _landed(self, i: int) -> None:
        sim, c = self.t.sim, self.t.sim.fleet.costs
        if sim.loop.now > self.deadline:
            self.t.timed_out += 1  # no piece landed for the whole deadline: the real read raises TransferError
        # The deadline counts from the last piece that landed (MooncakeEngine.read).
        self.deadline = sim.loop.now + READ_BUDGET_S + READ_BUDGET_S_PER_BYTE * sum(r.length for r in self.reads)
        self.landed += 1
        self.in_flight -= self.reads[i].length
        start = max(sim.loop.now + c.poll_gap_s * self.count[i], self.busy_until)
        self.busy_until = start + c.verify_s(sum(d.size for d in self.whole[i]))
        sim.loop.at(self.busy_until, self._checked, i)
        if self.window is not None:
            sim.loop.at(start, self._submit)  # noticed at the poll: the next goes before this one is verified

    def _checked(self, i: int) -> None:
        for d in self.whole[i]:
            self.t.final(d)
        self.checked += 1
        if self.window is not None:
            self._submit()
        elif self.checked == len(self.reads):
            self._end()


# --- one run ---------------------------------------------------------------------------------------

class _Sim:
    def __init__(self, fleet: Fleet) -> None:
        if fleet.targets < 1 or fleet.seeds < 1:
            raise ValueError(f"targets={fleet.targets}, seeds={fleet.seeds}: need at least one of each")
        self.fleet = fleet
        self.loop = _Loop()
        self.load = _Load()
        self.t0 = 0.0
        self.finished = 0
        per_group = fleet.per_group or (1,) * len(fleet.sizes)
        # Our tensors at fake addresses, a page apart (separate allocations: reads are not merged).
        tensors, addr = [], 1 << 30
        for i, size in enumerate(fleet.sizes):
            tensors.append(TensorDescriptor(name=f"w{i}", addr=addr, size=size))
            addr += size + 4096
        self.dests = stripes.destinations(tensors)
        self.addrs = {t.name: t.addr for t in tensors}  # every seed keeps them at the same addresses
        counts = {t.name: n for t, n in zip(tensors, per_group)}
        self.per_group = {d: sum(counts[n] for n in d.names) for d in self.dests}
        self.total_bytes = sum(d.size for d in self.dests)
        seed_nics = {f"s{i}": gb for i, gb in enumerate(fleet.seed_nic_gb_s)}

        def nic(resource: tuple) -> float:
            return seed_nics.get(resource[1], fleet.nic_gb_s) * 1e9 * fleet.costs.payload

        self.net = _Network(self.loop, nic, fleet.link_gb_s * 1e9 * fleet.costs.payload if fleet.link_gb_s else None)
        self.server = _Server(self)
        self.seeds = [_Publisher(self, f"s{i}", partial=False, depth=0) for i in range(fleet.seeds)]
        for s in self.seeds:
            self.server.publish(s)
        self.targets = [_Target(self, i + 1) for i in range(fleet.targets)]

    def run(self) -> "Result":
        for t in self.targets:
            t.start()
        horizon = self.fleet.horizon_s
        self.loop.run(until=lambda: self.finished == len(self.targets) or self.loop.now > horizon)
        if self.finished < len(self.targets):
            raise Stalled(f"{self.finished} of {len(self.targets)} targets verified after {self.loop.now:,.1f} "
                          f"simulated s ({self.loop.events:,} events); still "
                          + ", ".join(f"{t.name} {t.state}" for t in self.targets[:5] if t.state != "done"))
        end = self.loop.now
        for pub in [*self.seeds, *(t.publisher for t in self.targets if t.publisher)]:
            beats = int(max(end - pub.beats_from, 0) // self.fleet.heartbeat_s)
            for k in range(1, beats + 1):
                self.load.add("UpdateStatus", 1, pub.beats_from + k * self.fleet.heartbeat_s)
        return Result(
            fleet=self.fleet, done_s=[t.returned for t in self.targets], found_s=[t.found for t in self.targets],
            parents={t.name: tuple(s.pub.name for s in t.sources) for t in self.targets},
            depth={t.name: t.publisher.depth for t in self.targets if t.publisher and self.fleet.pipelined},
            peak_readers={p.name: p.leases.peak for p in [*self.seeds, *(t.publisher for t in self.targets
                                                                           if t.publisher)]},
            rounds=[t.rounds for t in self.targets], walks=sum(t.walks for t in self.targets),
            late=sum(t.late for t in self.targets), timed_out=sum(bool(t.timed_out) for t in self.targets),
            load=self.load, events=self.loop.events)


@dataclasses.dataclass
class Result:
    fleet: Fleet
    done_s: list[float]  # per target: pull_weights returned (the last tensor verified)
    found_s: list[float]  # per target: when it had its sources
    parents: dict[str, tuple[str, ...]]
    depth: dict[str, int]  # pipelined: each target's depth in the tree
    peak_readers: dict[str, int]
    rounds: list[int]
    walks: int  # listings walked (each a ListSources, then GetMetadata + a lease call per candidate tried)
    late: int  # targets that waited longer than wait_timeout_s for a source (the real pull gives up)
    timed_out: int  # targets with reads past MooncakeEngine.read's deadline (the real pull fails)
    load: _Load
    events: int

    @property
    def last_s(self) -> float:
        return max(self.done_s)

    def server(self, ranks: int = 1) -> dict[str, tuple[float, float, float]]:
        return self.load.summary(self.last_s, ranks)


def simulate(fleet: Fleet) -> Result:
    """Run one fleet to the end (every target verified)."""
    return _Sim(fleet).run()


# --- models and presets ------------------------------------------------------------------------------

def uneven_sizes(total_bytes: float, count: int) -> tuple[int, ...]:
    """`count` tensors of uneven sizes (shares 1..7) adding up to about `total_bytes`: the shapes
    benchmarks/fleet.py's workers build (its `_weights`)."""
    shares = [1 + (i * 5) % 7 for i in range(count)]
    unit = total_bytes / sum(shares)
    return tuple(int(unit * s) // 64 * 64 for s in shares)


def coarsen(sizes: Sequence[int], groups: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Neighbouring tensors summed into at most `groups` groups: (sizes, tensors per group)."""
    groups = max(1, min(groups, len(sizes)))
    bounds = [len(sizes) * i // groups for i in range(groups + 1)]
    return (tuple(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])),
            tuple(b - a for a, b in zip(bounds, bounds[1:])))


def emulated_fleet(mode: Mode, *, rate_mb_s: float, size_mb: float, tensors: int, targets: int, max_readers: int,
                   poll_s: float = 0.1, watch: bool = False, seed: int = 0, costs: dict | None = None,
                   chunk_kb: int = 0) -> Fleet:
    """A run of benchmarks/fleet.py --emulate: hosts behind one switch, every link `rate_mb_s` MB/s each way
    (netem: TCP moves 96% as payload), `size_mb` MiB in `tensors` uneven tensors, CPU digests (xxh3-64);
    its store-and-forward seeds with start_seed (hashes again); alone and one-seed: no reader cap.
    `chunk_kb`: the seed's chunk digests; a pipelined pull's units are then each tensor's chunks
    (sglang_mx.chunks), simulated as tensors of their own. `costs`: Costs fields to change (16 watches: an
    event in a few ms, assumed)."""
    capped = mode in (Mode.STORE_AND_FORWARD, Mode.PIPELINED)
    sizes = uneven_sizes(size_mb * 1024 * 1024, tensors)
    if mode is Mode.PIPELINED and chunk_kb:
        sizes = tuple(n for size in sizes for _, n in (chunks.spans(size, chunk_kb * 1024) if size > chunk_kb * 1024
                                                        else [(0, size)]))
    return Fleet(mode=mode, targets=1 if mode is Mode.ALONE else targets,
                 sizes=sizes, nic_gb_s=rate_mb_s / 1000,
                 max_readers=max_readers if capped else 0,
                 options=PullOptions(poll_interval_s=poll_s, watch=watch, pipeline=mode is Mode.PIPELINED),
                 costs=Costs(**{"payload": 0.96, "rehash_on_publish": True, "event_s": 0.005, **(costs or {})}),
                 seed=seed)


def _measured(measured: dict) -> dict[Mode, float | None]:
    """{mode: seconds, or None for a mode that failed}, the names as fleet.py writes them or with _ or spaces."""
    return {Mode(key.strip().lower().replace("_", "-").replace(" ", "-")): None if s is None else float(s)
            for key, s in (measured or {}).items()}


def _outcome(r: Result) -> str:
    if r.timed_out:
        return f"FAILS: {r.timed_out} targets' reads end at up to {r.last_s:.1f} s, past the engine's deadline"
    return f"{r.last_s:.2f}" + ("†" if r.late else "")


def predict_emulated(params: dict, out=None, costs: dict | None = None) -> dict[str, dict[str, Result]]:
    """Print predicted times (poll and watch) for alone, one seed, store-and-forward and pipelined next to
    `params["measured"]`; return {mode: {"poll": result, "watch": result}}."""
    out = out or sys.stdout
    keys = ("rate_mb_s", "size_mb", "tensors", "targets", "max_readers")
    missing = [k for k in keys if k not in params]
    if missing:
        raise SystemExit(f"fleet_sim: the emulated run's JSON lacks {', '.join(missing)}; expected keys "
                         f"{', '.join(keys)}, optional poll_s, watch and measured {{mode: seconds or null}}")
    measured = _measured(params.get("measured", {}))
    kw = {k: params[k] for k in keys} | {"poll_s": float(params.get("poll_s", 0.1)), "costs": costs,
                                         "chunk_kb": int(params.get("chunk_kb", 0))}
    c = emulated_fleet(Mode.ALONE, **kw).costs
    which = "watch" if params.get("watch") else "poll"
    print(f"emulated fleet: 1 seed + {kw['targets']} targets, {kw['size_mb']:g} MiB in {kw['tensors']} tensors "
          f"(chunk digests every {kw['chunk_kb']} KiB), "
          f"every link {kw['rate_mb_s']:g} MB/s each way ({kw['rate_mb_s'] * 0.96:.1f} MB/s payload), "
          f"max_readers {kw['max_readers']} (cascades), poll {kw['poll_s']:g} s, watch event {c.event_s * 1e3:g} ms; "
          f"RPC {c.rpc_s * 1e3:g} ms, lease call {c.lease_s * 1e3:g} ms, start serving {c.serve_s * 1e3:g} ms",
          file=out)
    print(f"\n{'mode':<18} {'poll s':>7} {'watch s':>8} {'measured s':>10} {'pred/meas':>9}  shape; calls (poll)",
          file=out)
    got: dict[str, dict[str, Result]] = {}
    for mode in Mode:
        runs = {w: simulate(emulated_fleet(mode, watch=w == "watch", **kw)) for w in ("poll", "watch")}
        got[mode.value] = runs
        r = runs["poll"]
        meas = measured.get(mode, math.nan)
        shown = "failed" if meas is None else "-" if math.isnan(meas) else f"{meas:.2f}"
        ratio = f"{runs[which].last_s / meas:.2f}" if meas and not math.isnan(meas) and not runs[which].timed_out \
            else "-"
        shape = f"depth {max(r.depth.values())}" if r.depth else f"peak readers {max(r.peak_readers.values())}"
        srv = r.server()
        if r.timed_out or runs["watch"].timed_out:
            print(f"{mode.value:<18} {_outcome(r)}; watch {_outcome(runs['watch'])}; measured {shown}", file=out)
            continue
        print(f"{mode.value:<18} {_outcome(r):>7} {_outcome(runs['watch']):>8} {shown:>10} {ratio:>9}  {shape}; "
              f"{srv['ListSources'][0]:.0f} ListSources, {srv['GetMetadata'][0]:.0f} GetMetadata", file=out)
    print(f"(pred/meas: the {which} prediction; \"watch\": true in the JSON for a run that waited on the metadata "
          "watch. Not simulated: CPU contention, which slows every call when 17 processes share a few cores)",
          file=out)
    return got


# --- the 1,000-node table ------------------------------------------------------------------------------

TABLE_VARIANTS = (
    ("one seed", Mode.ONE_SEED, (0,)),
    ("store-and-forward", Mode.STORE_AND_FORWARD, (1, 2, 4)),
    ("pipelined chain (max_readers 1)", Mode.PIPELINED, (1,)),
    ("pipelined tree (max_readers 2)", Mode.PIPELINED, (2,)),
    ("pipelined tree (max_readers 4)", Mode.PIPELINED, (4,)),
)


def table(*, model_gb: float = 681 / 8, nic_gb_s: float = 50.0, tensors: int = 1000, sizes=(10, 100, 1000),
          budget: float = 2e6, digest_gb_s: float = 200.0, link_gb_s: float | None = None,
          costs: dict | None = None, out=None) -> dict:
    """Print the time until all N targets are verified (poll and watch) and the metadata server's load at
    N = max(sizes) nodes x 8 ranks; return the results."""
    out = out or sys.stdout
    start = time.perf_counter()
    raw = uneven_sizes(model_gb * 1e9, tensors)
    costs = Costs(**{"digest_gb_s": digest_gb_s, **(costs or {})})
    print(f"model {model_gb:.1f} GB per rank in {tensors} uneven tensors, NIC {nic_gb_s:g} GB/s each way per rank"
          f"{f', one stream {link_gb_s:g} GB/s' if link_gb_s else ''}, digests {digest_gb_s:g} GB/s, "
          f"window {PullOptions().window_bytes >> 20} MiB, poll {PullOptions().poll_interval_s:g} s, "
          f"watch event {costs.event_s * 1000:g} ms, RPC {costs.rpc_s * 1000:g} ms, lease call "
          f"{costs.lease_s * 1000:g} ms; one rank fleet simulated (8 ranks of a node are 8 independent fleets)",
          file=out)
    results: dict = {}
    coarse = {}
    for n in sizes:
        # A pipelined child re-plans its pending tensors every round, one round per group: N x groups^2.
        groups = min(tensors, max(40, math.isqrt(int(budget / n))))
        coarse[n] = groups
        grouped, per_group = coarsen(raw, groups)
        for label, mode, caps in TABLE_VARIANTS:
            for cap in caps:
                for watch in (False, True):
                    fleet = Fleet(mode=mode, targets=n, sizes=grouped, per_group=per_group, nic_gb_s=nic_gb_s,
                                  link_gb_s=link_gb_s, max_readers=cap, costs=costs,
                                  options=PullOptions(watch=watch, pipeline=mode is Mode.PIPELINED))
                    results[label, cap, n, watch] = simulate(fleet)
    notes = [f"N = {n:,}: {coarse[n]} groups of about {tensors / coarse[n]:.1f} neighbouring tensors (each pays its "
             "tensors' per-read gaps; a child lags its parent by a group, not a tensor)" for n in sizes
             if coarse[n] < tensors]
    alone = model_gb / nic_gb_s
    print(f"\nTime until the last target is verified (s); one target alone moves the rank in {alone:.2f} s. "
          "poll / watch:\n", file=out)
    head = "| variant | " + " | ".join(f"N = {n:,}" for n in sizes) + " |"
    print(head + "\n|---|" + "---:|" * len(sizes), file=out)
    best_rows = {}
    for label, mode, caps in TABLE_VARIANTS:
        cells = []
        for n in sizes:
            parts = []
            for watch in (False, True):
                cap = min(caps, key=lambda k: results[label, k, n, watch].last_s)
                best_rows[label, n, watch] = cap
                r = results[label, cap, n, watch]
                mark = ("‡" if r.timed_out else "") + ("†" if r.late else "")
                parts.append(f"{r.last_s:,.1f}{mark}" + (f" (k={cap})" if len(caps) > 1 else ""))
            cells.append(" / ".join(parts))
        print(f"| {label} | " + " | ".join(cells) + " |", file=out)
    pipes = [(label, caps[0]) for label, mode, caps in TABLE_VARIANTS if mode is Mode.PIPELINED]
    for n in sizes:
        best = min(pipes, key=lambda lc: results[lc[0], lc[1], n, True].last_s)
        print(f"pipelined, N = {n:,}: best {best[0]} ({results[best[0], best[1], n, True].last_s:,.1f} s with the "
              f"watch); depth {max(results[best[0], best[1], n, True].depth.values())}", file=out)
    print("† some target waited longer than wait_timeout_s "
          f"({DEFAULTS.wait_timeout_s:g} s) for a source: with that default it would have given up", file=out)
    print(f"‡ some target's reads from one seed took longer than MooncakeEngine.read's deadline ({READ_BUDGET_S:g} s "
          "+ 1 ns per byte): the real pull fails (the emulated one-seed run of 16 at 25 MB/s did)", file=out)
    for note in notes:
        print("coarsened: " + note, file=out)

    n = max(sizes)
    ranks = RANKS_PER_NODE
    print(f"\nMetadata server at {n * ranks:,} rank-targets ({n:,} nodes x {ranks} ranks: one rank fleet "
          f"simulated, its load x {ranks}); calls per second, mean / busiest second:\n", file=out)
    kinds = ("ListSources", "GetMetadata", "UpdateStatus", "PublishMetadata", "watch events")
    print("| variant | wait | " + " | ".join(kinds) + " | server CPU, cores (mean / peak) |", file=out)
    print("|---|---|" + "---:|" * (len(kinds) + 1), file=out)
    for label, mode, caps in TABLE_VARIANTS:
        for watch in (False, True):
            cap = best_rows[label, n, watch]
            srv = results[label, cap, n, watch].server(ranks)
            cpu = [sum(srv[k][i] * s for k, s in SERVER_CPU_S.items()) for i in (1, 2)]
            name = label + (f" (k={cap})" if len(caps) > 1 else "")
            print(f"| {name} | {'watch' if watch else 'poll'} | "
                  + " | ".join(f"{srv[k][1]:,.0f} / {srv[k][2]:,.0f}" for k in kinds)
                  + f" | {cpu[0]:,.1f} / {cpu[1]:,.1f} |", file=out)
    print(f"server CPU: ListSources {SERVER_CPU_S['ListSources'] * 1e3:g} ms and GetMetadata "
          f"{SERVER_CPU_S['GetMetadata'] * 1e3:g} ms per call (README, metadata_load.py, 10,000-tensor records), "
          f"{SERVER_CPU_S['watch events'] * 1e6:g} us per watch event (server/watch.py); the server's queueing is not "
          "simulated: each call takes the same time however busy it is, so where it needs more cores than it has, "
          "the times above are optimistic", file=out)
    print(f"\n{len(results)} runs in {time.perf_counter() - start:.1f} s", file=out)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", action="store_true", help="the 1,000-node table (681 GB TP 8, 50 GB/s per rank)")
    p.add_argument("--emulated-json", metavar="FILE", help="an emulated run's summary (benchmarks/fleet.py "
                   "--emulate): keys rate_mb_s, size_mb, tensors, targets, max_readers, [poll_s, watch], measured")
    e = p.add_argument_group("an emulated run given by its parameters")
    e.add_argument("--rate-mb-s", type=float, default=25.0)
    e.add_argument("--size-mb", type=float, default=64)
    e.add_argument("--tensors", type=int, default=64)
    e.add_argument("--targets", type=int, default=16)
    e.add_argument("--max-readers", type=int, default=1)
    e.add_argument("--poll-s", type=float, default=0.1)
    e.add_argument("--chunk-kb", type=int, default=512, help="the seed's chunk digests, KiB (0: none)")
    k = p.add_argument_group("fixed costs (Costs), for either")
    for name, default in (("rpc", Costs.rpc_s), ("lease", Costs.lease_s), ("serve", Costs.serve_s),
                          ("event", None)):
        k.add_argument(f"--{name}-ms", type=float, default=None,
                       help=f"Costs.{name}_s in ms" + (f" (default {default * 1e3:g})" if default else ""))
    t = p.add_argument_group("--table")
    t.add_argument("--model-gb", type=float, default=681 / 8, help="bytes one rank pulls, GB (681 GB / TP 8)")
    t.add_argument("--nic-gb-s", type=float, default=50.0, help="one rank's NIC, each way (400 Gbit/s)")
    t.add_argument("--table-tensors", type=int, default=1000, help="tensors per rank")
    t.add_argument("--budget", type=float, default=2e6,
                   help="targets x tensor groups^2 per run: neighbouring tensors are grouped above it (for speed)")
    t.add_argument("--digest-gb-s", type=float, default=200.0, help="GPU digests (README: mxh64 218 GB/s)")
    t.add_argument("--link-gb-s", type=float, default=None, help="cap one stream's rate (default: NIC only)")
    args = p.parse_args(argv)
    costs = {f"{name}_s": getattr(args, f"{name}_ms") / 1e3 for name in ("rpc", "lease", "serve", "event")
             if getattr(args, f"{name}_ms") is not None}
    if args.table:
        table(model_gb=args.model_gb, nic_gb_s=args.nic_gb_s, tensors=args.table_tensors,
              budget=args.budget, digest_gb_s=args.digest_gb_s, link_gb_s=args.link_gb_s, costs=costs)
        return
    if args.emulated_json:
        with open(args.emulated_json) as f:
            params = json.load(f)
    else:
        params = {k: getattr(args, k) for k in ("rate_mb_s", "size_mb", "tensors", "targets", "max_readers",
                                                "poll_s", "chunk_kb")}
    predict_emulated(params, costs=costs)


if __name__ == "__main__":
    main()
