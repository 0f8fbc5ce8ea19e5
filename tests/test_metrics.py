"""sglang_mx.metrics: the counters move, and in multiprocess mode they reach a collector as SGLang's /metrics
builds it (a fresh registry over PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import textwrap

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from sglang_mx import metrics as metrics_module
from sglang_mx.leases import ReaderLeases
from sglang_mx.metrics import Metrics, metrics
from tests.fakes import FakeClock
from tests.target.test_fleet_policy import MB, FakeClient, FakeEngine, pull


def sample(name: str, **labels) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_pull_counts_its_bytes_and_duration(fake_leases):
    metrics()  # registered before the first sample is read
    pulled, ok = sample("sglang_mx_bytes_pulled_total"), sample("sglang_mx_pull_duration_seconds_count",
                                                                 outcome="ok")
    pull(FakeClient(["a", "b"]), FakeEngine(), FakeClock(), max_seeds=2)
    assert sample("sglang_mx_bytes_pulled_total") - pulled == 6 * MB
    assert sample("sglang_mx_pull_duration_seconds_count", outcome="ok") - ok == 1


def test_a_seed_failing_its_digests_is_counted_once(fake_leases):
    failures = sample("sglang_mx_digest_failures_total")
    wrong_once = {"w2"}

    def verifier(expected):
        bad = [n for n in expected if n in wrong_once]
        wrong_once.clear()
        return bad

    pull(FakeClient(["a", "b", "c"]), FakeEngine(), FakeClock(), verifier=verifier, max_seeds=3, verify="require")
    assert sample("sglang_mx_digest_failures_total") - failures == 1


def test_leases_granted_held_and_the_bytes_they_cover():
    granted, held = sample("sglang_mx_leases_granted_total"), sample("sglang_mx_leases_held")
    served = sample("sglang_mx_bytes_served_total")
    clock = FakeClock()
    leases = ReaderLeases(max_readers=2, ttl_s=10, clock=clock, published_bytes=1000)
    one = leases.acquire()
    leases.acquire()
    assert leases.acquire() is None  # refused: not counted
    assert sample("sglang_mx_leases_granted_total") - granted == 2
    assert sample("sglang_mx_bytes_served_total") - served == 2000
    assert sample("sglang_mx_leases_held") - held == 2
    leases.release(one)
    assert sample("sglang_mx_leases_held") - held == 1
    clock.now = 11.0  # two expires
    assert leases.active() == 0 and sample("sglang_mx_leases_held") - held == 0
    leases.acquire()
    leases.close()  # the seed closes with a lease held
    assert sample("sglang_mx_leases_held") - held == 0


def test_without_prometheus_client_every_call_does_nothing(monkeypatch):
    real = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("prometheus_client"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    m = Metrics()
    assert not m.enabled
    m.pulled(1)
    m.pull_finished(1.0, ok=True)
    m.digest_failed()
    m.lease_granted(1)
    m.leases_held_changed(1)


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_package_and_its_plugin_does_not_import_prometheus_client():
    # SGLang imports the plugin in its launcher before it sets PROMETHEUS_MULTIPROC_DIR; prometheus_client
    # imported then would keep every metric of that process out of SGLang's /metrics.
    out = _python("""
        import sys
        import sglang_mx.metrics, sglang_mx.target, sglang_mx.seed, sglang_mx.leases, sglang_mx.sglang.plugin
        print("prometheus_client" in sys.modules)
    """, {})
    assert out.strip() == "False"


def test_in_multiprocess_mode_the_metrics_reach_a_collector_over_the_directory(tmp_path):
    # What a scheduler process does when SGLang runs with --enable-metrics ...
    _python("""
        from sglang_mx.leases import ReaderLeases
        from sglang_mx.metrics import metrics
        assert metrics().multiprocess
        metrics().pulled(123)
        metrics().pull_finished(2.0, ok=True)
        ReaderLeases(published_bytes=7).acquire()
    """, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    # ... and what SGLang's /metrics serves (add_prometheus_middleware: a fresh registry, the collector).
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    text = generate_latest(registry).decode()
    assert "sglang_mx_bytes_pulled_total 123.0" in text
    assert 'sglang_mx_pull_duration_seconds_count{outcome="ok"} 1.0' in text
    assert "sglang_mx_leases_granted_total 1.0" in text and "sglang_mx_bytes_served_total 7.0" in text
    assert "sglang_mx_leases_held 1.0" in text


def test_the_instruments_are_made_once_per_process():
    assert metrics() is metrics() and isinstance(metrics_module.metrics(), Metrics)
