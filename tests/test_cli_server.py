"""`sglang-mx server` as a real process: comes up SERVING, stops cleanly on SIGTERM/SIGINT,
refuses bad flags."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.errors import ServerError
from sglang_mx.server.options import SERVING_BULK_NICE

pytestmark = pytest.mark.slow  # `sglang-mx server` processes

START_TIMEOUT_S = 15


def _server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sglang_mx.cli", "server", *args]


def _wait_serving(address: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, f"server exited early with {proc.returncode}"
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME), timeout=0.5)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"server on {address} not SERVING after {START_TIMEOUT_S} s"
            time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_stops_cleanly_on_signal(tmp_path, unused_port, signum):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _server_cmd("--host", "127.0.0.1", "--port", str(unused_port)), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_serving(f"127.0.0.1:{unused_port}", proc)
        sent = time.monotonic()
        proc.send_signal(signum)
        rc = proc.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert rc == 0, output
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert f"received {signum.name}" in output
    assert "metadata server stopped" in output


@pytest.mark.parametrize(
    "args, named",
    [
        (["--port", "70000"], "port=70000"),
        (["--port", "-1"], "port=-1"),
        (["--port", "abc"], "--port"),
        (["--heartbeat-timeout", "0"], "heartbeat_timeout_s=0"),
        (["--max-message-mb", "0"], "max_message_mb=0"),
    ],
)
def test_bad_flags_exit_non_zero_naming_the_flag(args, named):
    done = subprocess.run(_server_cmd("--host", "127.0.0.1", *args), capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert named in done.stderr


def test_busy_port_is_refused(server):
    done = subprocess.run(_server_cmd("--host", "127.0.0.1", "--port", str(server.port)),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{server.port}" in done.stderr


def _thread_nices(pid: int) -> dict[int, int]:
    """Each thread of process `pid` and its own nice value."""
    tids = [int(task.name) for task in pathlib.Path(f"/proc/{pid}/task").iterdir()]
    return {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_standalone_server_answers_big_reads_at_a_lower_priority(tmp_path, unused_port, make_identity,
                                                               make_worker):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base >= 19:
        pytest.skip("this process already runs at nice 19: nothing can be lower")
    address = f"127.0.0.1:{unused_port}"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(_server_cmd("--host", "127.0.0.1", "--port", str(unused_port)), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        _wait_serving(address, proc)
        before = _thread_nices(proc.pid)
        with MetadataClient(address) as client:
            source = client.publish(make_identity(), make_worker(), "w0")  # a bulk thread starts
            assert client.get_metadata(source, "w0") is not None
        after = _thread_nices(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert set(before.values()) == {base}, before
    lowered = {tid for tid, nice in after.items() if nice == min(19, base + SERVING_BULK_NICE)}
    assert lowered and not lowered & set(before), after
    assert after[proc.pid] == base  # the process (its main thread) keeps its priority


def test_quota_flags_reach_the_server(tmp_path, unused_port, make_identity, make_worker):
    address = f"127.0.0.1:{unused_port}"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(_server_cmd("--host", "127.0.0.1", "--port", str(unused_port),
                                            "--max-records-per-principal", "1", "--max-mb-per-principal", "1"),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(address, proc)
        with MetadataClient(address) as client:
            client.publish(make_identity(), make_worker(), "w0")
            with pytest.raises(ServerError, match=r"holds 1 records; 1 more would pass the limit of 1 per writer "
                                                  r"\(raise it with --max-records-per-principal\)"):
                client.publish(make_identity(), make_worker(), "w1")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_max_watchers_reaches_the_server(tmp_path, unused_port):
    address = f"127.0.0.1:{unused_port}"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(_server_cmd("--host", "127.0.0.1", "--port", str(unused_port), "--max-watchers", "1"),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(address, proc)
        with MetadataClient(address) as client, client.watch_sources("0123456789abcdef"):
            with pytest.raises(ServerError, match=r"its limit \(--max-watchers 1\)"):
                client.watch_sources("0123456789abcdef")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("flag", ["--max-records-per-principal", "--max-mb-per-principal", "--max-watchers"])
def test_quota_flags_must_be_positive(flag, capsys):
    from sglang_mx.cli import main

    assert main(["server", "--host", "127.0.0.1", flag, "0"]) == 2
    option = flag[2:].replace("-", "_")
    assert f"sglang-mx: error: {option}=0 must be >= 1" in capsys.readouterr().err
