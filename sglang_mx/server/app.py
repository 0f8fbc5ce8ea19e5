"""Assemble and run the metadata server: store, servicers (P2pService, MxWatchService), reaper, health."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sglang_mx import wire
from sglang_mx.credentials import is_loopback, read_pem_file
from sglang_mx.errors import ConfigError
from sglang_mx.server.auth import AuthInterceptor, Access, TokenFile, TokenRegistry
from sglang_mx.server.factory import make_store
from sglang_mx.server.options import ServerOptions
from sglang_mx.server.reaper import Reaper
from sglang_mx.server.service import P2pServicer, now_ms
from sglang_mx.server.store import Capacity, SourceStore
from sglang_mx.server.watch import WatchHub
from sglang_mx.server.watch_service import WatchServicer

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (at most to 19). Linux only, where each
    thread has a nice value of its own (setpriority on its thread id); elsewhere that call would
    change the whole process, so nothing is done. Never raises: a thread pool's initializer that
    raised would break the pool."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:
        log.warning("could not lower thread %d's CPU priority by %d: %s", tid, nice, e)


class _PoolRouter(grpc.ServerInterceptor):
    """Runs the methods named in `pools` on their own thread pool (the rest on the server's)."""

    def __init__(self, pools: dict[str, futures.ThreadPoolExecutor]) -> None:
        self._pools = pools

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        pool = self._pools.get(handler_call_details.method)
        if pool is None or handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        def run(request, context):
            return behavior(request, context)

        run.experimental_thread_pool = pool  # grpcio picks the pool from the behavior it runs
        return handler._replace(unary_unary=run)


class MetadataServer:
    """A running metadata server; a context manager that stops it on exit.

    Without `store`, it makes the one `options.store` names. The server owns its
    store: `stop()` closes it, and so does a constructor that fails.
    """

    def __init__(self, options: ServerOptions = ServerOptions(), store: SourceStore | None = None) -> None:
        self.options = options
        if store is None:
            store = make_store(options.store, redis_url=options.redis_url, redis_prefix=options.redis_prefix,
                               record_ttl_s=options.record_ttl_s, redis_cache_mb=options.redis_cache_mb)
        self._store = store
        self.metrics = None
        try:
            self._build(options)
        except BaseException:
            if self.metrics is not None:
                self.metrics.close()
            if getattr(self, "_grpc", None) is not None:
                self._grpc.stop(None)  # releases a port it bound
            for pool in getattr(self, "_pools", ()):
                pool.shutdown(wait=False)
            store.close()
            raise

    def _build(self, options: ServerOptions) -> None:
        limit = options.max_message_mb * 1024 * 1024
        self.tokens = None
        if options.token_files:
            self.tokens = TokenRegistry([
                TokenFile(path, role, label) for path, role, label in (
                    (options.auth_token_file, Access.WRITER, "auth token file"),
                    (options.writer_token_file, Access.WRITER, "writer token file"),
                    (options.reader_token_file, Access.READER, "reader token file"),
                ) if path is not None
            ])
        elif not is_loopback(options.host):
            if not options.allow_unauthenticated:
                raise ConfigError(
                    f"serving {options.host} without a token lets anyone who reaches the port publish and read "
                    "records: give --auth-token-file (or --writer-token-file / --reader-token-file), listen on "
                    "127.0.0.1, or pass --allow-unauthenticated to choose it")
            log.warning("SERVING %s WITHOUT AUTHENTICATION (--allow-unauthenticated): anyone who reaches port %d "
                        "can publish, change and read records", options.host, options.port)
        credentials = None
        if options.tls_cert_file is not None:
            client_ca = None
            if options.tls_client_ca_file is not None:
                client_ca = read_pem_file(options.tls_client_ca_file, what="TLS client CA file")
            credentials = grpc.ssl_server_credentials([(
                read_pem_file(options.tls_key_file, what="TLS key file"),
                read_pem_file(options.tls_cert_file, what="TLS certificate file"),
            )], root_certificates=client_ca, require_client_auth=client_ca is not None)
        # Two thread pools: reads of big records (and publishes) never hold up listings and heartbeats,
        # neither in a queue nor, at a lower CPU priority, for the CPU.
        self._pools = [
            futures.ThreadPoolExecutor(max_workers=options.fast_workers, thread_name_prefix="mx-fast"),
            futures.ThreadPoolExecutor(max_workers=options.bulk_workers, thread_name_prefix="mx-bulk",
                                       initializer=lower_thread_priority, initargs=(options.bulk_nice,)),
        ]
        fast, bulk = self._pools
        interceptors: list[grpc.ServerInterceptor] = [_PoolRouter({
            f"/{wire.SERVICE_NAME}/GetMetadata": bulk, f"/{wire.SERVICE_NAME}/PublishMetadata": bulk})]
        self._hub = WatchHub(self._store, max_watchers=options.max_watchers)
        if options.metrics_port is not None:
            from sglang_mx.server.metrics import ServerMetrics

            self.metrics = ServerMetrics(self._store)
        if self.tokens is not None:  # first: nothing runs for a caller without a token
            interceptors.append(AuthInterceptor(self.tokens, self.metrics.observe if self.metrics else None))
        if self.metrics is not None:
            interceptors.append(self.metrics.interceptor)
        pending = max(options.max_concurrent_rpcs + options.max_watchers, 3000)
        self._grpc = grpc.server(
            fast,
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC sets SO_REUSEPORT by default: a second server on a busy port would
                # then start too and silently take half the calls (each with its own store).
                ("grpc.so_reuseport", 0),
                # Calls gRPC holds until this server's one accepting thread takes them: past 1,000
                # (3,000 at once) it cancels them, and thousands of targets opening their watches
                # together would see CANCELLED.
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending),
            ],
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        wire.add_servicer_to_server(
            P2pServicer(self._store, heartbeat_timeout_s=options.heartbeat_timeout_s,
                        max_tensors=options.max_tensors, max_record_bytes=options.max_record_mb * 1024 * 1024,
                        capacity=Capacity(max_workers_per_source=options.max_workers_per_source,
                                          max_sources=options.max_sources,
                                          max_records_per_principal=options.max_records_per_principal,
                                          max_bytes_per_principal=options.max_mb_per_principal * 1024 * 1024)),
            self._grpc,
        )
        wire.add_watch_handler(WatchServicer(self._hub).watch_sources, self._grpc)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        address = f"{options.host}:{options.port}"
        try:
            if credentials is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                self.port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {address}: {e}") from e
        self.metrics_port = None
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(options.host, options.metrics_port)
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

    @property
    def open_watches(self) -> int:
        """WatchSources streams open now (server/watch.py)."""
        return self._hub.open_watches

    def start(self) -> "MetadataServer":
        self._hub.start()
        self._grpc.start()
        for service in ("", wire.SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._reaper.start()
        log.info("metadata server listening on %s:%d (%s%s%s)", self.options.host, self.port,
                 type(self._store).__name__,
                 ", mutual TLS" if self.options.tls_client_ca_file else ", TLS" if self.options.tls_cert_file else "",
                 ", bearer token required" if self.tokens is not None else ", NO authentication")
        if self.metrics_port is not None:
            log.info("Prometheus metrics on http://%s:%d/metrics", self.options.host, self.metrics_port)
        return self

    def reload_tokens(self) -> bool:
        """Re-read the token files now (SIGHUP); False, keeping the old tokens, if one is unusable."""
        return self.tokens.reload() if self.tokens is not None else True

    def stop(self, grace_s: float = 2.0) -> None:
        if self._stopping.is_set():
            self._stopped.wait()
            return
        self._stopping.set()
        self._health.enter_graceful_shutdown()
        self._reaper.close()
        # gRPC takes no new calls from now on (clients watching again are refused by it, not by us), and
        # open watches end at once (UNAVAILABLE: their clients watch again elsewhere) instead of holding
        # up the grace period that calls in progress get.
        stopped = self._grpc.stop(grace_s)
        self._hub.close(timeout_s=grace_s)
        stopped.wait()
        for pool in self._pools:
            pool.shutdown(wait=False)
        if self.metrics is not None:
            self.metrics.close()
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


# GIL switch interval of a process that only serves (Python's default: 5 ms). grpcio's one
# thread that accepts calls and delivers their events must win the GIL for each event; with
# handler threads running, a 5 ms interval makes it wait up to that long each time (README,
# "The metadata server", has the measurements).
SERVING_SWITCH_INTERVAL_S = 0.0005


def serve_forever(options: ServerOptions, store: SourceStore | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly. Meant for a process of its own (the CLI):
    it sets the process's GIL switch interval and signal handlers."""
    sys.setswitchinterval(SERVING_SWITCH_INTERVAL_S)
    server = MetadataServer(options, store).start()

    def _on_signal(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda _signum, _frame: threading.Thread(
            target=server.reload_tokens, daemon=True).start())
    server.wait()
