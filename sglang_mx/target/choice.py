"""Which seeds a target asks first. Pure: no I/O, the randomness is passed in.

Least-loaded first (`SourceRef.source_load`, the reads a seed reported serving
in its last heartbeat; a seed that reports nothing counts as idle), ties broken
at random so that targets starting together spread over equally idle seeds
instead of all asking the newest one. With `spread=False` ties keep the
server's order (newest first), which tests use to make the order predictable.
The same ordering picks among whole seed instances of another layout
(`target.reshard.instances`), by their ranks' mean load.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, TypeVar

from sglang_mx.records import SourceRef

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
    """`refs` least-loaded first; equal loads in random order (`spread`) or as listed."""
    return least_loaded(refs, load=lambda r: r.source_load or 0.0, rng=rng, spread=spread)
