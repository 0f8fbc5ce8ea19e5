"""After SGLang gives a seed's memory back (resume_memory_occupation), the seed goes READY again only
with the digests it published before; fake publications (named as such) record what happens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_mx.sglang import process
from sglang_mx.sglang import publish as publish_module


class FakePublisher:
    def __init__(self, digests):
        self.worker_id, self.worker_rank, self.mx_source_id = "inst-rank0", 0, "id"
        self.digests = dict(digests)
        self.ready = self.closed = False

    def mark_ready(self):
        self.ready = True

    def close(self):
        self.closed = True


@pytest.fixture
def state(monkeypatch):
    holder = {"digests": {"a": "xxh3-64:" + "1" * 16, "b": "xxh3-64:" + "2" * 16}}
    monkeypatch.setattr(publish_module, "publish", lambda *a, **k: FakePublisher(holder["digests"]))
    s = process.ProcessState()
    s.sources.append(process.Source(engine=None, session_id="", role=SimpleNamespace(config=SimpleNamespace(
        model_name=None)), model=lambda: None, rank_info=lambda: SimpleNamespace(model_path="/m"), first_path="/m"))
    s.publishers.append(FakePublisher(holder["digests"]))
    return s, holder


def test_unchanged_memory_goes_ready_again(state):
    s, _ = state
    process.withdraw(s, why="release_memory_occupation")
    assert s.publishers == [] and "inst-rank0" in s.withdrawn
    process.republish(s, unchanged_only=True)
    [again] = s.publishers
    assert again.ready and not again.closed


def test_changed_memory_stays_withdrawn_naming_the_tensors(state, caplog):
    s, holder = state
    process.withdraw(s, why="release_memory_occupation")
    holder["digests"] = {**holder["digests"], "b": "xxh3-64:" + "3" * 16}  # what came back differs
    process.republish(s, unchanged_only=True)
    assert s.publishers == []
    assert "stays withdrawn" in caplog.text and "1 tensor(s) differ" in caplog.text and "(b)" in caplog.text
