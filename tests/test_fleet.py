"""The fleet view: pure formatting, collection from a live server, and `sglang-mx sources` end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sglang_mx import fleet
from sglang_mx.client import MetadataClient
from sglang_mx.fleet import FleetRow, format_age, format_bytes, render_json, render_table
from sglang_mx.records import SourceStatus

NOW = 1_800_000_000_000


@pytest.mark.parametrize("age_ms, text", [
    (0, "0s"), (999, "0s"), (3_400, "3s"), (59_999, "59s"), (60_000, "1m"), (150_000, "2m"),
    (3_599_999, "59m"), (3_600_000, "1h"), (5 * 3_600_000 + 1, "5h"), (86_400_000, "1d"), (3 * 86_400_000, "3d"),
    (-5_000, "0s"),
])
def test_format_age(age_ms, text):
    assert format_age(age_ms) == text


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (4096, "4.10 KB"), (12_288, "12.29 KB"), (512_000_000, "512 MB"),
    (1_033_000_000, "1.03 GB"), (681 * 10**9, "681 GB"), (2 * 10**12, "2.00 TB"), (5 * 10**18, "5000 PB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def _row(**overrides) -> FleetRow:
    fields = dict(model_name="Qwen/Qwen3-8B", mx_source_id="8b7aa4b533b72278", worker_id="pod-a-rank0",
                  worker_rank=0, status=SourceStatus.READY, updated_at_ms=NOW - 3_000, tensors=291,
                  total_bytes=8_190_000_000)
    fields.update(overrides)
    return FleetRow(**fields)


def test_render_table_aligns_columns():
    rows = [_row(tp_size=2, pp_size=1, ep_size=1, any_layout=True, manifest="0123456789abcdef" * 4),
            _row(worker_id="pod-b-rank1", worker_rank=1, status=SourceStatus.STALE, updated_at_ms=NOW - 150_000,
                 tensors=7, total_bytes=4096, tp_size=2, pp_size=2, ep_size=1),
            _row(worker_id="new", worker_rank=12, status=SourceStatus.INITIALIZING, updated_at_ms=0, tensors=0,
                 total_bytes=0)]
    assert render_table(rows, NOW) == (
        "MODEL          MX_SOURCE_ID      WORKER_ID    RANK  LAYOUT   STATUS        AGE  TENSORS    BYTES  MANIFEST\n"
        "Qwen/Qwen3-8B  8b7aa4b533b72278  pod-a-rank0     0  TP2/any  READY          3s      291  8.19 GB  "
        "0123456789abcdef\n"
        "Qwen/Qwen3-8B  8b7aa4b533b72278  pod-b-rank1     1  TP2,PP2  STALE          2m        7  4.10 KB  -\n"
        "Qwen/Qwen3-8B  8b7aa4b533b72278  new            12  TP?      INITIALIZING    -        0      0 B  -\n"
    )
    assert render_table([], NOW) == "no workers\n"


def test_render_json():
    data = json.loads(render_json([_row(), _row(worker_id="x", updated_at_ms=0)], NOW))
    assert data[0] == {"model_name": "Qwen/Qwen3-8B", "mx_source_id": "8b7aa4b533b72278",
                       "worker_id": "pod-a-rank0", "worker_rank": 0, "tp_size": 0, "pp_size": 0, "ep_size": 0,
                       "any_layout": False, "status": "READY", "updated_at_ms": NOW - 3000,
                       "age_s": 3.0, "tensors": 291, "total_bytes": 8_190_000_000, "manifest": None,
                       "pulling": False, "verified_bytes": None, "depth": None}
    assert data[1]["age_s"] is None
    assert render_json([], NOW) == "[]\n"


@pytest.mark.parametrize("status, verified, total, text", [
    (SourceStatus.INITIALIZING, 0, 1000, "PULLING 0%"),
    (SourceStatus.INITIALIZING, 420, 1000, "PULLING 42%"),
    (SourceStatus.INITIALIZING, 999, 1000, "PULLING 99%"),  # rounded down: 100% only when done
    (SourceStatus.INITIALIZING, 1000, 1000, "PULLING 100%"),
    (SourceStatus.INITIALIZING, 0, 0, "PULLING 100%"),
    (SourceStatus.INITIALIZING, None, 1000, "INITIALIZING"),  # no progress reported: not a pulling target
    (SourceStatus.READY, 1000, 1000, "READY"),
])
def test_status_text_of_a_pulling_target(status, verified, total, text):
    row = _row(status=status, verified_bytes=verified, total_bytes=total)
    assert row.status_text == text
    assert row.pulling == text.startswith("PULLING")


def test_a_pulling_target_in_the_table_and_the_json():
    rows = [_row(worker_id="pull", status=SourceStatus.INITIALIZING, verified_bytes=3_440_000_000, depth=2)]
    assert render_table(rows, NOW).splitlines()[1].split()[5:7] == ["PULLING", "42%"]
    [data] = json.loads(render_json(rows, NOW))
    assert (data["status"], data["pulling"], data["verified_bytes"], data["depth"]) == (
        "INITIALIZING", True, 3_440_000_000, 2)


# --- against a live server ------------------------------------------------------------------------------

@pytest.fixture
def fleet_server(server, make_identity, make_worker):
    """Two models: Qwen with a READY rank 0 and an INITIALIZING rank 1, another model STALE."""
    with MetadataClient(server.address, timeout_s=5) as client:
        qwen = make_identity()
        client.publish(qwen, make_worker(worker_rank=1, n_tensors=5, status=SourceStatus.INITIALIZING), "q-rank1")
        client.publish(qwen, make_worker(worker_rank=0, n_tensors=3, status=SourceStatus.READY), "q-rank0")
        client.publish(make_identity(model_name="org/other", tensor_parallel_size=1),
                       make_worker(worker_rank=0, n_tensors=1, status=SourceStatus.STALE), "o-rank0")
    return server


def test_collect_reads_status_and_sizes_per_worker(fleet_server):
    with MetadataClient(fleet_server.address, timeout_s=5) as client:
        rows = fleet.collect(client)
        assert [(r.model_name, r.worker_id, r.worker_rank, r.status, r.tensors, r.total_bytes) for r in rows] == [
            ("Qwen/Qwen3-8B", "q-rank0", 0, SourceStatus.READY, 3, 3 * 4096),
            ("Qwen/Qwen3-8B", "q-rank1", 1, SourceStatus.INITIALIZING, 5, 5 * 4096),
            ("org/other", "o-rank0", 0, SourceStatus.STALE, 1, 4096),
        ]
        assert all(r.updated_at_ms > 0 for r in rows)
        # The manifest a pinned target would compute from the record, for its id and rank.
        from sglang_mx.manifest import manifest_id
        stored = client.get_metadata(rows[0].mx_source_id, "q-rank0")
        assert rows[0].manifest == manifest_id(rows[0].mx_source_id, 0, stored.worker.tensors)
        assert len({r.manifest for r in rows}) == 3
        assert [r.worker_id for r in fleet.collect(client, model_name="org/other")] == ["o-rank0"]


def test_collect_reads_a_pulling_targets_progress_and_depth(server, make_identity, make_worker):
    with MetadataClient(server.address, timeout_s=5) as client:
        source = client.publish(make_identity(), make_worker(0, n_tensors=4, status=SourceStatus.INITIALIZING,
                                                             topology={"mx_depth": "2"}), "target")
        client.publish(make_identity(), make_worker(1, status=SourceStatus.INITIALIZING,
                                                    topology={"mx_depth": "deep"}), "odd")
        client.update_status(source, "target", 0, SourceStatus.INITIALIZING, verified_bytes=4096)
        rows = {r.worker_id: r for r in fleet.collect(client)}
    target = rows["target"]
    assert (target.verified_bytes, target.total_bytes, target.depth, target.status_text) == (
        4096, 4 * 4096, 2, "PULLING 25%")
    assert (rows["odd"].verified_bytes, rows["odd"].depth, rows["odd"].status_text) == (None, None, "INITIALIZING")


def test_collect_skips_a_worker_that_vanishes_after_the_listing(fleet_server):
    with MetadataClient(fleet_server.address, timeout_s=5) as client:
        real_get = client.get_metadata
        client.get_metadata = lambda source, wid: None if wid == "q-rank1" else real_get(source, wid)
        assert [r.worker_id for r in fleet.collect(client)] == ["q-rank0", "o-rank0"]


def _sources(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_mx.cli", "sources", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.mark.slow  # `sglang-mx sources` processes
def test_cli_table_and_json(fleet_server):
    done = _sources("--url", fleet_server.address)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "MX_SOURCE_ID", "WORKER_ID", "RANK", "LAYOUT", "STATUS", "AGE", "TENSORS",
                                "BYTES", "MANIFEST"]
    assert [line.split()[2:4] + line.split()[5:6] for line in lines[1:]] == [
        ["q-rank0", "0", "READY"], ["q-rank1", "1", "INITIALIZING"], ["o-rank0", "0", "STALE"]]
    assert lines[1].split()[-4:-1] == ["3", "12.29", "KB"] and len(lines[1].split()[-1]) == 16
    assert lines[1].split()[6].endswith("s")

    done = _sources("--url", f"grpc://{fleet_server.address}", "--model", "Qwen/Qwen3-8B", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [(d["worker_id"], d["status"], d["tensors"], d["total_bytes"]) for d in data] == [
        ("q-rank0", "READY", 3, 12288), ("q-rank1", "INITIALIZING", 5, 20480)]
    assert all(0 <= d["age_s"] < 60 for d in data)
    assert all(len(d["manifest"]) == 64 and d["manifest"].startswith(line.split()[-1])
               for d, line in zip(data, lines[1:3]))


@pytest.mark.slow  # `sglang-mx sources` processes
def test_cli_with_token_and_tls(make_server, tmp_path, make_identity, make_worker):
    pytest.importorskip("cryptography")
    from tests.certs import make_self_signed

    tls = make_self_signed(tmp_path / "tls")
    (tmp_path / "token").write_text("tok\n")
    server = make_server(auth_token_file=str(tmp_path / "token"), tls_cert_file=tls.cert, tls_key_file=tls.key)
    with MetadataClient(server.address, auth_token="tok", tls_ca_file=tls.cert, timeout_s=5) as client:
        client.publish(make_identity(), make_worker(), "w0")
    done = _sources("--url", server.address, "--auth-token-file", str(tmp_path / "token"), "--tls-ca-file", tls.cert,
                    "--json")
    assert done.returncode == 0, done.stderr
    assert [d["worker_id"] for d in json.loads(done.stdout)] == ["w0"]
    done = _sources("--url", server.address, "--tls-ca-file", tls.cert)
    assert done.returncode == 2
    assert "UNAUTHENTICATED" in done.stderr and "missing bearer token" in done.stderr


@pytest.mark.slow  # `sglang-mx sources` processes
def test_cli_errors(unused_port, tmp_path):
    done = _sources("--url", f"127.0.0.1:{unused_port}", "--timeout", "1")
    assert done.returncode == 2
    assert f"ListSources to metadata server 127.0.0.1:{unused_port} failed" in done.stderr
    (tmp_path / "empty").write_text("")
    done = _sources("--auth-token-file", str(tmp_path / "empty"))
    assert done.returncode == 2 and "is empty" in done.stderr
    done = _sources("--watch", "0")
    assert done.returncode == 2 and "--watch 0 must be a positive number of seconds" in done.stderr


@pytest.mark.slow  # `sglang-mx sources` processes
def test_cli_watch_refreshes_until_ctrl_c(fleet_server, tmp_path):
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sglang_mx.cli", "sources", "--url", fleet_server.address,
                                 "--watch", "1"], stdout=out, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 30
        while out_path.read_text().count("# ") < 2:  # two renders, then Ctrl-C during the wait for a third
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"no second render: {out_path.read_text()!r}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)  # a loaded machine (CI) is slow to tear a Python process down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, proc.stderr.read()
    text = out_path.read_text()
    renders = text.split("# ")[1:]
    assert len(renders) == 2, text
    for render in renders:
        header, *table = render.splitlines()
        assert header.startswith(f"{fleet_server.address} at ") and header.endswith("every 1 s")
        assert [line.split()[2] for line in table[1:]] == ["q-rank0", "q-rank1", "o-rank0"]
