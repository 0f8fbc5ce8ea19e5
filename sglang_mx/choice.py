"""Which seeds a target asks first. Pure: no I/O, the randomness is passed in.

Least-loaded first (`SourceRef.source_load`, the reads a seed reported serving
in its last heartbeat; a seed that reports nothing counts as idle), ties broken
at random so that targets starting together spread over equally idle seeds
instead of all asking the newest one. With `spread=False` ties keep the
server's order (newest first), which tests use to make the order predictable.
"""

from __future__ import annotations

import random
from typing import Iterable

from sglang_mx.records import SourceRef


def order_candidates(refs: Iterable[SourceRef], *, rng: random.Random | None = None,
                     spread: bool = True) -> list[SourceRef]:
    """`refs` least-loaded first; equal loads in random order (`spread`) or as listed."""
    refs = list(refs)
    if spread:
        (rng or random.Random()).shuffle(refs)
    return sorted(refs, key=lambda r: r.source_load or 0.0)  # stable: ties keep the shuffled order
