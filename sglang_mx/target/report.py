"""What a pull reports: one record for both pull paths, and the one place that builds it."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from sglang_mx.errors import CandidateFailure


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullReport:
    mx_source_id: str
    seed_worker_id: str  # the seed that served most of the bytes
    seed_session_id: str
    tensors: int
    bytes: int
    reads: int
    seconds: float  # the transfer: first read submitted to last one done (early verification inside it)
    verified: int = 0  # tensors (or, resharded, checked ranges) whose bytes matched the seeds' digests
    verify_seconds: float = 0.0  # hashing, mostly while later reads were still moving
    register_seconds: float = 0.0  # registering our memory with Mooncake
    discover_seconds: float = 0.0  # ListSources until the first source was taken (waiting included)
    metadata_seconds: float = 0.0  # GetMetadata, layout check and lease of the sources taken
    failures: tuple[CandidateFailure, ...] = ()  # seeds that failed along the way
    served: Mapping[str, int] = dataclasses.field(default_factory=dict)  # worker id -> verified bytes it served
    rounds: int = 0  # striped rounds (1 unless a seed failed mid-pull)
    resharded_from: int = 0  # the seed instance's TP size when it had another layout (target.reshard); 0: same
    # name -> digest of every tensor whose pulled bytes were checked against it (same-layout pulls):
    # a cascading target publishes these instead of hashing the same bytes again.
    digests: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def build_report(*, mx_source_id: str, served: Mapping[str, int], sessions: Mapping[str, str],
                 failed: Iterable[str] = (), **fields) -> PullReport:
    """A PullReport naming as its seed the worker that served most bytes among those that never failed
    (`sessions`: worker id -> session, in the order the workers were taken; the first when none served)."""
    failed = set(failed)
    ranked = sorted(served, key=lambda w: (w not in failed, served[w]), reverse=True)
    main = ranked[0] if ranked else next(iter(sessions), "")
    return PullReport(mx_source_id=mx_source_id, seed_worker_id=main, seed_session_id=sessions.get(main, ""),
                      served=dict(served), **fields)
