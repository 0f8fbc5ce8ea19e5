"""Fixtures of the SGLang tests: a tiny local model, a metadata server, the servers a test starts."""

import importlib.util
import subprocess
import sys

import pytest

from sglang_mx.client import MetadataClient
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.sglang.launch import CPU_ENV, make_tiny_llama, sglang_env


def require_sglang() -> None:
    """Skip the calling test module when SGLang is missing (scripts/setup.sh installs 0.5.23)."""
    # Found, not imported: importing SGLang here needs the CPU workarounds its processes get.
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("SGLang is not installed (bash scripts/setup.sh installs 0.5.23)", allow_module_level=True)

HEARTBEAT_TIMEOUT_S = 4.0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def checkpoint_b(tmp_path_factory):
    """The tiny Llama's shapes with other weights (another seed): what a target starts "on other weights"."""
    out = tmp_path_factory.mktemp("tiny-llama-b")
    subprocess.run([sys.executable, str(CPU_ENV / "make_tiny_llama.py"), str(out), "--seed", "1"],
                   env=sglang_env(), check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture
def mx_server():
    """A metadata server with a short heartbeat timeout, so dead seeds drop fast."""
    options = ServerOptions(host="127.0.0.1", port=0, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
                            reaper_interval_s=1.0, gc_timeout_s=600)
    with MetadataServer(options) as server:
        yield server


@pytest.fixture
def mx_client(mx_server):
    with MetadataClient(mx_server.address, timeout_s=5) as client:
        yield client


@pytest.fixture
def servers():
    """Every SGLang server a test starts; all stopped at teardown."""
    started = []
    yield started
    for server in started:
        server.stop()
