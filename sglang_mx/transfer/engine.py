"""A thin owner of a Mooncake TransferEngine: initialize, register, read.

It can create its own engine (`MooncakeEngine.create`) or wrap one that SGLang
already made (`MooncakeEngine.wrap`); only an engine it created is its to close.
Registered memory is released on `close()`, on every path.

The transport asked for is the transport used: `create` sets what Mooncake needs
for it, reads back what Mooncake installed (transfer.segment) and refuses a
mismatch. On CUDA, registration follows allocations and no piece of a read
straddles a registered region on either side (transfer.regions). A read Mooncake
reports timed out is still in flight: it is waited for, never abandoned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from sglang_mx.errors import MxError, ReadsInFlightError, TransferError
import sglang_mx.transfer.cuda as cuda
from sglang_mx.transfer.plan import Read
from sglang_mx.transfer.regions import AllocationLookup, edges, pieces, split_at_allocations
from sglang_mx.transfer.segment import Segment, query_segment

log = logging.getLogger(__name__)

# "nvlink" is multi-node NVLink (Mooncake built with USE_MNNVL); "nvlink_intra" is NVLink between GPUs of
# one node (CUDA IPC; in the CUDA wheels, e.g. mooncake-transfer-engine-cuda13 0.3.14).
PROTOCOLS = ("tcp", "rdma", "nvlink", "nvlink_intra", "efa")
# What Mooncake's TransferEngineImpl::init reads to install each transport (it picks the transport itself;
# the protocol argument does not force it): set only while `initialize` runs.
PROTOCOL_ENV = {"tcp": {"MC_FORCE_TCP": "1"}, "nvlink_intra": {"MC_INTRANODE_NVLINK": "1"},
                "nvlink": {"MC_FORCE_MNNVL": "1"}}
# Settings that make Mooncake install another transport than the one asked for.
_STEERING_ENV = ("MC_FORCE_TCP", "MC_INTRANODE_NVLINK", "MC_FORCE_MNNVL", "MC_FORCE_HCA")
# Transports that export or register whole CUDA allocations (CUDA IPC handles, GPUDirect RDMA):
# virtual-memory allocations cannot be served by them.
_NEEDS_IPC_MEMORY = ("rdma", "nvlink", "nvlink_intra")
# A read larger than this is submitted in chunks, so big tensors spread over the
# transport's connections and finish (and get verified) sooner.
CHUNK_BYTES = 16 << 20
# Sleep between polls of the batches in flight: short, since a read lands every few ms on loopback
# (README "Benchmarks" has the comparison).
POLL_S = 0.001
# While nothing lands the sleep doubles up to this: a slow link (a shaped one, or one shared by many
# readers) is not polled a thousand times a second by every pulling process.
POLL_MAX_S = 0.008
# How long reads still in flight are waited for once a read failed or the deadline passed, before
# ReadsInFlightError gives up on them.
DRAIN_S = 60.0

_env_lock = threading.Lock()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in the process environment for the block, then restore what was there."""
    with _env_lock:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_registries: dict[int, tuple[object, threading.Lock, dict[tuple[int, int], int]]] = {}
_registries_lock = threading.Lock()


def _registry(engine) -> tuple[threading.Lock, dict[tuple[int, int], int]]:
    """The lock and region counts shared by every wrapper of `engine` (kept with a reference to it, so
    its id is never reused while the entry lives: the engines SGLang makes live as long as the process)."""
    with _registries_lock:
        entry = _registries.get(id(engine))
        if entry is None or entry[0] is not engine:
            entry = _registries[id(engine)] = (engine, threading.Lock(), {})
        return entry[1], entry[2]


