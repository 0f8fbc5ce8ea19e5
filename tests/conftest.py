"""Fixtures shared by every test: a metadata server on 127.0.0.1, a client, sample records.

Kept generic on purpose; subpackages (tests/sglang/) add their own conftest.py.

The test tiers: `pytest -m "not slow"` is the fast tier (about two minutes: every pure
module, the in-process servers, one shared redis-server). A test is slow when its module
says so (`pytestmark = pytest.mark.slow`: it starts processes of its own or moves hundreds
of MB), when it uses a fixture that starts processes (SPAWNING_FIXTURES), or when it lives
in a folder of such tests (SLOW_FOLDERS); `pytest_collection_modifyitems` marks the last two.
"""

from __future__ import annotations

import itertools
import pathlib
import socket
import time
from typing import Callable, Iterator

import pytest

from sglang_mx.client import MetadataClient
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.records import (
    BackendFramework,
    SourceIdentity,
    SourceStatus,
    TensorDescriptor,
    WorkerRecord,
)


# Fixtures that start processes for one test (seed processes, redis-servers of its own).
SPAWNING_FIXTURES = frozenset({"seeds", "make_redis_server"})
# Folders (under tests/) whose every test starts real SGLang servers or their processes.
SLOW_FOLDERS = frozenset({"sglang"})
_TESTS = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        folder = pathlib.Path(str(item.fspath)).relative_to(_TESTS).parts[0]
        if folder in SLOW_FOLDERS or SPAWNING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def sample_identity(**overrides) -> SourceIdentity:
    """The golden Qwen/Qwen3-8B SGLang TP2 identity (mx_source_id 8b7aa4b533b72278), with overrides."""
    fields = dict(
        mx_version="0.7.0",
        model_name="Qwen/Qwen3-8B",
        backend_framework=BackendFramework.SGLANG,
        tensor_parallel_size=2,
        pipeline_parallel_size=1,
        expert_parallel_size=1,
        dtype="bfloat16",
    )
    fields.update(overrides)
    return SourceIdentity(**fields)


def sample_tensors(n: int = 3, *, prefix: str = "model.layers", base_addr: int = 0x7F00_0000_0000,
                   size: int = 4096) -> tuple[TensorDescriptor, ...]:
    return tuple(
        TensorDescriptor(name=f"{prefix}.{i}.weight", addr=base_addr + i * size, size=size, dtype="bfloat16")
        for i in range(n)
    )


def sample_worker(
    worker_rank: int = 0,
    *,
    n_tensors: int = 3,
    prefix: str = "model.layers",
    session: str = "127.0.0.1:15000",
    status: SourceStatus = SourceStatus.READY,
    updated_at_ms: int = 0,
    **overrides,
) -> WorkerRecord:
    """A worker record with `n_tensors` distinct, non-overlapping descriptors."""
    return WorkerRecord(
        worker_rank=worker_rank,
        transfer_engine_session_id=session,
        tensors=sample_tensors(n_tensors, prefix=prefix),
        status=status,
        updated_at_ms=updated_at_ms,
        **overrides,
    )


def free_port() -> int:
    """A port nothing listens on right now (closed again before returning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], *, timeout_s: float, interval_s: float = 0.02,
               what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture
def make_identity() -> Callable[..., SourceIdentity]:
    return sample_identity


@pytest.fixture
def make_worker() -> Callable[..., WorkerRecord]:
    return sample_worker


@pytest.fixture
def make_server() -> Iterator[Callable[..., MetadataServer]]:
    """Factory: make_server(heartbeat_timeout_s=1, reaper_interval_s=0.05, ...) -> a started server.

    Every server it made is stopped at teardown.
    """
    started: list[MetadataServer] = []

    def _make(**options) -> MetadataServer:
        options.setdefault("host", "127.0.0.1")
        options.setdefault("port", 0)
        server = MetadataServer(ServerOptions(**options)).start()
        started.append(server)
        return server

    yield _make
    for server in started:
        server.stop(grace_s=0.5)


@pytest.fixture
def server(make_server) -> MetadataServer:
    """A started server with the default timeouts, on a free port of 127.0.0.1."""
    return make_server()


@pytest.fixture
def client(server) -> Iterator[MetadataClient]:
    with MetadataClient(server.address, timeout_s=5.0) as c:
        yield c


@pytest.fixture
def engine():
    """A Mooncake TransferEngine on loopback tcp, for the test process's side of a transfer."""
    from sglang_mx.transfer.engine import MooncakeEngine

    with MooncakeEngine.create("127.0.0.1", protocol="tcp") as e:
        yield e


@pytest.fixture
def fake_leases(monkeypatch):
    """sglang_mx.leases.acquire replaced by tests.fakes.FakeLeases (grants and releases recorded)."""
    from sglang_mx import leases
    from tests.fakes import FakeLeases

    book = FakeLeases()
    monkeypatch.setattr(leases, "acquire", book.acquire)
    return book


@pytest.fixture
def seeds():
    """Seed processes (tests.procs.SeedProcess) a test starts: append them; all killed at teardown."""
    started = []
    yield started
    for seed in started:
        seed.kill()


@pytest.fixture
def wait_for() -> Callable[..., object]:
    """`wait_for(predicate, timeout_s=..., what=...)`: poll with a bounded deadline."""
    return wait_until


@pytest.fixture
def unused_port() -> int:
    return free_port()


# --- Redis ------------------------------------------------------------------------------------------

_prefixes = itertools.count()


def _require_redis_server() -> None:
    from tests.procs.redis_server import REDIS_SERVER

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); the Redis store tests need it")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server (no persistence) for the whole session; tests isolate by key prefix."""
    _require_redis_server()
    from tests.procs.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses: an empty store on the shared redis-server."""
    return f"test{next(_prefixes)}:"


@pytest.fixture
def make_redis_server(tmp_path):
    """Factory: make_redis_server(appendonly=False) -> a started redis-server of this test's own."""
    _require_redis_server()
    from tests.procs.redis_server import RedisServer

    started = []

    def _make(**options):
        server = RedisServer(tmp_path / f"redis{len(started)}", **options).start()
        started.append(server)
        return server

    yield _make
    for server in started:
        server.stop()
