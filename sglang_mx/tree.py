"""The cascade tree's rules on a listed record, pure (no torch, no I/O): the metadata server filters a
waiting target's watch with them, and the target plans with them (`target.choice`).

- `is_partial`: a pulling target that serves its verified tensors (INITIALIZING, topology `mx_pipeline` "1");
- `depth_of`: its depth in the tree (0: a full READY seed);
- `at_cap`: listed as serving as many readers as the cap it publishes (`mx_max_readers`);
- `could_serve`: a seed a waiting target would ask now: READY and not at its cap, or (pipelined) a partial
  seed not at its cap and shallower than the target; never the target itself, nor one it refused.
"""

from __future__ import annotations

import dataclasses
from typing import Collection

from sglang_mx.records import TOPOLOGY_DEPTH, TOPOLOGY_MAX_READERS, TOPOLOGY_PIPELINE, SourceRef, SourceStatus

__all__ = ["Useful", "Waiting", "at_cap", "could_serve", "depth_of", "is_partial"]


def is_partial(ref: SourceRef) -> bool:
    """A partial seed: a pulling target that serves its verified tensors (INITIALIZING, `mx_pipeline`)."""
    return ref.status == SourceStatus.INITIALIZING and ref.topology.get(TOPOLOGY_PIPELINE) == "1"


def depth_of(ref: SourceRef) -> int:
    """A source's depth in the cascade tree: 0 for a full (READY) seed, the published depth for a partial one."""
    if not is_partial(ref):
        return 0
    try:
        return max(int(ref.topology.get(TOPOLOGY_DEPTH, "")), 1)
    except ValueError:
        return 1 << 30  # says no depth: never shallower than anyone


def at_cap(ref: SourceRef) -> bool:
    """The seed listed as serving as many readers as the cap it publishes (`mx_max_readers`): asking it
    would only be refused. Its load is as of its last heartbeat, sent within a moment of a change."""
    try:
        cap = int(ref.topology.get(TOPOLOGY_MAX_READERS, "0"))
    except ValueError:
        return False
    return cap > 0 and ref.source_load is not None and ref.source_load >= cap


def could_serve(ref: SourceRef, *, pipeline: bool = False, own_depth: int | None = None, own_worker: str = "",
                refused: Collection[str] = ()) -> bool:
    """Whether a seed as listed (a watch event's record) is one a waiting target would ask: READY and not
    at its cap, or (`pipeline`) a partial seed not at its cap and shallower than the target at `own_depth`
    (None: not yet in the tree); never itself (`own_worker`), nor one already `refused` for good. A change
    that makes no such seed (a seed gone, busier, still loading) cannot end the wait."""
    if ref.worker_id in refused or (own_worker and ref.worker_id == own_worker) or at_cap(ref):
        return False
    if ref.status == SourceStatus.READY:
        return True
    return pipeline and is_partial(ref) and (own_depth is None or depth_of(ref) < own_depth)


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A target waiting for a seed, as its watch tells the metadata server (MxWatchSourcesRequest
    `useful_only`): the server then sends it only the changes `useful` accepts, so a crowd of waiting
    targets is not woken, each, by every heartbeat of a busier seed or a target still loading."""

    pipeline: bool = False
    depth: int | None = None  # its depth in the tree when it began to watch (None: not in it)
    worker_id: str = ""  # itself, as a partial seed

    def useful(self, ref: SourceRef) -> bool:
        return could_serve(ref, pipeline=self.pipeline, own_depth=self.depth, own_worker=self.worker_id)


class Useful:
    """Whether one change (its record `ref`) is sent to each watch: always to a plain watch (None), to a
    waiting target's only if it could give it a seed. `could_serve` runs once per kind of waiting target
    (pipelined or not, its depth), however many wait: the metadata server's hub, and the simulation's."""

    def __init__(self, ref: SourceRef) -> None:
        self.ref = ref
        self._by_kind: dict[tuple[bool, int | None], bool] = {}

    def __call__(self, waiting: Waiting | None) -> bool:
        if waiting is None:
            return True
        kind = (waiting.pipeline, waiting.depth)
        if kind not in self._by_kind:
            self._by_kind[kind] = Waiting(*kind).useful(self.ref)
        return self._by_kind[kind] and self.ref.worker_id != waiting.worker_id
