"""Which seeds a target asks first. Pure: no I/O, the randomness is passed in.

Least-loaded first (`SourceRef.source_load`, the reads a seed reported serving
in its last heartbeat; a seed that reports nothing counts as idle), ties broken
at random so that targets starting together spread over equally idle seeds
instead of all asking the newest one. With `spread=False` ties keep the
server's order (newest first), which tests use to make the order predictable.
The same ordering picks among whole seed instances of another layout
(`target.reshard.instances`), by their ranks' mean load.

A pipelined target (`target.pipeline`) also reads from partial seeds, after the full ones:
`order_parents` plans the tree. Partial seeds go shallowest first (then least loaded), so
the tree fills level by level, and only those shallower than the target itself once it has
a depth: every parent is shallower than its children and depths never change, so no cycle
can form when a target whose parent died attaches again.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, TypeVar

from sglang_mx.records import SourceRef
from sglang_mx.tree import at_cap, depth_of

T = TypeVar("T")


def least_loaded(items: Iterable[T], *, load: Callable[[T], float], rng: random.Random | None = None,
                 spread: bool = True) -> list[T]:
    """`items` lowest `load` first; equal loads in random order (`spread`) or as given."""
    items = list(items)
    if spread:
        (rng or random.Random()).shuffle(items)
    return sorted(items, key=load)  # stable: ties keep the shuffled order


def order_candidates(refs: Iterable[SourceRef], *, rng: random.Random | None = None,
                     spread: bool = True) -> list[SourceRef]:
    """`refs` least-loaded first, those listed at their cap left out (`at_cap`); equal loads in random
    order (`spread`) or as listed."""
    return least_loaded([r for r in refs if not at_cap(r)], load=lambda r: r.source_load or 0.0, rng=rng,
                        spread=spread)


def order_parents(full: Iterable[SourceRef], partial: Iterable[SourceRef], *, own_depth: int | None = None,
                  own_worker: str = "", rng: random.Random | None = None, spread: bool = True) -> list[SourceRef]:
    """Full seeds least-loaded first, then the partial seeds a target at `own_depth` (None: not yet
    in the tree) may attach to, shallowest and least loaded first; never itself (`own_worker`), nor a
    seed listed at its cap (`at_cap`)."""
    rng = rng or random.Random()
    allowed = [r for r in partial if r.worker_id != own_worker and not at_cap(r)
               and (own_depth is None or depth_of(r) < own_depth)]
    shallow_first = least_loaded(allowed, load=lambda r: (depth_of(r), r.source_load or 0.0), rng=rng, spread=spread)
    return order_candidates([r for r in full if r.worker_id != own_worker], rng=rng, spread=spread) + shallow_first
