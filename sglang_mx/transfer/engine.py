"""A thin owner of a Mooncake TransferEngine: initialize, register, read.

It can create its own engine (`MooncakeEngine.create`) or wrap one that SGLang
already made (`MooncakeEngine.wrap`); only an engine it created is its to close.
Registered memory is released on `close()`, on every path.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Sequence

from sglang_mx.errors import MxError, TransferError
from sglang_mx.transfer.plan import Read, coalesce_ranges

log = logging.getLogger(__name__)

# "nvlink" is multi-node NVLink (Mooncake built with USE_MNNVL); "nvlink_intra" is NVLink between GPUs of
# one node (CUDA IPC; in the CUDA wheels, e.g. mooncake-transfer-engine-cuda13 0.3.14).
PROTOCOLS = ("tcp", "rdma", "nvlink", "nvlink_intra", "efa")
# Reads per batch_transfer_sync_read call: bounds the size of one Mooncake batch.
MAX_BATCH = 1024


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

    def read(self, seed_session: str, reads: Sequence[Read]) -> None:
        """Pull every read from the seed; raise TransferError on any failure.

        On failure some destinations may already be overwritten: the caller
        must treat all of them as garbage.
        """
        for start in range(0, len(reads), MAX_BATCH):
            batch = reads[start : start + MAX_BATCH]
            rc = self._engine.batch_transfer_sync_read(
                seed_session,
                [r.local_addr for r in batch],
                [r.remote_addr for r in batch],
                [r.length for r in batch],
            )
            if rc < 0:
                raise TransferError(
                    f"batch_transfer_sync_read of reads {start}-{start + len(batch) - 1} failed",
                    seed=seed_session,
                    code=rc,
                    nbytes=sum(r.length for r in batch),
                )

    def close(self) -> None:
        self.unregister_all()
        if self._owned:
            self._engine = None  # the binding frees the engine with its last reference

    def __enter__(self) -> "MooncakeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
