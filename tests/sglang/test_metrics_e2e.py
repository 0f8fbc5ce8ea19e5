"""Our Prometheus metrics in SGLang's own /metrics endpoint (--enable-metrics): the seed's leases, the
target's pulled bytes, both written by scheduler processes into SGLang's PROMETHEUS_MULTIPROC_DIR."""

import urllib.request

from sglang_mx.sglang.launch import TARGET_ARGS, SglangServer, seed_args
from tests.sglang.conftest import require_sglang

require_sglang()


def scrape(server: SglangServer) -> dict[str, float]:
    """Unlabelled sglang_mx_* samples of the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("sglang_mx_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_seed_and_target_export_their_counters_through_sglangs_metrics(tiny_model, mx_server, servers):
    mx = {"url": mx_server.address, "heartbeat_interval_s": 1}
    seed = SglangServer(tiny_model, *seed_args(), "--enable-metrics", mx_config={**mx, "source": True}, name="seed")
    servers.append(seed)
    seed.wait_ready()
    target = SglangServer(tiny_model, *TARGET_ARGS, "--enable-metrics", mx_config=mx, name="target")
    servers.append(target)
    target.wait_ready()

    pulled = scrape(target)
    assert pulled["sglang_mx_bytes_pulled_total"] > 0
    assert pulled['sglang_mx_pull_duration_seconds_count{outcome="ok"}'] == 1
    assert pulled.get("sglang_mx_digest_failures_total", 0) == 0
    served = scrape(seed)
    assert served["sglang_mx_leases_granted_total"] == 1
    assert served["sglang_mx_bytes_served_total"] >= pulled["sglang_mx_bytes_pulled_total"]
    assert served["sglang_mx_leases_held"] == 0  # the target released its lease
