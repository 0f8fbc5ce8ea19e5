"""Content digests of tensors: a seed publishes one per tensor, a target checks its pull.

A digest is "<algorithm>:<16 hex digits>". The algorithm follows the tensor's device:

- ``xxh3-64`` for CPU tensors: XXH3-64 (the ``xxhash`` package, C) over the tensor's
  bytes through a zero-copy buffer; tens of GB/s per core.
- ``mxh64`` for every other device (CUDA): a positional hash written with plain torch
  ops, so it runs as GPU kernels on the tensor's own device, never copying the tensor
  to the host, and runs bit-identically (slowly) on CPU, where tests pin its values.

`verify` computes whatever algorithm the expected digest names, on any device (an
``xxh3-64`` of a CUDA tensor streams it to the host in chunks; an ``mxh64`` of a CPU
tensor runs the torch ops on CPU). Digests cover exactly the bytes that are transferred:
pass contiguous tensors, or the uint8 span views that `model_tensors` makes of strided
ones; a non-contiguous tensor is refused.

CUDA and streams: the public functions call ``torch.cuda.synchronize(device)`` first, so
the digest reflects every kernel and copy issued before the call on any stream of that
device (a Mooncake pull included); the hash kernels then run on the device's current
stream and the call returns after reading the result back.

mxh64, exactly (all arithmetic mod 2**64; the tests hold a pure-Python reference)
--------------------------------------------------------------------------------
Let the input be n bytes. Append zero bytes up to a whole number of blocks of
B = 1024 little-endian *signed* 32-bit words (4 KiB); w[j, r] is word r of block j,
sign-extended to 64 bits. K[r] (r < B) are fixed odd 64-bit keys whose low 32 bits
are pairwise distinct (splitmix64 from a fixed seed). fmix is MurmurHash3's 64-bit
finalizer (a bijection), G = 0x9E3779B97F4A7C15.

    h[j] = sum_r w[j, r] * K[r]                 (block sum: linear, position-keyed)
    S    = sum_j fmix(h[j] + (j + 1) * G)       (block index mixed in, nonlinearly)
    mxh64 = fmix(S XOR fmix(n + L))              (byte length mixed in; L a constant)

Why changes are caught:

- Any change inside one 32-bit word (so any single changed byte, or up to 4 bytes
  in one word) is ALWAYS detected. The word changes by d with 0 < |d| < 2**32, so
  d has at most 31 factors of 2; K[r] is odd, so d * K[r] != 0 mod 2**64 and h[j]
  changes. fmix is a bijection, so block j's term changes while every other term
  stays; S changes; and the final fmix(S XOR c) is a bijection of S.
- Two distinct words swapped inside one block are ALWAYS detected: h[j] changes by
  (w_a - w_b) * (K[b] - K[a]); the first factor has at most 31 factors of 2, the
  second at most 31 because the keys' low 32 bits differ, so the product has at most
  62 and is nonzero mod 2**64. (Signed words keep |w_a - w_b| < 2**32.)
- Two different blocks swapped (rows of a matrix swapped, layers written to the wrong
  place, a read landing at the wrong offset): each block's sum depends only on its
  contents, but its term depends on its index through fmix(h + (j+1)*G); the swap goes
  unseen only if fmix(h1 + jG) + fmix(h2 + kG) == fmix(h2 + jG) + fmix(h1 + kG) mod
  2**64, an accident of a nonlinear bijection that (for data not built against these
  fixed keys) happens with probability about 2**-64. Any multi-word change within a
  block likewise escapes only if a fixed linear form over the changed words vanishes
  mod 2**64 (roughly 2**-32 at worst for random changes), and changes spread over
  several blocks need a cancellation between fmix outputs (about 2**-64).
- Same bytes, different length (the zero padding) never collide: n enters through
  two bijections, so equal S with different n always gives different digests.

This is error detection, not authentication: anyone can forge a matching tensor.

Cost: the input is processed in chunks of _CHUNK_BLOCKS blocks (16 MiB), so the
temporaries stay at about 32 MiB (the int64 products of one chunk) plus the block sums,
8 bytes per 4 KiB block (0.2% of the tensor); per chunk, two kernels (a widening
multiply and a row sum), then per tensor a few small kernels over its block sums. The
result is read back once per tensor (once per device in `digest_many`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Mapping

import torch

from sglang_mx.errors import MxError
from sglang_mx.manifest import DIGEST_ALGORITHMS

__all__ = ["ALGORITHMS", "DigestError", "UnknownAlgorithmError", "digest_many", "tensor_digest", "verify"]

XXH3_64, MXH64, BLAKE3 = ALGORITHMS = DIGEST_ALGORITHMS
# Hex digits of each algorithm's value: 64-bit hashes, and BLAKE3's 256 bits.
_HEX_DIGITS = {XXH3_64: 16, MXH64: 16, BLAKE3: 64}


class DigestError(MxError, ValueError):
    """A tensor cannot be digested, or an expected digest is malformed."""


class UnknownAlgorithmError(DigestError):
    """An expected digest names an algorithm this version does not know."""

    def __init__(self, algorithm: str, digest: str) -> None:
        super().__init__(
            f"unknown digest algorithm {algorithm!r} in {digest!r}; allowed: {', '.join(ALGORITHMS)}"
        )
        self.algorithm = algorithm
        self.allowed = ALGORITHMS


# --- public API ------------------------------------------------------------


def tensor_digest(t: torch.Tensor, algorithm: str = "") -> str:
    """The digest of `t`'s bytes: `algorithm`, or by default xxh3-64 for a CPU tensor, mxh64 otherwise."""
    return digest_many({"tensor": t}, algorithm)["tensor"]


