"""A thin owner of a Mooncake TransferEngine: initialize, register, read.

It can create its own engine (`MooncakeEngine.create`) or wrap one that SGLang
already made (`MooncakeEngine.wrap`); only an engine it created is its to close.
Registered memory is released on `close()`, on every path.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence

from sglang_mx.errors import MxError, TransferError
from sglang_mx.transfer.plan import Read, coalesce_ranges

log = logging.getLogger(__name__)

# "nvlink" is multi-node NVLink (Mooncake built with USE_MNNVL); "nvlink_intra" is NVLink between GPUs of
# one node (CUDA IPC; in the CUDA wheels, e.g. mooncake-transfer-engine-cuda13 0.3.14).
PROTOCOLS = ("tcp", "rdma", "nvlink", "nvlink_intra", "efa")
# A read larger than this is submitted in chunks, so big tensors spread over the
# transport's connections and finish (and get verified) sooner.
CHUNK_BYTES = 16 << 20
# Sleep between polls of the batches in flight: short, since a read lands every few ms on loopback
# (README "Benchmarks" has the comparison).
POLL_S = 0.001


def _chunks(read: Read) -> Iterator[tuple[int, int, int]]:
    for offset in range(0, read.length, CHUNK_BYTES):
        n = min(CHUNK_BYTES, read.length - offset)
        yield read.local_addr + offset, read.remote_addr + offset, n


class MooncakeEngine:
    def __init__(self, engine, session_id: str, *, owned: bool) -> None:
        self._engine = engine
        self.session_id = session_id
        self._owned = owned
        self._lock = threading.Lock()
        self._registered: list[tuple[int, int]] = []

    @classmethod
    def create(cls, host: str, *, protocol: str = "tcp", device: str = "") -> "MooncakeEngine":
        """Start a TransferEngine in P2P-handshake mode (no etcd) on `host`."""
        if protocol not in PROTOCOLS:
            raise MxError(f"Mooncake protocol {protocol!r} is not supported; allowed: {', '.join(PROTOCOLS)}")
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise MxError(
                "Mooncake is not installed: pip install 'sglang-mx[cpu]' (mooncake-transfer-engine-non-cuda, "
                "needs Debian's libibverbs1) or 'sglang-mx[cuda]' (mooncake-transfer-engine)"
            ) from e
        engine = TransferEngine()
        rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise TransferError(f"Mooncake TransferEngine.initialize({host!r}, protocol={protocol!r}) failed", code=rc)
        return cls(engine, f"{host}:{engine.get_rpc_port()}", owned=True)

    @classmethod
    def wrap(cls, engine, session_id: str) -> "MooncakeEngine":
        """Use an engine someone else created (SGLang's); it stays theirs."""
        return cls(engine, session_id, owned=False)

    def register(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Register memory ranges, coalesced first; return the regions registered.

        Address-contiguous and overlapping ranges (shared storage) become one
        region; zero-length ranges are skipped. Pass the result to `unregister`.
        """
        regions = coalesce_ranges(ranges)
        done: list[tuple[int, int]] = []
        with self._lock:
            try:
                for addr, length in regions:
                    rc = self._engine.register_memory(addr, length)
                    if rc != 0:
                        raise TransferError(f"register_memory(0x{addr:x}, {length}) failed", code=rc)
                    done.append((addr, length))
            except BaseException:
                self._unregister_locked(done)
                raise
            self._registered.extend(done)
        return done

    def unregister(self, regions: Iterable[tuple[int, int]]) -> None:
        with self._lock:
            self._unregister_locked(list(regions))

    def _unregister_locked(self, regions: list[tuple[int, int]]) -> None:
        for region in regions:
            if region in self._registered:
                self._registered.remove(region)
            rc = self._engine.unregister_memory(region[0])
            if rc != 0:
                log.warning("unregister_memory(0x%x, %d) returned %d", region[0], region[1], rc)

    def unregister_all(self) -> None:
        self.unregister(list(self._registered))

    def read(
        self,
        seed_session: str,
        reads: Sequence[Read],
        *,
        prepare: Callable[[Read], None] | None = None,
        on_done: Callable[[int], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Pull every read from the seed; raise TransferError on any failure.

        Each read is submitted as its own Mooncake batch (chunks of at most
        CHUNK_BYTES each), right after `prepare(read)` readied its destination,
        and this thread then polls the batches with short sleeps: the binding's
        blocking waits spin on a core that Mooncake's io threads need.
        `on_done(i)` runs in this thread once every byte of `reads[i]` has arrived
        and every read has been submitted (to verify it while the rest moves). A read that failed, a
        callback that raised, or the deadline passing (`timeout_s`, default
        30 s plus 1 ns per byte, as the binding's own) stops further submissions;
        the reads already in flight are drained (each reaches completed or
        failed) before this returns or raises, so no write into the destination
        is still under way afterwards. On failure some destinations may already
        be overwritten: the caller must treat all of them as garbage.
        """
        if not reads:
            return
        total = sum(r.length for r in reads)
        budget_s = timeout_s if timeout_s is not None else 30.0 + total * 1e-9
        deadline = time.monotonic() + budget_s
        left = [0] * len(reads)  # chunks of each read still in flight
        pending: list[tuple[int, int]] = []  # (batch id, read index)
        landed: list[int] = []  # reads done whose on_done has not run yet
        failure: TransferError | None = None
        raised: BaseException | None = None
        submitted = 0
        warned_at = None
        while True:
            progressed = False
            if failure is None and raised is None and submitted < len(reads):
                index, read = submitted, reads[submitted]
                submitted += 1
                progressed = True
                try:
                    if prepare is not None:
                        prepare(read)
                    for local, remote, length in _chunks(read):
                        batch = self._engine.batch_transfer_async_read(seed_session, [local], [remote], [length])
                        if batch is None or batch <= 0:
                            failure = self._read_error("could not be submitted", index, reads, seed_session, batch)
                            break
                        pending.append((batch, index))
                        left[index] += 1
                    if failure is None and left[index] == 0:  # nothing to move (zero length)
                        landed.append(index)
                except BaseException as e:  # drain what is in flight first, then re-raise
                    raised = e
            still: list[tuple[int, int]] = []
            done: list[int] = []
            for batch, index in pending:
                status = self._engine.transfer_check_status(batch)
                if status == 0:
                    still.append((batch, index))
                    continue
                progressed = True
                if status == 1:  # completed; the binding freed the batch
                    left[index] -= 1
                    if left[index] == 0:
                        done.append(index)
                elif failure is None:  # -1 failed (freed by the binding), -2 timed out
                    failure = self._read_error("failed", index, reads, seed_session, status)
            pending = still
            landed.extend(done)
            # Callbacks wait until every read is submitted: the io thread is never left without work
            # while this thread hashes.
            if on_done is not None and failure is None and raised is None and submitted == len(reads):
                while landed:
                    try:
                        on_done(landed.pop(0))
                    except BaseException as e:
                        raised = e
                        break
                    progressed = True
            if not pending and (submitted == len(reads) or failure is not None or raised is not None):
                break
            if not progressed:
                now = time.monotonic()
                if now > deadline:
                    if failure is None and raised is None:
                        failure = TransferError(
                            f"Mooncake reads not done within the {budget_s:.1f} s deadline; "
                            f"draining {len(pending)} in flight", seed=seed_session, nbytes=total)
                    if warned_at is None or now - warned_at > 10:
                        warned_at = now
                        log.warning("waiting for %d Mooncake reads still in flight from %s before giving up",
                                    len(pending), seed_session)
                time.sleep(POLL_S)
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
        if self._owned:
            self._engine = None  # the binding frees the engine with its last reference

    def __enter__(self) -> "MooncakeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
