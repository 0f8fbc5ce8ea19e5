"""Pipelined cascade on real processes: a child reads only what a partial seed has verified,
is woken by its stream, keeps what it verified when its parent dies, and a pipelined target
turns into a full seed without its children noticing.

The partial parent is tests/procs/partial_seed_proc.py: a real PipelineSeed (its record, lease
endpoint and WatchVerified stream) over a real Mooncake engine in its own process, whose
"pull" the test steers. Its unverified tensors hold wrong bytes on purpose: a child that read
one would fail that tensor's digest and drop the parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from sglang_mx.chunks import spans, unit_name
from sglang_mx.errors import VerificationError
from sglang_mx.records import TOPOLOGY_DEPTH, TOPOLOGY_MANIFEST, TOPOLOGY_PIPELINE, SourceIdentity, SourceStatus
from sglang_mx.seed import SeedOptions
from sglang_mx.target import PullOptions, digest_verifier, pull_weights
from sglang_mx.target.pipeline import PipelineSeed
from sglang_mx.transfer.tensors import describe
from tests.procs import ROOT, SeedProcess, _readline, weights

pytestmark = pytest.mark.slow  # seed processes

IDENTITY = SourceIdentity(model_name="test/model", tensor_parallel_size=1, dtype="mixed")
SIZE_MB = 4
TRUTH = weights.build(SIZE_MB)
BIG = ["big.f32", "big.bf16"]  # what the parent verifies first


class PartialParent:
    def __init__(self, url: str, *argv: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="partial-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs.partial_seed_proc", "--url", url, "--size-mb", str(SIZE_MB), *argv],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True)
        line = _readline(self.proc, 120)
        assert line, open(self.log.name).read()[-3000:]
        self.info = json.loads(line)
        self.worker_id = self.info["worker_id"]

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert _readline(self.proc, 60).strip() == "ok", open(self.log.name).read()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def parents():
    started: list[PartialParent] = []
    yield started
    for p in started:
        p.kill()


class Pull:
    """A pipelined pull running in a thread of the test process (the child)."""

    def __init__(self, client, engine, *, pipeline: PipelineSeed | None = None, **options) -> None:
        self.local = weights.build(SIZE_MB, filled=False)
        self.client, self.engine = client, engine
        self.options = PullOptions(pipeline=True, verify="require", wait_timeout_s=60, **options)
        self.pipeline = pipeline
        self.report = self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.report = pull_weights(self.client, self.engine, IDENTITY, worker_rank=0, tensors=describe(self.local),
                                       options=self.options, verifier=digest_verifier(self.local),
                                       pipeline=self.pipeline)
        except Exception as e:  # reported by join()
            self.error = e

    def join(self, timeout_s: float = 60):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the pull did not end"
        if self.error is not None:
            raise self.error
        return self.report

    def holds(self, names) -> bool:
        return all(torch.equal(weights.as_bytes(self.local[n]), weights.as_bytes(TRUTH[n])) for n in names)

    def untouched(self, names) -> bool:
        return all(not weights.as_bytes(self.local[n]).any() for n in names)


def _bytes(names) -> int:
    return sum(TRUTH[n].numel() * TRUTH[n].element_size() for n in names)


def test_a_child_reads_only_what_its_partial_parent_verified_and_is_woken_by_its_stream(
        server, client, engine, parents, wait_for):
    parent = PartialParent(server.address)
    parents.append(parent)
    [ref] = client.list_sources(IDENTITY, status=SourceStatus.INITIALIZING, worker_rank=0)
    assert ref.topology[TOPOLOGY_PIPELINE] == "1" and ref.topology[TOPOLOGY_DEPTH] == "1"

    # A poll interval far longer than the test: only the parent's stream can wake the child.
    pull = Pull(client, engine, poll_interval_s=120)
    parent.tell("verify " + ",".join(BIG))
    wait_for(lambda: pull.holds(BIG), timeout_s=20, what="the verified tensors to arrive")
    rest = [n for n in TRUTH if n not in BIG and n != "lm_head.bf16" and TRUTH[n].numel()]
    time.sleep(0.5)  # the child has had every chance to read more
    assert pull.untouched(rest), "the child read tensors its parent had not verified"
    assert pull.thread.is_alive()

    started = time.monotonic()
    parent.tell("finish")
    report = pull.join(30)
    assert time.monotonic() - started < 20  # woken by the stream, not by the 120 s poll
    assert pull.holds(TRUTH)
    assert report.failures == ()  # no byte it read failed its digest
    assert report.served == {parent.worker_id: sum(
        TRUTH[n].numel() * TRUTH[n].element_size() for n in TRUTH if n != "lm_head.bf16")}
    assert report.rounds >= 2


def test_a_child_whose_parent_dies_attaches_elsewhere_and_keeps_what_it_verified(
        server, client, engine, parents, seeds, wait_for):
    parent = PartialParent(server.address)
    parents.append(parent)
    pull = Pull(client, engine, poll_interval_s=0.2)
    parent.tell("verify " + ",".join(BIG))
    wait_for(lambda: pull.holds(BIG), timeout_s=20, what="the verified tensors to arrive")
    parent.kill()  # SIGKILL mid-pull: its stream breaks, its memory is gone

    root = SeedProcess(server.address, size_mb=SIZE_MB)  # a full seed appears
    seeds.append(root)
    report = pull.join(60)
    assert pull.holds(TRUTH)
    total = sum(TRUTH[n].numel() * TRUTH[n].element_size() for n in TRUTH if n != "lm_head.bf16")
    assert report.served == {parent.worker_id: _bytes(BIG), root.worker_id: total - _bytes(BIG)}
    assert any(parent.worker_id in f.seed and "stopped serving" in f.reason for f in report.failures)


def test_a_pipelined_target_serves_its_child_while_it_pulls_and_ends_a_full_seed(
        server, client, engine, seeds, parents, wait_for):
    """A chain root -> middle (pipelined, a real PipelineSeed in this process) -> child (a partial-parent-free pull)."""
    root = SeedProcess(server.address, size_mb=SIZE_MB)
    seeds.append(root)
    from sglang_mx.transfer.engine import MooncakeEngine

    with MooncakeEngine.create("127.0.0.1", protocol="tcp") as middle_engine:
        local = weights.build(SIZE_MB, filled=False)
        seed = PipelineSeed(local, middle_engine, IDENTITY, client, worker_rank=0,
                            options=SeedOptions(max_readers=1, heartbeat_interval_s=1.0))
        report = pull_weights(client, middle_engine, IDENTITY, worker_rank=0, tensors=describe(local),
                              options=PullOptions(pipeline=True, keep_registered=True),
                              verifier=digest_verifier(local), pipeline=seed)
        assert report.served == {root.worker_id: report.bytes}
        [ref] = [r for r in client.list_sources(IDENTITY, status=SourceStatus.READY, worker_rank=0)
                 if r.worker_id == seed.worker_id]
        assert ref.topology.get(TOPOLOGY_PIPELINE) is None
        root.close()  # only the former target can serve now
        child = Pull(client, engine, poll_interval_s=0.2)
        child_report = child.join(60)
        assert child.holds(TRUTH) and child_report.served == {seed.worker_id: report.bytes}
        seed.publisher.close()


def test_a_target_waiting_for_a_seed_is_woken_by_the_metadata_servers_watch(server, client, engine, seeds):
    """No seed yet, a poll interval far longer than the test: only the watch can wake the target."""
    pull = Pull(client, engine, poll_interval_s=120)
    time.sleep(1.0)  # the target listed, found nothing, and waits
    assert pull.thread.is_alive()
    started = time.monotonic()
    root = SeedProcess(server.address, size_mb=SIZE_MB)
    seeds.append(root)
    report = pull.join(60)
    assert time.monotonic() - started < 30
    assert pull.holds(TRUTH) and report.served == {root.worker_id: report.bytes}


# --- chunks (sglang_mx.chunks): a large tensor served on a verified chunk at a time ---------------

CHUNK = 64 << 10


def _units(name: str, chunk_bytes: int = CHUNK) -> list[str]:
    return [unit_name(name, offset, length) for offset, length in spans(_bytes([name]), chunk_bytes)]


def _bytes_equal(local, name: str, start: int, end: int) -> bool:
    return torch.equal(weights.as_bytes(local[name]).view(-1)[start:end], weights.as_bytes(TRUTH[name]).view(-1)[start:end])


def test_a_child_reads_only_the_chunks_its_partial_parent_verified(server, client, engine, parents, wait_for):
    parent = PartialParent(server.address, "--chunk-bytes", str(CHUNK))
    parents.append(parent)
    [ref] = client.list_sources(IDENTITY, status=SourceStatus.INITIALIZING, worker_rank=0)
    [record] = [t for t in client.get_metadata(ref.mx_source_id, ref.worker_id).worker.tensors if t.name == "big.f32"]
    assert record.chunk_bytes == CHUNK and len(record.chunks) == len(_units("big.f32"))

    pull = Pull(client, engine, poll_interval_s=120)
    first_two = _units("big.f32")[:2]
    parent.tell("verify " + ",".join(first_two))
    wait_for(lambda: _bytes_equal(pull.local, "big.f32", 0, 2 * CHUNK), timeout_s=20, what="the two verified chunks")
    time.sleep(0.5)  # the child has had every chance to read more
    assert not weights.as_bytes(pull.local["big.f32"]).view(-1)[2 * CHUNK:].any(), \
        "the child read chunks its parent had not verified"
    assert pull.untouched([n for n in TRUTH if n.startswith("big.") and n != "big.f32"])

    parent.tell("finish")
    report = pull.join(30)
    assert pull.holds(TRUTH) and report.failures == ()
    assert report.digests["big.f32"] == record.digest  # the whole tensor was checked once its last chunk was in
    assert [report.digests[u] for u in _units("big.f32")] == list(record.chunks)  # and every chunk on the way


def test_a_chunk_a_rogue_parent_marks_verified_fails_its_digest_and_comes_from_another_seed(
        server, client, engine, parents, seeds, wait_for):
    parent = PartialParent(server.address, "--chunk-bytes", str(CHUNK))
    parents.append(parent)
    pull = Pull(client, engine, poll_interval_s=0.2)
    parent.tell("lie " + _units("big.f32")[0])  # marked verified, bytes never written (zeros)
    seeds.append(SeedProcess(server.address, size_mb=SIZE_MB, chunk_bytes=CHUNK))  # the same chunks, true bytes
    report = pull.join(60)
    assert pull.holds(TRUTH)
    [failure] = [f for f in report.failures if parent.worker_id in f.seed]
    assert "do not match" in failure.reason and _units("big.f32")[0] in failure.reason
    assert parent.worker_id not in report.served  # nothing it served was kept


def test_chunks_that_match_under_a_whole_digest_that_does_not_fail_the_pull(server, client, engine, parents):
    parent = PartialParent(server.address, "--chunk-bytes", str(CHUNK), "--wrong-whole", "big.f32")
    parents.append(parent)
    pull = Pull(client, engine, poll_interval_s=0.2)
    parent.tell("verify " + ",".join(_units("big.f32")))
    with pytest.raises(VerificationError, match="chunk and whole digests that disagree") as e:
        pull.join(30)
    assert e.value.tensors == ("big.f32",)


def test_a_pipelined_target_republishes_its_seeds_chunks_and_manifest(server, client, engine, seeds, parents):
    """root (chunks of 4 KiB: the tied embedding too) -> middle (pipelined, in this process) -> child."""
    root = SeedProcess(server.address, size_mb=SIZE_MB, chunk_bytes=4096)
    seeds.append(root)
    from sglang_mx.transfer.engine import MooncakeEngine

    with MooncakeEngine.create("127.0.0.1", protocol="tcp") as middle_engine:
        local = weights.build(SIZE_MB, filled=False)
        seed = PipelineSeed(local, middle_engine, IDENTITY, client, worker_rank=0,
                            options=SeedOptions(max_readers=1, heartbeat_interval_s=1.0, chunk_bytes=0))
        report = pull_weights(client, middle_engine, IDENTITY, worker_rank=0, tensors=describe(local),
                              options=PullOptions(pipeline=True, keep_registered=True),
                              verifier=digest_verifier(local), pipeline=seed)
        assert report.verified == sum(1 for t in TRUTH.values() if t.numel())
        [ref] = [r for r in client.list_sources(IDENTITY, status=SourceStatus.READY, worker_rank=0)
                 if r.worker_id == seed.worker_id]
        assert ref.topology[TOPOLOGY_MANIFEST] == root.info["manifest"]  # a pin holds across the cascade
        tensors = {t.name: t for t in client.get_metadata(ref.mx_source_id, ref.worker_id).worker.tensors}
        assert tensors["lm_head.bf16"].chunks == tensors["embed.bf16"].chunks and len(tensors["embed.bf16"].chunks) == 2
        root.close()
        child = Pull(client, engine, poll_interval_s=0.2)
        child_report = child.join(120)
        assert child.holds(TRUTH) and child_report.served == {seed.worker_id: report.bytes}
        seed.publisher.close()
