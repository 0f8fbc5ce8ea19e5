"""Prometheus metrics of the seeds and targets in this process (the metadata server has its own:
`server.metrics`).

- `sglang_mx_bytes_pulled_total`: bytes a target read from seeds and kept (verified where
  verification is on); counted round by round, so it moves during a long pull.
- `sglang_mx_pull_duration_seconds{outcome}`: one observation per `pull_weights`, "ok" or "failed".
- `sglang_mx_digest_failures_total`: seeds (or seed instances) refused because bytes pulled
  from them did not match their published digests.
- `sglang_mx_leases_granted_total`: reader leases a seed granted (renewals not counted).
- `sglang_mx_leases_held`: reader leases held now (the sum over the live processes).
- `sglang_mx_bytes_served_total`: an upper bound, not a measurement: a seed never sees the bytes
  read from it (Mooncake reads its memory without any code of ours running), so for each lease
  granted it adds the bytes the rank publishes. A target striping over N seeds reads about 1/N
  of them; readers without a lease (ModelExpress clients) are not counted at all.

Where SGLang runs with `--enable-metrics`, its `/metrics` endpoint serves only what
prometheus_client's multiprocess collector finds in `PROMETHEUS_MULTIPROC_DIR` (SGLang sets it
before it starts the schedulers, where seeds and pulls run). prometheus_client decides on import
whether it writes there, so this module imports it only when the first metric moves, never on
import (the SGLang plugin is imported early, in the launcher too). Without SGLang the metrics go
to prometheus_client's default registry; without the package (`pip install 'sglang-mx[metrics]'`)
every call here does nothing.

The instruments are process-wide, as a Prometheus registry is: `metrics()` makes them once.
"""

from __future__ import annotations

import logging
import os
import threading

__all__ = ["Metrics", "metrics"]

log = logging.getLogger(__name__)

# A pull takes from a fraction of a second (a small model on loopback) to minutes.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Metrics:
    """The instruments, or no-ops when prometheus_client is missing (`enabled` says which)."""

    def __init__(self) -> None:
        try:
            import prometheus_client
        except ImportError:
            self.enabled = False
            return
        self.enabled = True
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if self.multiprocess and prometheus_client.values.ValueClass is prometheus_client.values.MutexValue:
            log.warning("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: the sglang_mx "
                        "metrics of this process stay in its memory, not in %s, and a multiprocess /metrics "
                        "endpoint (SGLang's) will not show them", os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self._bytes_pulled = prometheus_client.Counter(
            "sglang_mx_bytes_pulled", "Bytes a target read from seeds and kept (verified where verification is on)")
        self._pull_duration = prometheus_client.Histogram(
            "sglang_mx_pull_duration_seconds", "Duration of one target's pull of one rank, from registration to "
            "the last byte verified", ["outcome"], buckets=DURATION_BUCKETS)
        self._digest_failures = prometheus_client.Counter(
            "sglang_mx_digest_failures", "Seeds (or seed instances) refused because bytes pulled from them did not "
            "match their published digests")
        self._leases_granted = prometheus_client.Counter(
            "sglang_mx_leases_granted", "Reader leases granted by this process's seeds (renewals not counted)")
        self._leases_held = prometheus_client.Gauge(
            "sglang_mx_leases_held", "Reader leases held now on this process's seeds", multiprocess_mode="livesum")
        self._bytes_served = prometheus_client.Counter(
            "sglang_mx_bytes_served", "UPPER BOUND, not measured: for each reader lease granted, the bytes the seed "
            "rank publishes. Mooncake reads bypass the seed's code; a target striping over N seeds reads about 1/N; "
            "readers without a lease are not counted")

    def pulled(self, nbytes: int) -> None:
        if self.enabled and nbytes > 0:
            self._bytes_pulled.inc(nbytes)

    def pull_finished(self, seconds: float, *, ok: bool) -> None:
        if self.enabled:
            self._pull_duration.labels("ok" if ok else "failed").observe(seconds)

    def digest_failed(self) -> None:
        if self.enabled:
            self._digest_failures.inc()

    def lease_granted(self, published_bytes: int) -> None:
        if self.enabled:
            self._leases_granted.inc()
            if published_bytes > 0:
                self._bytes_served.inc(published_bytes)

    def leases_held_changed(self, delta: int) -> None:
        if self.enabled and delta:
            self._leases_held.inc(delta)


_metrics: Metrics | None = None
_lock = threading.Lock()


def metrics() -> Metrics:
    """This process's instruments, made on first use (a name can be registered once per process)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics
