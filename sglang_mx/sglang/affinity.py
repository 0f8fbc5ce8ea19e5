"""Keep Mooncake's threads off a single pinned core (issue #19). Imports no SGLang.

On a CPU host with sgl_kernel's CPU build (AMX Xeon, arm64), SGLang binds its
OpenMP threads one core each, and OpenMP thread 0 is the scheduler's main
thread: after that binding the main thread may run on ONE core of the rank's
set. SGLang creates its Mooncake TransferEngine later, from that thread, and a
new thread inherits its creator's mask, so Mooncake's sending and receiving
threads would share that one core with the thread that populates and hashes.

`run_widened` runs the engine's start with the calling thread allowed on the
rank's CPUs, gives every thread the call created the same mask, and puts the
calling thread's own mask back (SGLang's OpenMP thread 0 keeps its core).
The rank's CPUs are what SGLang computed for the rank (its `local_omp_cpuid`:
a `SGLANG_CPU_OMP_THREADS_BIND` entry or the NUMA node), cut to what the
process was allowed before SGLang bound anything (the mask it inherited from
the launcher): never wider. Where they are unknown, or already allowed, it
changes nothing. Linux only (`linux_ops()` is None elsewhere: a no-op).

The thread and mask functions are injected (`ThreadOps`), so the rule tests
with fakes.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys
from typing import Callable, Iterable, TypeVar

log = logging.getLogger("sglang_mx")

T = TypeVar("T")
CALLING_THREAD = 0  # sched_setaffinity(0, ...) means the calling thread


@dataclasses.dataclass(frozen=True)
class ThreadOps:
    """The process's threads and their CPU masks (Linux: /proc/self/task and sched_*affinity)."""

    list_threads: Callable[[], set[int]]
    get_affinity: Callable[[int], set[int]]
    set_affinity: Callable[[int, Iterable[int]], None]


def linux_ops() -> ThreadOps | None:
    """The real functions, or None where there are no per-thread masks to set."""
    if not sys.platform.startswith("linux") or not hasattr(os, "sched_setaffinity"):
        return None
    if not os.path.isdir("/proc/self/task"):
        return None
    return ThreadOps(
        list_threads=lambda: {int(tid) for tid in os.listdir("/proc/self/task")},
        get_affinity=os.sched_getaffinity,
        set_affinity=os.sched_setaffinity,
    )


def parse_cpus(value: str | Iterable[int] | None) -> frozenset[int]:
    """A CPU list as SGLang gives it ("0-31", "0,1,2", "0-3,8", or ints); empty for None or ""."""
    if value is None:
        return frozenset()
    if not isinstance(value, str):
        return frozenset(int(cpu) for cpu in value)
    cpus: set[int] = set()
    for part in value.replace(" ", "").split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if dash:
            if int(last) < int(first):
                raise ValueError(f"CPU range {part!r} in {value!r} runs backwards")
            cpus.update(range(int(first), int(last) + 1))
        else:
            cpus.add(int(first))
    return frozenset(cpus)


@dataclasses.dataclass
class RankCpus:
    """The rank's CPUs, noted where SGLang decides them (the binding) for the engine's start later."""

    cpus: frozenset[int] = frozenset()

    def note(self, bound: str | Iterable[int] | None, allowed: Iterable[int]) -> frozenset[int]:
        """SGLang's cpu list for the rank, cut to the mask the process had before the binding."""
        self.cpus = parse_cpus(bound) & frozenset(allowed)
        return self.cpus


@dataclasses.dataclass(frozen=True)
class Widening:
    """What `run_widened` did (or why it did nothing)."""

    cpus: frozenset[int]
    caller_mask: frozenset[int]
    threads: tuple[int, ...] = ()  # created by the call and given `cpus`
    failed: tuple[tuple[int, str], ...] = ()  # (tid, why) where the mask could not be set
    skipped: str = ""  # why nothing was changed ("" when it widened)

    def describe(self) -> str:
        if self.skipped:
            return f"Mooncake threads left as started: {self.skipped}"
        text = (f"Mooncake engine threads {list(self.threads)} allowed on cpus {_fmt(self.cpus)} "
                f"(the calling thread's own mask {_fmt(self.caller_mask)} restored)")
        if self.failed:
            text += "; could not set " + ", ".join(f"{tid} ({why})" for tid, why in self.failed)
        return text


def run_widened(call: Callable[[], T], cpus: Iterable[int], ops: ThreadOps | None) -> tuple[T, Widening]:
    """Run `call` (which starts threads) with the calling thread and every thread it creates
    allowed on `cpus`; the calling thread's own mask is put back on every path.

    Nothing changes where `ops` is None (not Linux), `cpus` is empty (the rank's CPUs are
    unknown) or the calling thread is already allowed on all of them."""
    wide = frozenset(cpus)
    if ops is None:
        return call(), Widening(wide, frozenset(), skipped="no per-thread CPU masks on this platform")
    mine = frozenset(ops.get_affinity(CALLING_THREAD))
    if not wide:
        return call(), Widening(wide, mine, skipped="the rank's CPUs are not known (SGLang bound no CPU threads)")
    if wide <= mine:
        return call(), Widening(wide, mine, skipped=f"the calling thread is already allowed on cpus {_fmt(mine)}")
    before = ops.list_threads()
    try:
        ops.set_affinity(CALLING_THREAD, wide)
    except OSError as e:
        return call(), Widening(wide, mine, skipped=f"could not widen the calling thread to cpus {_fmt(wide)}: {e}")
    try:
        result = call()
    finally:
        created = tuple(sorted(ops.list_threads() - before))
        failed = []
        for tid in created:  # they inherited `wide` already; this also covers a helper's threads
            try:
                ops.set_affinity(tid, wide)
            except ProcessLookupError:
                pass  # the thread has ended
            except OSError as e:
                failed.append((tid, errno.errorcode.get(e.errno, str(e.errno)) if e.errno else str(e)))
        ops.set_affinity(CALLING_THREAD, mine)
    return result, Widening(wide, mine, threads=created, failed=tuple(failed))


def _fmt(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"