def verify(t: torch.Tensor, expected: str) -> bool:
    """Whether `t`'s bytes have the digest `expected` ("<algorithm>:<hex>").

    Computes the algorithm `expected` names, whatever `t`'s device. Raises
    UnknownAlgorithmError for an algorithm not in ALGORITHMS, DigestError for a
    malformed digest or a non-contiguous tensor.
    """
    algorithm, value = _parse(expected)
    return _compute(algorithm, {"tensor": t})["tensor"] == f"{algorithm}:{value}"


def check_digest(digest: str) -> str:
    """`digest` normalized ("<algorithm>:<16 lowercase hex>"); UnknownAlgorithmError for an algorithm
    not in ALGORITHMS, DigestError for a malformed one."""
    algorithm, value = _parse(digest)
    return f"{algorithm}:{value}"


def digest_many(tensors: Mapping[str, torch.Tensor], algorithm: str = "") -> dict[str, str]:
    """Name -> digest for every tensor: with `algorithm` (one of ALGORITHMS) that one, else each
    with its device's default (xxh3-64 on CPU, mxh64 elsewhere).

    CUDA tensors are hashed together per device: one synchronize before, one
    read-back of all their results after.
    """
    if algorithm:
        if algorithm not in ALGORITHMS:
            raise UnknownAlgorithmError(algorithm, algorithm)
        return _compute(algorithm, dict(tensors))
    out: dict[str, str] = {}
    cpu = {name: t for name, t in tensors.items() if t.device.type == "cpu"}
    out.update(_compute(XXH3_64, cpu))
    out.update(_compute(MXH64, {name: t for name, t in tensors.items() if name not in cpu}))
    return {name: out[name] for name in tensors}


def mismatches(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, str]) -> list[str]:
    """Names of the tensors whose bytes do not have their `expected` digest, in `expected`'s order.

    Every name in `expected` must be in `tensors`. Tensors are hashed together per
    algorithm (CUDA ones with one synchronize and one read-back per device).
    """
    by_algorithm: dict[str, dict[str, torch.Tensor]] = {}
    wanted: dict[str, str] = {}
    for name, digest in expected.items():
        algorithm, value = _parse(digest)
        by_algorithm.setdefault(algorithm, {})[name] = tensors[name]
        wanted[name] = f"{algorithm}:{value}"
    got: dict[str, str] = {}
    for algorithm, group in by_algorithm.items():
        got.update(_compute(algorithm, group))
    return [name for name in expected if got[name] != wanted[name]]


# --- dispatch ----------------------------------------------------------------

_DIGEST_RE = re.compile(r"([^:]*):([0-9a-fA-F]+)")


