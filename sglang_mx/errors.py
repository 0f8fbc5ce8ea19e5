"""Typed errors. Every error sglang-mx raises on purpose derives from MxError."""

from __future__ import annotations

import dataclasses
from typing import Sequence


class MxError(Exception):
    """Root of all sglang-mx errors."""


class ConfigError(MxError, ValueError):
    """A configuration key or value is wrong; the message names it and what is allowed."""


class ServerError(MxError):
    """The metadata server could not be reached or refused a call."""

    def __init__(self, message: str, *, url: str, rpc: str, code: str = "") -> None:
        super().__init__(f"{rpc} to metadata server {url} failed: {message}" + (f" [{code}]" if code else ""))
        self.url = url
        self.rpc = rpc
        self.code = code


class ServerUnavailableError(ServerError):
    """The server did not answer (after the client's retries)."""


class WatchUnsupportedError(ServerError):
    """The server has no MxWatchService (a ModelExpress server answers UNIMPLEMENTED): poll instead."""


class RequestRejectedError(ServerError):
    """The server answered, but refused the request (success=false)."""


class StoreUnavailableError(MxError):
    """The metadata server's store backend (Redis) cannot be reached.

    The servicer answers such RPCs with gRPC UNAVAILABLE, which clients retry.
    """

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(f"store at {url} is unavailable: {message}")
        self.url = url


@dataclasses.dataclass(frozen=True)
class SizeMismatch:
    name: str
    local_bytes: int
    remote_bytes: int


class LayoutMismatchError(MxError):
    """A seed's tensors do not match ours; lists every difference at once."""

    def __init__(
        self,
        *,
        seed: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[SizeMismatch] = (),
        invalid: Sequence[str] = (),
    ) -> None:
        self.seed = seed
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)
        self.invalid = tuple(invalid)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} tensor(s) missing on the seed: {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} tensor(s) only on the seed: {_names(self.unexpected)}")
        if self.mismatched:
            shown = ", ".join(
                f"{m.name} (local {m.local_bytes} B, seed {m.remote_bytes} B)" for m in self.mismatched[:10]
            )
            more = f" and {len(self.mismatched) - 10} more" if len(self.mismatched) > 10 else ""
            parts.append(f"{len(self.mismatched)} size mismatch(es): {shown}{more}")
        if self.invalid:
            parts.append(f"invalid descriptor(s): {_names(self.invalid)}")
        super().__init__(f"layout of seed {seed} does not match this instance: " + "; ".join(parts))


class TransferError(MxError):
    """Mooncake failed to move the bytes."""

    def __init__(self, message: str, *, seed: str = "", code: int | None = None, nbytes: int = 0) -> None:
        detail = message
        if seed:
            detail += f" (seed {seed}"
            detail += f", {nbytes} bytes" if nbytes else ""
            detail += f", Mooncake return code {code})" if code is not None else ")"
        super().__init__(detail)
        self.seed = seed
        self.code = code
        self.nbytes = nbytes


class VerificationError(MxError):
    """A seed's bytes arrived but do not match what it published (or it published no digests
    where `verify: require` asks for them); names the tensors."""

    def __init__(self, message: str, *, seed: str, tensors: Sequence[str] = ()) -> None:
        self.seed = seed
        self.tensors = tuple(tensors)
        detail = f"{message} (seed {seed})"
        if self.tensors:
            detail += f": {len(self.tensors)} tensor(s): {_names(self.tensors)}"
        super().__init__(detail)


class UnplacedTensorError(MxError):
    """A tensor of the model is neither moved nor left local by a listed rule (sglang_mx.model_tensors):
    the seed does not publish such a model and the target does not serve it. Names each tensor and why."""

    def __init__(self, message: str, *, tensors: Sequence[tuple[str, str]]) -> None:
        self.tensors = tuple(tensors)
        shown = "; ".join(f"{name} ({why})" for name, why in self.tensors[:10])
        more = f" and {len(self.tensors) - 10} more" if len(self.tensors) > 10 else ""
        super().__init__(f"{message}: {len(self.tensors)} tensor(s): {shown}{more}")


class ReadsInFlightError(MxError):
    """Mooncake reads were still in flight when the drain limit ran out: they may write into
    `ranges` (local (addr, length)) at any later time.

    Fatal for the process: neither the next seed (it is no TransferError) nor a fallback to
    disk (`roles.load_with_fallback` re-raises it) may run, since both reuse or free memory a
    peer may still write. That memory must never be freed or reused in this process; the
    engine keeps what it was handed (`MooncakeEngine.quarantine`). Let it end the process.
    """

    def __init__(self, message: str, *, seed: str, ranges: Sequence[tuple[int, int]]) -> None:
        super().__init__(f"{message} (seed {seed}; {len(ranges)} read(s) of {sum(n for _, n in ranges)} bytes "
                         "may still write: this memory must not be freed or reused)")
        self.seed = seed
        self.ranges = tuple(ranges)


@dataclasses.dataclass(frozen=True)
class CandidateFailure:
    """Why one seed could not be used."""

    seed: str
    reason: str


class NoSourceError(MxError):
    """No READY seed could provide our weights; lists every candidate tried."""

    def __init__(self, message: str, *, attempts: Sequence[CandidateFailure] = ()) -> None:
        self.attempts = tuple(attempts)
        if self.attempts:
            tried = "; ".join(f"{a.seed}: {a.reason}" for a in self.attempts)
            message = f"{message}. Tried {len(self.attempts)} candidate(s): {tried}"
        super().__init__(message)


def _names(names: Sequence[str], shown: int = 10) -> str:
    text = ", ".join(names[:shown])
    if len(names) > shown:
        text += f" and {len(names) - shown} more"
    return text
