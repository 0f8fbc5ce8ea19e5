"""Which threads answer what: big reads on the bulk pool at a lower CPU priority, listings not.

A real server on 127.0.0.1 over a recording store (a MemoryStore that notes, in each call,
the thread it runs on and that thread's own nice value: a fake only in what it records).
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

from sglang_mx.client import MetadataClient
from sglang_mx.errors import ConfigError
from sglang_mx.records import SourceStatus
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.server.app import lower_thread_priority
from sglang_mx.server.memory_store import MemoryStore
from tests.conftest import sample_identity, sample_worker

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class RecordingStore(MemoryStore):
    """MemoryStore noting (thread name, thread nice) for each get_bytes and list call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, list[tuple[str, int]]] = {"get_bytes": [], "list": []}

    def get_bytes(self, mx_source_id, worker_id):
        self.seen["get_bytes"].append((threading.current_thread().name, _thread_nice()))
        return super().get_bytes(mx_source_id, worker_id)

    def list(self, query):
        self.seen["list"].append((threading.current_thread().name, _thread_nice()))
        return super().list(query)


def _serve_once(bulk_nice: int) -> RecordingStore:
    store = RecordingStore()
    with MetadataServer(ServerOptions(host="127.0.0.1", port=0, bulk_nice=bulk_nice), store) as server, \
            MetadataClient(server.address) as client:
        source = client.publish(sample_identity(), sample_worker(status=SourceStatus.READY), "w0")
        for _ in range(3):
            refs = client.list_sources(sample_identity(), status=SourceStatus.READY)
            assert [r.worker_id for r in refs] == ["w0"]
            assert client.get_metadata(source, "w0") is not None
    return store


@linux_only
def test_big_reads_run_on_the_bulk_pool_at_a_lower_priority_and_listings_do_not():
    base = _thread_nice()
    if base > 19 - 5:
        pytest.skip(f"this process already runs at nice {base}: no room to lower a thread by 5")
    store = _serve_once(bulk_nice=5)
    assert store.seen["get_bytes"] and all(name.startswith("mx-bulk") and nice == base + 5
                                           for name, nice in store.seen["get_bytes"]), store.seen
    assert store.seen["list"] and all(name.startswith("mx-fast") and nice == base
                                      for name, nice in store.seen["list"]), store.seen
    assert _thread_nice() == base  # the calling thread (and so the process's main thread) untouched


@linux_only
def test_bulk_nice_zero_keeps_one_priority():
    base = _thread_nice()
    store = _serve_once(bulk_nice=0)
    assert {nice for _, nice in store.seen["get_bytes"] + store.seen["list"]} == {base}


@linux_only
def test_lower_thread_priority_stops_at_19_and_changes_only_its_own_thread():
    got = []
    worker = threading.Thread(target=lambda: (lower_thread_priority(40), got.append(_thread_nice())))
    before = _thread_nice()
    worker.start()
    worker.join()
    assert got == [19]
    assert _thread_nice() == before


@pytest.mark.parametrize("nice", [-1, 20])
def test_bulk_nice_out_of_range_is_refused_naming_the_range(nice):
    with pytest.raises(ConfigError, match=rf"bulk_nice={nice} is out of range; allowed: 0-19"):
        ServerOptions(bulk_nice=nice)
