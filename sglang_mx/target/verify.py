"""The one verify rule of a target: which digest the bytes it keeps are checked against.

Both pull paths (a same-layout striped pull, a mixed-layout reshard) ask `expect`
for every range of bytes they read, with the digest the seed published for exactly
those bytes ("" when it published none):

- `VerifyMode.REQUIRE` (the default): the published digest; with none, or with one
  the seed computed over bytes it pulled and never checked (origin "unverified":
  proof of nothing but what it holds), the bytes may not be read (None: the caller
  refuses that seed or plan before any byte moves).
- `VerifyMode.IF_PRESENT`: the published digest, or "" (read unchecked, and said so).
- `VerifyMode.OFF`: "" (nothing is checked).

A seed's digests are checked once, when it becomes a candidate (`check_published`):
a digest naming an algorithm this version does not know, or a malformed one, fails
that seed only, never the pull as a whole.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch

from sglang_mx.chunks import UnitTensors, spans
from sglang_mx.config import VerifyMode
from sglang_mx.digest import DigestError, check_digest, mismatches
from sglang_mx.errors import VerificationError
from sglang_mx.records import DIGEST_UNVERIFIED, TensorDescriptor

__all__ = ["Verifier", "VerifyMode", "check_published", "digest_verifier", "expect", "expected_digests"]

log = logging.getLogger(__name__)

# Given the digests a seed published (name -> digest), the names of our tensors that differ.
Verifier = Callable[[Mapping[str, str]], Sequence[str]]


def expect(mode: VerifyMode, published: str, origin: str = "") -> str | None:
    """The digest bytes read under `mode` must have: `published`; "" when they are read unchecked
    (off, or if_present with nothing published); None when they may not be read (require, with
    nothing published or a digest of origin "unverified")."""
    if not mode.checks:
        return ""
    if mode is VerifyMode.REQUIRE and (not published or origin == DIGEST_UNVERIFIED):
        return None
    return published


def expected_digests(local: Sequence[TensorDescriptor], remote: Sequence[TensorDescriptor], mode: VerifyMode,
                     seed: str) -> dict[str, str]:
    """Name -> the digest our bytes must have after a same-layout pull from one seed, per `mode`.

    Checked before any byte moves: under require, a seed lacking a digest for any
    tensor with bytes is refused (VerificationError naming them) without being read.
    """
    mode = VerifyMode(mode)
    published = {t.name: t for t in remote}
    out: dict[str, str] = {}
    refused: list[str] = []
    unchecked = second_hand = 0
    for t in local:
        if t.size == 0:
            continue
        theirs = published.get(t.name)
        digest, origin = (theirs.digest, theirs.digest_origin) if theirs is not None else ("", "")
        expected = expect(mode, digest, origin)
        if expected is None:
            refused.append(t.name)
        elif expected:
            out[t.name] = expected
            second_hand += origin == DIGEST_UNVERIFIED
        else:
            unchecked += mode.checks
    if refused:
        raise VerificationError("seed publishes no digest, or only one computed over bytes it never checked, for "
                                "some tensors, and verify is 'require'", seed=seed, tensors=refused)
    if unchecked:
        log.warning("seed %s publishes no digest for %d of %d tensors: those are not verified (verify=if_present)",
                    seed, unchecked, sum(1 for t in local if t.size))
    if second_hand:
        log.warning("seed %s computed the digests of %d tensors over bytes it pulled and never checked: they prove "
                    "only that we hold what it holds (verify=if_present)", seed, second_hand)
    return out


def check_published(tensors: Sequence[TensorDescriptor], seed: str) -> None:
    """Every digest a seed published (whole tensors, dim-0 pieces, chunks) names a known algorithm and
    is well formed, and chunk digests cut their tensor exactly; else VerificationError for this seed,
    naming the tensors."""
    bad: list[str] = []
    reason = ""
    for t in tensors:
        if t.chunks and (t.chunk_bytes <= 0 or len(t.chunks) != len(spans(t.size, t.chunk_bytes))):
            bad.append(t.name)
            reason = reason or (f"{len(t.chunks)} chunk digests for {t.size} bytes cut every {t.chunk_bytes} "
                                "(one per chunk, chunk_bytes > 0)")
            continue
        for digest in (t.digest, *(p.digest for p in t.pieces), *t.chunks):
            if digest:
                try:
                    check_digest(digest)
                except DigestError as e:
                    bad.append(t.name)
                    reason = reason or str(e)
                    break
    if bad:
        raise VerificationError(f"seed publishes digests this target cannot check ({reason})", seed=seed,
                                tensors=bad)


def digest_verifier(tensors: Mapping[str, torch.Tensor]) -> Verifier:
    """Checks `tensors` against a seed's digests (on their own device; CUDA is synchronized first);
    a chunk's unit name (sglang_mx.chunks) checks those bytes of its tensor."""
    units = UnitTensors(tensors)
    return lambda expected: mismatches(units, expected)
