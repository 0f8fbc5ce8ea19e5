"""Run SGLang server processes on this machine: the demo, the benchmarks and the tests.

`SglangServer` starts `python -m sglang.launch_server` in its own process group
on 127.0.0.1 (every byte stays on loopback: `SGLANG_HOST_IP` and Mooncake's
tcp protocol are set), waits for it, generates greedily and stops it; the log
parsers read SGLang's and our own load lines. On a CPU-only machine SGLang
0.5.23 needs the test-environment workarounds in a source checkout's
`scripts/sglang_cpu/` (put on the processes' PYTHONPATH when present).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the source checkout, when run from one
CPU_ENV = ROOT / "scripts" / "sglang_cpu"  # CPU workarounds and the tiny-model maker (a checkout only)
PROMPTS = [[432, 461], [5, 17, 99, 250, 3], [300, 301, 302, 303, 304, 305, 306, 307]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sglang_env(tp: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(CPU_ENV), str(ROOT)] if CPU_ENV.is_dir() else []
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        HF_HUB_OFFLINE="1",
        SGLANG_HOST_IP="127.0.0.1",  # advertise loopback, never the machine's address
        MOONCAKE_PROTOCOL="tcp",
    )
    if tp == 2:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = "0|1"
    return env


def make_tiny_llama(out: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, str(CPU_ENV / "make_tiny_llama.py"), str(out)], env=sglang_env(),
                   check=True, capture_output=True, timeout=300)
    return out


LLAMA_HIDDEN, LLAMA_INTER, LLAMA_VOCAB = 2048, 5632, 32000


def make_llama(out: pathlib.Path, size_gb: float) -> pathlib.Path:
    """A random Llama-shaped bf16 model (hidden 2048, as TinyLlama) of about `size_gb` GB."""
    h, i, v = LLAMA_HIDDEN, LLAMA_INTER, LLAMA_VOCAB
    per_layer = 2 * (2 * h * h + 2 * h * 512 + 3 * h * i)
    layers = max(1, round((size_gb * 1e9 - 2 * 2 * v * h) / per_layer))
    subprocess.run([sys.executable, str(CPU_ENV / "make_tiny_llama.py"), str(out), "--layers", str(layers),
                    "--hidden", str(h), "--intermediate", str(i), "--heads", "16", "--kv-heads", "4",
                    "--vocab", str(v)], env=sglang_env(), check=True, capture_output=True, timeout=600)
    return out


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only); False when not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class SglangServer:
    """`python -m sglang.launch_server` in its own process group."""

    def __init__(self, model: pathlib.Path, *args: str, tp: int = 1, mx_config: dict | None = None,
                 name: str = "sglang", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.name = name
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
                "--host", "127.0.0.1", "--port", str(self.port), "--max-total-tokens", "8192",
                "--tp", str(tp), "--skip-server-warmup", "--sleep-on-idle", *args]
        if mx_config is not None:
            argv += ["--modelexpress-config", json.dumps(mx_config)]
        self.log_path = pathlib.Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, env={**sglang_env(tp), **(env or {})}, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 240) -> "SglangServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise AssertionError(f"{self.name} not ready in {timeout_s} s:\n{self.log[-4000:]}")

    def wait_exit(self, timeout_s: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} still running after {timeout_s} s:\n{self.log[-4000:]}") from None

    def generate(self, input_ids: list[int], max_new_tokens: int = 12) -> list[int]:
        body = json.dumps({"input_ids": input_ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/generate", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["output_ids"]

    def generations(self) -> list[list[int]]:
        return [self.generate(p) for p in PROMPTS]

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM to the launcher: SGLang's orderly shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def kill(self) -> None:
        """SIGKILL the whole process group: the instance vanishes without a word."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.terminate(30)
            except AssertionError:
                pass
        self.kill()


def weight_load_seconds(log: str) -> float:
    """SGLang's own 'Load weight end. elapsed=X s' (summed over ranks: the max)."""
    values = [float(line.split("elapsed=", 1)[1].split()[0])
              for line in log.splitlines() if "Load weight end. elapsed=" in line]
    if not values:
        raise AssertionError("no 'Load weight end' line in the log")
    return max(values)


def pull_stats(log: str) -> tuple[float, float, float]:
    """(GB, seconds, GB/s) of our 'modelexpress: pulled ...' lines, ranks added up."""
    gb = seconds = 0.0
    for line in log.splitlines():
        if "modelexpress: pulled" in line:
            words = line.split("modelexpress: pulled", 1)[1].split()
            gb += float(words[2])
            seconds = max(seconds, float(words[5]))
    if not gb:
        raise AssertionError("no 'modelexpress: pulled' line in the log")
    return gb, seconds, gb / seconds if seconds else 0.0


def _number_after(line: str, key: str) -> float:
    return float(line.split(key, 1)[1].split()[0].rstrip(";,s"))


def peer_phases(log: str) -> dict[str, float]:
    """The target's phase timings (seconds) from our log lines: build, collect, register,
    discover, metadata, transfer, verify (verify runs inside transfer)."""
    phases: dict[str, float] = {}
    for line in log.splitlines():
        if "modelexpress: model built and post-processed in" in line:
            phases["build"] = _number_after(line, "post-processed in")
        elif "modelexpress: tensors collected and identity fingerprinted in" in line:
            phases["collect"] = _number_after(line, "fingerprinted in")
        elif "modelexpress: phases " in line:
            for word in line.split("modelexpress: phases ", 1)[1].split():
                key, _, value = word.partition("=")
                if value:
                    phases[key] = float(value)
    return phases


def seed_args() -> list[str]:
    return ["--load-format", "auto", "--remote-instance-weight-loader-start-seed-via-transfer-engine",
            "--engine-info-bootstrap-port", str(free_port())]


TARGET_ARGS = ["--load-format", "remote_instance", "--remote-instance-weight-loader-backend", "modelexpress"]
