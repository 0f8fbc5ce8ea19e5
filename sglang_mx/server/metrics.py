"""Prometheus metrics of one metadata server, served over HTTP on a port of their own.

- `sglang_mx_rpc_requests_total{rpc,code}`: unary calls answered, by method and gRPC code
  (`rpc` is one of the four P2pService methods, "Health", or "other": a caller cannot make
  new series by calling made-up method names). Calls the authentication refuses are
  counted too (it runs first and reports them).
- `sglang_mx_rpc_duration_seconds{rpc,code}`: their handling time (histogram).
- `sglang_mx_sources{status}`: worker records by stored status, read from the store at
  scrape time with `SourceStore.list` (for Redis: the indexes and small fields only,
  never the tensor lists).
- `sglang_mx_store_up`: 1 when that read worked, 0 when the store was unavailable.

Each server has a registry of its own (no process-wide state). Needs the
`prometheus_client` package (`pip install 'sglang-mx[metrics]'`).
"""

from __future__ import annotations

import collections
import logging
import time

import grpc

from sglang_mx.errors import ConfigError, StoreUnavailableError
from sglang_mx.records import SourceQuery, SourceStatus
from sglang_mx.server.auth import KNOWN_METHODS, OPEN_METHOD_PREFIXES
from sglang_mx.server.store import SourceStore

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError as e:  # pragma: no cover - depends on the environment
    prometheus_client = None
    _IMPORT_ERROR = e

log = logging.getLogger(__name__)

# RPCs of this service take milliseconds; a 10,000-tensor GetMetadata tens of them.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StoreCollector:
    """Computes the per-status gauge from the store when scraped."""

    def __init__(self, store: SourceStore) -> None:
        self._store = store

    def describe(self):
        yield GaugeMetricFamily("sglang_mx_sources", "Published worker records by status", labels=["status"])
        yield GaugeMetricFamily("sglang_mx_store_up", "1 if the store answered the last scrape")

    def collect(self):
        up = GaugeMetricFamily("sglang_mx_store_up", "1 if the store answered the last scrape")
        try:
            refs = self._store.list(SourceQuery())
        except StoreUnavailableError as e:
            log.warning("metrics: store unavailable: %s", e)
            up.add_metric([], 0)
            yield up
            return
        counts = collections.Counter(ref.status for ref in refs)
        sources = GaugeMetricFamily("sglang_mx_sources", "Published worker records by status", labels=["status"])
        for status in SourceStatus:
            sources.add_metric([status.name], counts.get(status, 0))
        up.add_metric([], 1)
        yield sources
        yield up


class ServerMetrics:
    """The registry, the interceptor that feeds it, and (after `serve`) its HTTP endpoint."""

    def __init__(self, store: SourceStore) -> None:
        if prometheus_client is None:
            raise ConfigError(f"metrics need the prometheus_client package ({_IMPORT_ERROR}); "
                              "install it with: pip install 'sglang-mx[metrics]'")
        self.registry = prometheus_client.CollectorRegistry()
        self._requests = prometheus_client.Counter(
            "sglang_mx_rpc_requests", "Unary RPCs answered, by method and gRPC status code",
            ["rpc", "code"], registry=self.registry,
        )
        self._latency = prometheus_client.Histogram(
            "sglang_mx_rpc_duration_seconds", "Time spent handling unary RPCs, by method and gRPC status code",
            ["rpc", "code"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_StoreCollector(store))
        self.interceptor = _MetricsInterceptor(self)
        self._httpd = None
        self._thread = None

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one call of `method` (the full gRPC path) answered with `code`."""
        rpc = rpc_label(method)
        self._requests.labels(rpc, code.name).inc()
        self._latency.labels(rpc, code.name).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 picks a free port); return the port."""
        try:
            self._httpd, self._thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {e}") from e
        return self._httpd.server_address[1]

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def rpc_label(method: str) -> str:
    if method in KNOWN_METHODS:
        return method.rsplit("/", 1)[-1]
    return "Health" if method.startswith(OPEN_METHOD_PREFIXES) else "other"


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Times every unary handler it is handed (it runs after authentication)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        rpc = handler_call_details.method
        behavior = handler.unary_unary
        observe = self._metrics.observe

        def timed(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                response = behavior(request, context)
                code = _code_of(context) or grpc.StatusCode.OK
                return response
            except Exception:
                code = _code_of(context) or grpc.StatusCode.UNKNOWN
                raise
            finally:
                observe(rpc, code, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code_of(context) -> grpc.StatusCode | None:
    """The code a handler set (abort() sets it before raising); None if it set none."""
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    for member in grpc.StatusCode:  # set_code() with a raw int
        if member.value[0] == code:
            return member
    return grpc.StatusCode.UNKNOWN