def _parse(expected: str) -> tuple[str, str]:
    match = _DIGEST_RE.fullmatch(expected) if isinstance(expected, str) else None
    if match is None:
        algorithm = expected.partition(":")[0] if isinstance(expected, str) and ":" in expected else ""
        if algorithm and algorithm not in ALGORITHMS:
            raise UnknownAlgorithmError(algorithm, expected)
        raise DigestError(
            f"malformed digest {expected!r}: expected '<algorithm>:<hex digits>' (16 for xxh3-64 and mxh64, "
            f"64 for blake3) with an algorithm in {', '.join(ALGORITHMS)}"
        )
    algorithm, value = match.group(1), match.group(2).lower()
    if algorithm not in ALGORITHMS:
        raise UnknownAlgorithmError(algorithm, expected)
    if len(value) != _HEX_DIGITS[algorithm]:
        raise DigestError(f"malformed digest {expected!r}: {algorithm} has {_HEX_DIGITS[algorithm]} hex digits")
    return algorithm, value


def _compute(algorithm: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    views = {name: byte_view(name, t) for name, t in tensors.items()}
    for device in {v.device for v in views.values() if v.device.type == "cuda"}:
        torch.cuda.synchronize(device)
    if algorithm == XXH3_64:
        return {name: f"{XXH3_64}:{_xxh3_64(v):016x}" for name, v in views.items()}
    if algorithm == BLAKE3:
        return {name: f"{BLAKE3}:{_blake3(v)}" for name, v in views.items()}
    results = {name: _mxh64_device(v) for name, v in views.items()}
    out: dict[str, str] = {}
    by_device: dict[torch.device, list[str]] = {}
    for name, value in results.items():
        by_device.setdefault(value.device, []).append(name)
    for names in by_device.values():
        values = torch.stack([results[n] for n in names]).cpu().tolist()  # one read-back per device
        out.update((n, f"{MXH64}:{v & _M64:016x}") for n, v in zip(names, values))
    return out


def byte_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (no copy); DigestError for anything else."""
    if not isinstance(t, torch.Tensor):
        raise DigestError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.device.type == "meta":
        raise DigestError(f"tensor {name!r} is on the meta device and has no bytes to digest")
    if not t.is_contiguous():
        raise DigestError(
            f"tensor {name!r} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); digest the "
            "bytes that are transferred: a contiguous tensor or a uint8 view of its byte span"
        )
    t = t.detach()
    if t.dtype == torch.uint8:
        return t.reshape(-1)
    return t.reshape(-1).view(torch.uint8)


# --- xxh3-64 -------------------------------------------------------------------

_HOST_CHUNK = 64 << 20  # bytes of a non-CPU tensor copied to the host per step


def _xxh3_64(u8: torch.Tensor) -> int:
    try:
        import xxhash
    except ImportError as e:
        raise DigestError("the xxh3-64 digest needs the xxhash package: pip install xxhash") from e
    if u8.device.type == "cpu":
        return xxhash.xxh3_64_intdigest(memoryview(u8.numpy()))
    h = xxhash.xxh3_64()  # streaming gives the same value as one shot
    for start in range(0, u8.numel(), _HOST_CHUNK):
        h.update(memoryview(u8[start : start + _HOST_CHUNK].cpu().numpy()))
    return h.intdigest()


def _blake3(u8: torch.Tensor) -> str:
    """BLAKE3-256 of the bytes, hex: multi-threaded on the host (CUDA tensors streamed in chunks)."""
    try:
        import blake3
    except ImportError as e:
        raise DigestError("the blake3 digest needs the blake3 package: pip install blake3") from e
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if u8.device.type == "cpu":
        h.update(memoryview(u8.numpy()))
    else:
        for start in range(0, u8.numel(), _HOST_CHUNK):
            h.update(memoryview(u8[start : start + _HOST_CHUNK].cpu().numpy()))
    return h.hexdigest()


# --- mxh64 ---------------------------------------------------------------------

_M64 = (1 << 64) - 1
BLOCK_WORDS = 1024
BLOCK_BYTES = 4 * BLOCK_WORDS
_CHUNK_BLOCKS = 4096  # 16 MiB of input per step
_KEY_SEED = 0x6D78_6836_3420_7631  # "mxh64 v1"
_GOLDEN = 0x9E37_79B9_7F4A_7C15
_LEN_KEY = 0xD6E8_FEB8_6659_FD93
_FMIX_C1 = 0xFF51_AFD7_ED55_8CCD
_FMIX_C2 = 0xC4CE_B9FE_1A85_EC53


def _signed(x: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def fmix64(x: int) -> int:
    """MurmurHash3's 64-bit finalizer on a Python int (the reference for _fmix_)."""
    x &= _M64
    x ^= x >> 33
    x = (x * _FMIX_C1) & _M64
    x ^= x >> 33
    x = (x * _FMIX_C2) & _M64
    return x ^ (x >> 33)


@functools.cache
def keys() -> tuple[int, ...]:
    """The B per-position keys (unsigned): splitmix64 outputs made odd."""
    out, state = [], _KEY_SEED
    for _ in range(BLOCK_WORDS):
        state = (state + _GOLDEN) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _M64
        out.append((z ^ (z >> 31)) | 1)
    return tuple(out)


@functools.cache
def _keys_on(device: torch.device) -> torch.Tensor:
    return torch.tensor([_signed(k) for k in keys()], dtype=torch.int64, device=device)


_SHIFT_MASK = (1 << 31) - 1  # keeps the 31 bits a logical >> 33 leaves


def _fmix_(x: torch.Tensor) -> torch.Tensor:
    """fmix64 on an int64 tensor, in place (>> is arithmetic in torch: mask it logical)."""
    x ^= (x >> 33) & _SHIFT_MASK
    x *= _signed(_FMIX_C1)
    x ^= (x >> 33) & _SHIFT_MASK
    x *= _signed(_FMIX_C2)
    x ^= (x >> 33) & _SHIFT_MASK
    return x


def _block_sums(words: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """h[j] = sum_r w[j, r] * K[r] for whole blocks of int32 `words`, written into `out`.

    On CPU, `scratch` (int64, at least as many blocks) is reused for the products: torch's
    mixed-dtype multiply is not vectorized there, and a fresh buffer per chunk page-faults.
    """
    blocks = words.view(-1, BLOCK_WORDS)
    keys = _keys_on(words.device)
    if scratch is not None:
        products = scratch[: blocks.shape[0]]
        products.copy_(blocks).mul_(keys)
    else:
        products = blocks * keys  # int32 * int64 -> int64: sign-extends and multiplies in one kernel
    torch.sum(products, dim=1, out=out)


def _as_words(u8: torch.Tensor) -> torch.Tensor:
    """int32 words of a whole number of blocks; copies only when the bytes are misaligned."""
    if u8.storage_offset() % 4:
        u8 = u8.clone()
    return u8.view(torch.int32)


def _mxh64_device(u8: torch.Tensor) -> torch.Tensor:
    """mxh64 of a flat uint8 tensor, as a 0-dim int64 tensor on its device (not read back)."""
    device = u8.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        n = u8.numel()
        whole, tail = divmod(n, BLOCK_BYTES)
        h = torch.empty(whole + (tail > 0), dtype=torch.int64, device=device)  # 8 bytes per 4 KiB block
        scratch = None
        if device.type == "cpu" and h.numel():
            scratch = torch.empty(min(h.numel(), _CHUNK_BLOCKS), BLOCK_WORDS, dtype=torch.int64)
        for first in range(0, whole, _CHUNK_BLOCKS):
            last = min(first + _CHUNK_BLOCKS, whole)
            _block_sums(_as_words(u8[first * BLOCK_BYTES : last * BLOCK_BYTES]), h[first:last], scratch)
        if tail:
            padded = torch.zeros(BLOCK_BYTES, dtype=torch.uint8, device=device)
            padded[:tail] = u8[whole * BLOCK_BYTES :]
            _block_sums(padded.view(torch.int32), h[whole:], scratch)
        h += torch.arange(1, h.numel() + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN)
        total = _fmix_(h).sum()
        total ^= _signed(fmix64(n + _LEN_KEY))
        return _fmix_(total.view(1)).view(())
