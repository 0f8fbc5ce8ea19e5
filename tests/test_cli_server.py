"""`sglang-mx server` as a real process: comes up SERVING, stops cleanly on SIGTERM/SIGINT,
refuses bad flags."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sglang_mx import wire

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
