"""sglang_mx.sglang.affinity: the engine's threads start on the rank's CPUs, the caller keeps its core.

The rule runs against FakeThreads (a process's threads and masks in a dict); one test uses
the real Linux calls on a thread it starts itself.
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import pytest

from sglang_mx.sglang.affinity import CALLING_THREAD, RankCpus, ThreadOps, linux_ops, parse_cpus, run_widened

MAIN = 100


class FakeThreads:
    """A fake process: thread id -> CPU mask. `start_thread()` inherits the calling thread's
    mask as Linux does; `gone` are threads that end before their mask is set; `refuse` maps a
    thread id to the errno its set_affinity raises."""

    def __init__(self, main_mask: set[int]) -> None:
        self.masks: dict[int, set[int]] = {MAIN: set(main_mask)}
        self.next_tid = MAIN + 1
        self.gone: set[int] = set()
        self.refuse: dict[int, int] = {}
        self.sets: list[tuple[int, frozenset[int]]] = []

    def ops(self) -> ThreadOps:
        return ThreadOps(list_threads=lambda: set(self.masks), get_affinity=self.get, set_affinity=self.set)

    def get(self, tid: int) -> set[int]:
        return set(self.masks[MAIN if tid == CALLING_THREAD else tid])

    def set(self, tid: int, cpus) -> None:
        tid = MAIN if tid == CALLING_THREAD else tid
        if tid in self.gone:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        if tid in self.refuse:
            raise OSError(self.refuse[tid], os.strerror(self.refuse[tid]))
        self.sets.append((tid, frozenset(cpus)))
        self.masks[tid] = set(cpus)

    def start_thread(self) -> int:
        tid, self.next_tid = self.next_tid, self.next_tid + 1
        self.masks[tid] = set(self.masks[MAIN])
        return tid


def test_pinned_caller_engine_threads_get_the_rank_cpus_and_the_caller_its_core_back():
    fake = FakeThreads({0})
    fake.masks[50] = {0, 1, 2, 3}  # a thread from before (gloo): not the engine's, left alone
    masks_inside = []

    def init_engine():
        masks_inside.append(fake.get(CALLING_THREAD))
        return [fake.start_thread() for _ in range(3)]

    created, widening = run_widened(init_engine, {0, 1, 2, 3}, fake.ops())
    assert masks_inside == [{0, 1, 2, 3}]
    assert widening.threads == tuple(created) == (101, 102, 103)
    assert all(fake.masks[tid] == {0, 1, 2, 3} for tid in created)
    assert fake.masks[MAIN] == {0}
    assert 50 not in {tid for tid, _ in fake.sets}
    assert widening.describe() == ("Mooncake engine threads [101, 102, 103] allowed on cpus 0-3 "
                                   "(the calling thread's own mask 0 restored)")


def test_a_thread_made_by_a_helper_with_its_own_mask_is_widened_too():
    fake = FakeThreads({2})

    def init_engine():
        tid = fake.start_thread()
        fake.masks[tid] = {2}  # e.g. a library that pins its own threads
        return tid

    tid, widening = run_widened(init_engine, {2, 3}, fake.ops())
    assert fake.masks[tid] == {2, 3} and fake.masks[MAIN] == {2}
    assert widening.threads == (tid,)


def test_nothing_changes_when_the_caller_is_already_allowed_everywhere_it_may_be():
    fake = FakeThreads({0, 1})
    _, widening = run_widened(fake.start_thread, {0, 1}, fake.ops())
    assert fake.sets == []
    assert widening.describe() == "Mooncake threads left as started: the calling thread is already allowed on cpus 0-1"


def test_a_rank_set_narrower_than_the_caller_never_narrows_anything():
    fake = FakeThreads({0, 1, 2, 3})
    tid, widening = run_widened(fake.start_thread, {0, 1}, fake.ops())
    assert fake.sets == [] and fake.masks[tid] == {0, 1, 2, 3}
    assert widening.skipped


def test_unknown_rank_cpus_change_nothing():
    fake = FakeThreads({0})
    _, widening = run_widened(fake.start_thread, frozenset(), fake.ops())
    assert fake.sets == []
    assert widening.describe() == ("Mooncake threads left as started: the rank's CPUs are not known "
                                   "(SGLang bound no CPU threads)")


def test_no_platform_support_is_a_no_op():
    result, widening = run_widened(lambda: "engine", {0, 1}, None)
    assert result == "engine"
    assert widening.describe() == "Mooncake threads left as started: no per-thread CPU masks on this platform"


def test_the_caller_is_restored_when_the_engine_fails():
    fake = FakeThreads({1})

    def init_engine():
        fake.start_thread()
        raise RuntimeError("mooncake could not start")

    with pytest.raises(RuntimeError, match="mooncake could not start"):
        run_widened(init_engine, {0, 1}, fake.ops())
    assert fake.masks[MAIN] == {1}
    assert fake.masks[MAIN + 1] == {0, 1}


def test_a_thread_that_ended_is_skipped_and_a_refused_one_reported():
    fake = FakeThreads({0})

    def init_engine():
        ended, refused, fine = fake.start_thread(), fake.start_thread(), fake.start_thread()
        fake.gone.add(ended)
        fake.refuse[refused] = errno.EINVAL
        return fine

    fine, widening = run_widened(init_engine, {0, 1}, fake.ops())
    assert widening.threads == (101, 102, 103)
    assert widening.failed == ((102, "EINVAL"),)
    assert fake.masks[fine] == {0, 1} and fake.masks[MAIN] == {0}
    assert widening.describe().endswith("; could not set 102 (EINVAL)")


def test_a_caller_that_cannot_be_widened_runs_the_engine_unchanged():
    fake = FakeThreads({0})
    fake.refuse[MAIN] = errno.EINVAL
    tid, widening = run_widened(fake.start_thread, {0, 1}, fake.ops())
    assert fake.masks[tid] == {0}
    assert widening.skipped.startswith("could not widen the calling thread to cpus 0-1: ")


@pytest.mark.parametrize("value, cpus", [
    ("0-3", {0, 1, 2, 3}), ("0,1", {0, 1}), ("0-1,4,6-7", {0, 1, 4, 6, 7}), (" 2 , 3", {2, 3}),
    ([5, "6"], {5, 6}), ("", set()), (None, set()),
])
def test_parse_cpus(value, cpus):
    assert parse_cpus(value) == cpus


def test_parse_cpus_refuses_a_backwards_range():
    with pytest.raises(ValueError, match=r"CPU range '3-1' in '0,3-1' runs backwards"):
        parse_cpus("0,3-1")


def test_rank_cpus_are_never_wider_than_the_process_was_allowed():
    rank = RankCpus()
    assert rank.note("0-31", allowed={0, 1, 2, 3, 40}) == {0, 1, 2, 3}
    assert rank.cpus == {0, 1, 2, 3}
    assert rank.note(None, allowed={0, 1}) == frozenset()


@pytest.mark.skipif(linux_ops() is None or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 CPUs")
def test_real_threads_on_linux():
    """The real calls, run in a thread of its own pinned to one CPU (the test's own thread is untouched)."""
    ops = linux_ops()
    allowed = sorted(os.sched_getaffinity(0))
    out = {}

    def pinned_caller():
        os.sched_setaffinity(0, {allowed[0]})
        stop = threading.Event()

        def init_engine():
            worker = threading.Thread(target=stop.wait)
            worker.start()
            return worker

        worker, widening = run_widened(init_engine, set(allowed), ops)
        out.update(worker_mask=os.sched_getaffinity(worker.native_id), own=os.sched_getaffinity(0),
                   threads=widening.threads, worker_tid=worker.native_id)
        stop.set()
        worker.join()

    caller = threading.Thread(target=pinned_caller)
    caller.start()
    caller.join()
    assert out["worker_mask"] == set(allowed)
    assert out["own"] == {allowed[0]}
    assert out["worker_tid"] in out["threads"]
    assert sys.platform.startswith("linux")