class MooncakeEngine:
    def __init__(self, engine, session_id: str, *, owned: bool, transport: str | None = None,
                 segments: Callable[[str], Segment] | None = None,
                 allocations: AllocationLookup | None = cuda.allocation_of) -> None:
        """`transport`: what Mooncake installed (None: unknown). `segments`: asks an engine for its
        segment descriptor (transfer.segment.query_segment; None: never asked). `allocations`: the
        device allocation holding an address (transfer.cuda.allocation_of; None: host memory only)."""
        self._engine = engine
        self.session_id = session_id
        self._owned = owned
        self.transport = transport
        self._segments = segments
        self._allocations = allocations
        # Region -> how many holders registered it (a pull that keeps it for the seed, the seed):
        # shared by every wrapper of one engine, so a target that turns into a seed never registers
        # its memory twice nor drops it between the two.
        self._lock, self._registered = _registry(engine) if not owned else (threading.Lock(), {})
        self._quarantined: list[Any] = []  # memory reads may still write into: never let go

    @classmethod
    def create(cls, host: str, *, protocol: str = "tcp", device: str = "", binding: Callable[[], Any] | None = None,
               segments: Callable[[str], Segment] = query_segment,
               allocations: AllocationLookup | None = cuda.allocation_of) -> "MooncakeEngine":
        """Start a TransferEngine in P2P-handshake mode (no etcd) on `host` with `protocol`.

        Sets what Mooncake reads to install that transport (PROTOCOL_ENV, only while it
        initializes), then reads back the transport it installed and raises TransferError
        when it is another one. `binding`: the TransferEngine class (tests pass a fake).
        """
        if protocol not in PROTOCOLS:
            raise MxError(f"Mooncake protocol {protocol!r} is not supported; allowed: {', '.join(PROTOCOLS)}")
        if binding is None:
            try:
                from mooncake.engine import TransferEngine as binding
            except ImportError as e:
                raise MxError(
                    "Mooncake is not installed: pip install 'sglang-mx[cpu]' (mooncake-transfer-engine-non-cuda, "
                    "needs Debian's libibverbs1) or 'sglang-mx[cuda]' (mooncake-transfer-engine)"
                ) from e
        engine = binding()
        with _environment(PROTOCOL_ENV.get(protocol, {})):
            rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise TransferError(f"Mooncake TransferEngine.initialize({host!r}, protocol={protocol!r}) failed", code=rc)
        session = f"{host}:{engine.get_rpc_port()}"
        try:
            installed = segments(session).protocols
        except (OSError, ValueError) as e:
            raise TransferError(f"could not read back the transport Mooncake installed at {session} "
                                f"(asked for {protocol!r}): {e}") from e
        if installed != (protocol,):
            steering = [f"{k}={os.environ[k]}" for k in _STEERING_ENV if k in os.environ]
            raise TransferError(
                f"Mooncake installed transport {', '.join(installed) or 'none'} where {protocol!r} was asked for "
                f"(session {session}); refusing to run on another transport. "
                + (f"The environment sets {', '.join(steering)}: unset it. " if steering else "")
                + {"rdma": "No RDMA device was usable: check MOONCAKE_DEVICE and the NICs, or ask for tcp.",
                   "nvlink_intra": "This Mooncake build lacks intra-node NVLink (a CUDA wheel has it, e.g. "
                                   "mooncake-transfer-engine-cuda13), or ask for tcp.",
                   "nvlink": "This Mooncake build lacks multi-node NVLink (USE_MNNVL), or ask for tcp."}.get(
                    protocol, "Set the transport (MOONCAKE_PROTOCOL / the config's transport) to what this "
                              "Mooncake build can install."))
        log.info("Mooncake TransferEngine at %s uses transport %s, as asked", session, installed[0])
        return cls(engine, session, owned=True, transport=protocol, segments=segments, allocations=allocations)

    @classmethod
    def wrap(cls, engine, session_id: str, *, segments: Callable[[str], Segment] | None = query_segment,
             allocations: AllocationLookup | None = cuda.allocation_of) -> "MooncakeEngine":
        """Use an engine someone else created (SGLang's); it stays theirs. The transport it
        installed is read back where it answers the handshake (logged; None otherwise)."""
        transport = None
        if segments is not None:
            try:
                protocols = segments(session_id).protocols
                transport = protocols[0] if len(protocols) == 1 else None
                log.info("the wrapped Mooncake TransferEngine at %s uses transport %s", session_id,
                         ", ".join(protocols) or "none")
            except (OSError, ValueError) as e:
                log.warning("could not read back the transport of the Mooncake engine at %s: %s", session_id, e)
        return cls(engine, session_id, owned=False, transport=transport, segments=segments, allocations=allocations)

    def register(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Register memory ranges, coalesced first; return the regions registered.

        Address-contiguous and overlapping ranges (shared storage) become one
        region; zero-length ranges are skipped; on CUDA a region is cut at every
        allocation boundary (transfer.regions). Memory of a virtual-memory
        allocation is refused before anything is registered where the transport
        needs CUDA IPC handles. Pass the result to `unregister`.
        """
        split = split_at_allocations(ranges, self._allocations)
        virtual = [(r, a) for r, a in split if a is not None and a.virtual]
        if virtual and self.transport in _NEEDS_IPC_MEMORY:
            (addr, length), alloc = virtual[0]
            raise TransferError(
                f"{len(virtual)} region(s) (first 0x{addr:x}, {length} bytes, in allocation 0x{alloc.base:x} of "
                f"{alloc.size} bytes) lie in CUDA virtual-memory allocations, which transport {self.transport!r} "
                "cannot register (no CUDA IPC handle): turn off PYTORCH_CUDA_ALLOC_CONF=expandable_segments "
                "and SGLang's --enable-memory-saver, or use transport tcp")
        regions = [r for r, _ in split]
        done: list[tuple[int, int]] = []
        reused = 0
        with self._lock:
            try:
                for addr, length in regions:
                    if (addr, length) in self._registered:  # already registered (a pull kept it): share it
                        self._registered[addr, length] += 1
                        reused += length
                    else:
                        rc = self._engine.register_memory(addr, length)
                        if rc != 0:
                            raise TransferError(f"register_memory(0x{addr:x}, {length}) failed", code=rc)
                        self._registered[addr, length] = 1
                    done.append((addr, length))
            except BaseException:
                self._unregister_locked(done)
                raise
        if reused:
            log.info("%.3f GB of the memory to register was registered already (kept from the pull): not again",
                     reused / 1e9)
        return done

    def unregister(self, regions: Iterable[tuple[int, int]]) -> None:
        with self._lock:
            self._unregister_locked(list(regions))

    def _unregister_locked(self, regions: list[tuple[int, int]]) -> None:
        for region in regions:
            holders = self._registered.get(region, 0)
            if holders > 1:  # another holder still needs it
                self._registered[region] = holders - 1
                continue
            self._registered.pop(region, None)
            rc = self._engine.unregister_memory(region[0])
            if rc != 0:
                log.warning("unregister_memory(0x%x, %d) returned %d", region[0], region[1], rc)

    def unregister_all(self) -> None:
        with self._lock:
            regions = [region for region, holders in self._registered.items() for _ in range(holders)]
        self.unregister(regions)

    def quarantine(self, obj: Any) -> None:
        """Hold `obj` (memory a read may still write into, after ReadsInFlightError) as long as
        this engine lives, so that it is never freed and reused."""
        self._quarantined.append(obj)

    def _remote_edges(self, seed_session: str) -> list[int]:
        """Edges of the seed's registered buffers, where a piece must not straddle: asked of the seed
        when our transport registers per allocation (not tcp, which tolerates spans)."""
        if self.transport == "tcp" or self._segments is None:
            return []
        try:
            segment = self._segments(seed_session)
        except (OSError, ValueError) as e:
            log.warning("could not read the registered buffers of seed %s (%s): reads are not cut at them",
                        seed_session, e)
            return []
        if self.transport is not None and segment.protocols and self.transport not in segment.protocols:
            raise TransferError(f"seed {seed_session} uses transport {', '.join(segment.protocols)}, this engine "
                                f"{self.transport}: no byte can move between them", seed=seed_session)
        return edges(segment.buffers)

    def read(
        self,
        seed_session: str,
        reads: Sequence[Read],
        *,
        prepare: Callable[[Read], None] | None = None,
        on_done: Callable[[int], None] | None = None,
        timeout_s: float | None = None,
        drain_s: float | None = None,
        window_bytes: int | None = None,
        more: Callable[[bool, int | None, bool], Sequence[Read]] | None = None,
    ) -> None:
        """Pull every read from the seed; raise TransferError on any failure.

        Each read is submitted as its own Mooncake batches (pieces of at most
        CHUNK_BYTES, none straddling a registered region on our side or the
        seed's), right after `prepare(read)` readied its destination, and this
        thread then polls the batches with short sleeps: the binding's blocking
        waits spin on a core that Mooncake's io threads need.
        `on_done(i)` runs in this thread once every byte of `reads[i]` has arrived
        and every read has been submitted (to verify it while the rest moves). A read that failed, a
        callback that raised, or the deadline passing (`timeout_s`, default
        30 s plus 1 ns per byte, as the binding's own) stops further submissions.
        The deadline counts from the last piece that landed: a slow link shared by
        many readers moves on and is not cut, one that stalls for that long is.
        A batch Mooncake reports timed out (-2) fails the read but is still in
        flight (the binding frees it only once completed or failed): it is polled
        like the others. The reads in flight are drained (each reaches completed
        or failed) before this returns or raises, so no write into the destination
        is still under way afterwards; should some still be in flight `drain_s`
        (DRAIN_S) after draining began, ReadsInFlightError is raised instead,
        naming the memory they may yet write. On failure some destinations may
        already be overwritten: the caller must treat all of them as garbage.

        `window_bytes` (a pipelined pull): reads are submitted in order while fewer
        than that many bytes are in flight, or fewer than two reads (so a large tensor
        moves while the one before it is verified), and `on_done` runs as soon as a read
        lands (after the next read, if the window lets it, was submitted). Reads then
        land nearly in order, so the first tensors are verified, and can be served on,
        long before the last arrive. Without it every read is in flight at once:
        fastest to the last byte.

        `more(idle, room, may_wait)` (with a window: a pipelined pull whose source verifies as
        it goes): asked for further reads whenever every read so far is submitted and the
        window has `room` bytes left, or nothing is in flight (`idle`). It gives reads that
        fit the room, or when idle one larger than that: a tensor its source verified while
        another moves waits for that one rather than share its link, so each lands, and is
        served on, as early as it can be. Only when `may_wait` (idle, and no read waits for
        `on_done`) may it wait a little for some. They are read like the first ones, indexed
        after them. The call ends once nothing is in flight and `more` had none while it
        could wait.
        """
        if not reads and more is None:
            return
        reads = list(reads)
        total = sum(r.length for r in reads)
        budget_s = timeout_s if timeout_s is not None else 30.0 + total * 1e-9
        drain_s = DRAIN_S if drain_s is None else drain_s
        deadline = time.monotonic() + budget_s
        with self._lock:
            local_edges = edges(self._registered)
        remote_edges = self._remote_edges(seed_session)
        left = [0] * len(reads)  # pieces of each read still in flight
        pending: list[tuple[int, int, int, int]] = []  # (batch id, read index, local addr, length)
        timed_out: set[int] = set()  # batches Mooncake reported timed out: still in flight
        landed: list[int] = []  # reads done whose on_done has not run yet
        failure: TransferError | None = None
        raised: BaseException | None = None
        submitted = 0
        in_flight = 0  # bytes of the reads submitted and not landed (the window)
        idle_s = POLL_S  # the next sleep while nothing lands
        finished = 0  # reads landed (submitted - finished are in flight)
        warned_at = None
        drain_until = None
        exhausted = more is None  # `more` has nothing to give (while idle)

        def submit_next() -> bool:
            """Submit the next read if the window lets it (asking `more` for one first); True if it did."""
            nonlocal submitted, in_flight, failure, raised, exhausted, finished
            if failure is not None or raised is not None:
                return False
            idle = submitted == finished  # nothing in flight
            if more is not None and submitted == len(reads) and (
                    window_bytes is None or in_flight < window_bytes or idle):
                room = None if window_bytes is None else max(window_bytes - in_flight, 0)
                may_wait = idle and not landed  # nothing waits for on_done either: a wait delays no one
                extra = list(more(idle, room, may_wait))
                exhausted = not extra and may_wait
                reads.extend(extra)
                left.extend([0] * len(extra))
            if submitted == len(reads) or not (window_bytes is None or submitted - finished < 2
                                               or in_flight + reads[submitted].length <= window_bytes):
                return False
            index, read = submitted, reads[submitted]
            submitted += 1
            in_flight += read.length
            try:
                if prepare is not None:
                    prepare(read)
                for local, remote, length in pieces(read, local_edges, remote_edges, CHUNK_BYTES):
                    batch = self._engine.batch_transfer_async_read(seed_session, [local], [remote], [length])
                    if batch is None or batch <= 0:
                        failure = self._read_error("could not be submitted", index, reads, seed_session, batch)
                        break
                    pending.append((batch, index, local, length))
                    left[index] += 1
                if failure is None and left[index] == 0:  # nothing to move (zero length)
                    landed.append(index)
                    finished += 1
                    in_flight -= read.length
            except BaseException as e:  # drain what is in flight first, then re-raise
                raised = e
            return True

        while True:
            progressed = submit_next()
            still: list[tuple[int, int, int, int]] = []
            done: list[int] = []
            for entry in pending:
                batch, index = entry[0], entry[1]
                status = self._engine.transfer_check_status(batch)
                if status == 0:
                    still.append(entry)
                    continue
                if status == -2:  # timed out, yet not freed and still writing: wait for its end
                    still.append(entry)
                    if batch not in timed_out:
                        timed_out.add(batch)
                        progressed = True
                        if failure is None:
                            failure = self._read_error("timed out in Mooncake (waiting for it to end)", index,
                                                       reads, seed_session, status)
                    continue
                progressed = True
                if status == 1:  # completed; the binding freed the batch
                    left[index] -= 1
                    deadline = max(deadline, time.monotonic() + budget_s)  # it moves: count from here
                    if left[index] == 0:
                        done.append(index)
                        finished += 1
                        in_flight -= reads[index].length
                elif failure is None:  # -1 failed (freed by the binding)
                    failure = self._read_error("failed", index, reads, seed_session, status)
            pending = still
            landed.extend(done)
            if done and window_bytes is not None:
                progressed |= submit_next()  # the next read moves while this thread verifies the one that landed
            # Callbacks wait until every read is submitted: the io thread is never left without work
            # while this thread hashes.
            if on_done is not None and failure is None and raised is None and (
                    submitted == len(reads) or window_bytes is not None):
                while landed:
                    try:
                        on_done(landed.pop(0))
                    except BaseException as e:
                        raised = e
                        break
                    progressed = True
            if not pending and (submitted == len(reads) and exhausted or failure is not None or raised is not None):
                break
            now = time.monotonic()
            if now > deadline and failure is None and raised is None:
                failure = TransferError(
                    f"Mooncake reads made no progress for the {budget_s:.1f} s deadline; "
                    f"draining {len(pending)} in flight", seed=seed_session, nbytes=total)
            if drain_until is None and (failure is not None or raised is not None):
                drain_until = now + drain_s
            if not progressed:
                if drain_until is not None and now > drain_until:
                    ranges = [(local, length) for _, _, local, length in pending]
                    raise ReadsInFlightError(
                        f"{len(pending)} Mooncake read(s) still in flight {drain_s:g} s after reading stopped "
                        f"({len(timed_out)} reported timed out)", seed=seed_session, ranges=ranges
                    ) from (raised or failure)
                if drain_until is not None and (warned_at is None or now - warned_at > 10):
                    warned_at = now
                    log.warning("waiting for %d Mooncake reads still in flight from %s before giving up",
                                len(pending), seed_session)
                time.sleep(idle_s)
                idle_s = min(idle_s * 2, max(POLL_MAX_S, POLL_S))
            else:
                idle_s = POLL_S
        if raised is not None:
            raise raised
        if failure is not None:
            raise failure

    @staticmethod
    def _read_error(what: str, index: int, reads: Sequence[Read], seed: str, code) -> TransferError:
        read = reads[index]
        return TransferError(
            f"Mooncake read {index} of {len(reads)} (batch_transfer_async_read, 0x{read.local_addr:x} <- "
            f"0x{read.remote_addr:x}) {what}", seed=seed, code=code, nbytes=read.length)

    def close(self) -> None:
        self.unregister_all()
        if self._owned and not self._quarantined:
            self._engine = None  # the binding frees the engine with its last reference

    def __enter__(self) -> "MooncakeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
