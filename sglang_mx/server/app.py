"""Assemble and run the metadata server: store, servicer, reaper, health."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sglang_mx import wire
from sglang_mx.errors import ConfigError
from sglang_mx.server.factory import DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_URL, STORE_KINDS, make_store
from sglang_mx.server.reaper import Reaper
from sglang_mx.server.service import P2pServicer, now_ms
from sglang_mx.server.store import SourceStore

log = logging.getLogger(__name__)

DEFAULT_PORT = 8001


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0 picks a free port
    heartbeat_timeout_s: float = 90.0
    reaper_interval_s: float = 30.0
    gc_timeout_s: float = 3600.0
    max_message_mb: int = 256
    workers: int = 16
    store: str = "memory"  # one of factory.STORE_KINDS
    redis_url: str = DEFAULT_REDIS_URL
    redis_prefix: str = DEFAULT_REDIS_PREFIX

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} is out of range; allowed: 0-65535 (0 picks a free port)")
        for name in ("heartbeat_timeout_s", "reaper_interval_s", "gc_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0 seconds")
        if self.max_message_mb < 1:
            raise ConfigError(f"max_message_mb={self.max_message_mb} must be >= 1")
        if self.store not in STORE_KINDS:
            raise ConfigError(f"store={self.store!r} is not a store; allowed: {', '.join(STORE_KINDS)}")

    @property
    def record_ttl_s(self) -> float:
        """Redis TTL safety net: twice the time the reaper needs to delete a silent record."""
        return 2 * (self.heartbeat_timeout_s + self.gc_timeout_s + self.reaper_interval_s)


class MetadataServer:
    """A running metadata server; a context manager that stops it on exit.

    Without `store`, it makes the one `options.store` names. The server owns its
    store: `stop()` closes it, and so does a constructor that fails.
    """

    def __init__(self, options: ServerOptions = ServerOptions(), store: SourceStore | None = None) -> None:
        self.options = options
        if store is None:
            store = make_store(options.store, redis_url=options.redis_url, redis_prefix=options.redis_prefix,
                               record_ttl_s=options.record_ttl_s)
        self._store = store
        try:
            self._build(options)
        except BaseException:
            store.close()
            raise

    def _build(self, options: ServerOptions) -> None:
        limit = options.max_message_mb * 1024 * 1024
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="mx-rpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC sets SO_REUSEPORT by default: a second server on a busy port would
                # then start too and silently take half the calls (each with its own store).
                ("grpc.so_reuseport", 0),
            ],
        )
        wire.add_servicer_to_server(
            P2pServicer(self._store, heartbeat_timeout_s=options.heartbeat_timeout_s), self._grpc
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        address = f"{options.host}:{options.port}"
        try:
            self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {address}: {e}") from e
        self._reaper = Reaper(
            self._store,
            interval_s=options.reaper_interval_s,
            heartbeat_timeout_s=options.heartbeat_timeout_s,
            gc_timeout_s=options.gc_timeout_s,
            clock_ms=now_ms,
        )
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "::", "") else self.options.host
        return f"{host}:{self.port}"

    def start(self) -> "MetadataServer":
        self._grpc.start()
        for service in ("", wire.SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._reaper.start()
        log.info("metadata server listening on %s:%d (%s)", self.options.host, self.port,
                 type(self._store).__name__)
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        if self._stopping.is_set():
            self._stopped.wait()
            return
        self._stopping.set()
        self._health.enter_graceful_shutdown()
        self._reaper.close()
        self._grpc.stop(grace_s).wait()
        self._store.close()
        # Log before waking wait(): serve_forever returns then and the process may
        # exit before this daemon thread gets to log.
        log.info("metadata server stopped")
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(options: ServerOptions, store: SourceStore | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly."""
    server = MetadataServer(options, store).start()

    def _on_signal(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.wait()
