"""Manifest ids: what an operator pins to say "these weights, and no others".

A seed rank's manifest id is SHA-256 over its identity's mx_source_id, its worker
rank and every tensor's name, size and digest, in the order published, with the
digests of its dim-0 pieces and of its chunks where it has them (every digest a
target may check bytes against: a pin binds them all). A seed
advertises it (worker record topology `mx_manifest`; `sglang-mx sources` shows it);
a target configured with `expect` recomputes it from the record it received, for
the rank it asked for and the id it asked for, and uses only a seed whose manifest
is listed. The manifest binds names and sizes to digests, so a pin is as strong as
the digests under it: only a cryptographic algorithm (CRYPTOGRAPHIC, BLAKE3) stands
against someone who crafts bytes; xxh3-64 and mxh64 catch accidents, not forgers.

A target that pulled and verified every tensor republishes the digests it checked,
so its manifest equals its seed's: a pin holds across a cascade.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

from sglang_mx.records import TensorDescriptor

__all__ = ["CRYPTOGRAPHIC", "DIGEST_ALGORITHMS", "is_manifest_id", "manifest_id", "weak_digests"]

# The digest algorithms sglang_mx.digest computes, and those a forger cannot match.
DIGEST_ALGORITHMS = ("xxh3-64", "mxh64", "blake3")
CRYPTOGRAPHIC = frozenset({"blake3"})
_ID = re.compile(r"[0-9a-f]{64}")


def manifest_id(mx_source_id: str, worker_rank: int, tensors: Sequence[TensorDescriptor]) -> str:
    """64 lowercase hex digits over the id, the rank and every (name, size, digest), in order, each with
    its piece and chunk digests where it has any (a tensor with neither hashes as it always did)."""
    h = hashlib.sha256(f"sglang-mx manifest v1\n{mx_source_id}\n{worker_rank}\n".encode())
    for t in tensors:
        line = f"{t.name}\t{t.size}\t{t.digest}"
        if t.pieces:
            line += "\tpieces " + " ".join(f"{p.global_start}+{p.length}={p.digest}" for p in t.pieces)
        if t.chunks:
            line += f"\tchunks {t.chunk_bytes} " + " ".join(t.chunks)
        h.update(f"{line}\n".encode())
    return h.hexdigest()


def is_manifest_id(text: str) -> bool:
    return bool(_ID.fullmatch(text))


def weak_digests(tensors: Sequence[TensorDescriptor]) -> list[str]:
    """Names of the tensors with bytes whose digest (or a piece or chunk digest) is missing or not cryptographic."""
    weak = []
    for t in tensors:
        if t.size == 0:
            continue
        digests = [t.digest, *(p.digest for p in t.pieces), *t.chunks]
        if any(not d or d.partition(":")[0] not in CRYPTOGRAPHIC for d in digests):
            weak.append(t.name)
    return weak
