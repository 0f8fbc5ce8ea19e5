"""sglang_mx.digest: golden values, change detection, byte views, the CPU/GPU equivalence."""

from __future__ import annotations

import random

import pytest
import torch

from sglang_mx import digest
from sglang_mx.digest import (
    ALGORITHMS,
    DigestError,
    UnknownAlgorithmError,
    digest_many,
    tensor_digest,
    verify,
)
from sglang_mx.errors import MxError
from sglang_mx.model_tensors import _span_view

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

M64 = (1 << 64) - 1


def reference_mxh64(data: bytes) -> str:
    """mxh64 written out word by word from the module docstring, in pure Python."""
    n = len(data)
    padded = data + bytes(-n % digest.BLOCK_BYTES)
    keys = digest.keys()
    total = 0
    for j in range(len(padded) // digest.BLOCK_BYTES):
        block = padded[j * digest.BLOCK_BYTES : (j + 1) * digest.BLOCK_BYTES]
        h = sum(
            int.from_bytes(block[4 * r : 4 * r + 4], "little", signed=True) * keys[r]
            for r in range(digest.BLOCK_WORDS)
        )
        total += digest.fmix64(h + (j + 1) * 0x9E3779B97F4A7C15)
    return f"mxh64:{digest.fmix64((total & M64) ^ digest.fmix64(n + 0xD6E8FEB86659FD93)):016x}"


def mxh64(t: torch.Tensor) -> str:
    """The GPU algorithm, whatever the tensor's device."""
    return digest._compute(digest.MXH64, {"t": t})["t"]


def both(t: torch.Tensor) -> tuple[str, str]:
    return tensor_digest(t), mxh64(t)


def pattern(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- golden values -------------------------------------------------------------


GOLDEN = {
    # bytes i % 251 for i < n; the xxh3-64 values equal xxhash.xxh3_64_hexdigest of the same bytes
    0: ("xxh3-64:2d06800538d394c2", "mxh64:3fe17fba800dc67d"),
    1: ("xxh3-64:c44bdff4074eecdb", "mxh64:d61d550e553bfcdb"),
    7: ("xxh3-64:0cd2084a62406b69", "mxh64:f2fec80268cf4cbc"),
    4096: ("xxh3-64:7135ffa504f1bc71", "mxh64:6b5dfa3473245351"),
    100_003: ("xxh3-64:acf33ba3cf61e369", "mxh64:0643332285f7b104"),
}


@pytest.mark.parametrize("n", sorted(GOLDEN))
def test_golden_values(n):
    t = (torch.arange(n, dtype=torch.int64) % 251).to(torch.uint8)
    assert both(t) == GOLDEN[n]


def test_golden_float_tensor():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # bytes as stored, little-endian
    assert both(t) == ("xxh3-64:8fa0d089b455c444", "mxh64:acecf61e27bbad92")


def test_keys_are_odd_with_distinct_low_words():
    keys = digest.keys()
    assert len(keys) == digest.BLOCK_WORDS
    assert all(k & 1 for k in keys)
    assert len({k & 0xFFFF_FFFF for k in keys}) == len(keys)  # what makes in-block swaps always visible


# --- the torch-op version equals the pure-Python reference ---------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 1023, 4095, 4096, 4097, 8192, 12_345])
def test_mxh64_matches_reference(n):
    data = pattern(n, seed=n)
    assert mxh64(data) == reference_mxh64(data.numpy().tobytes())


def test_mxh64_matches_reference_with_extreme_words():
    # words at the int32 limits exercise the sign extension and the wraparound
    words = torch.tensor([-(2**31), 2**31 - 1, -1, 0, 1] * 1000, dtype=torch.int32)
    assert mxh64(words) == reference_mxh64(words.numpy().tobytes())


def test_mxh64_across_chunks(monkeypatch):
    """A tensor spanning several chunks gives the same digest as with one chunk."""
    data = pattern(5 * digest.BLOCK_BYTES + 17, seed=3)
    one_chunk = mxh64(data)
    monkeypatch.setattr(digest, "_CHUNK_BLOCKS", 2)
    assert mxh64(data) == one_chunk == reference_mxh64(data.numpy().tobytes())


# --- what is detected ----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_single_byte_change_is_detected_exhaustively(algorithm):
    base = pattern(64, seed=1)
    compute = mxh64 if algorithm == "mxh64" else tensor_digest
    seen = {compute(base)}
    for i in range(base.numel()):
        for delta in (1, 0x80, 0xFF):
            changed = base.clone()
            changed[i] = (int(changed[i]) + delta) % 256
            value = compute(changed)
            assert value not in seen, (i, delta)
            seen.add(value)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_random_single_byte_changes_on_larger_tensors(algorithm):
    compute = mxh64 if algorithm == "mxh64" else tensor_digest
    rng = random.Random(7)
    for n in (4096, 65_537, 3 * digest.BLOCK_BYTES * 7 + 5):
        base = pattern(n, seed=n)
        expected = compute(base)
        for _ in range(20):
            changed = base.clone()
            i = rng.randrange(n)
            changed[i] = (int(changed[i]) + rng.randrange(1, 256)) % 256
            assert compute(changed) != expected, (n, i)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("block", [2, 4, 512, digest.BLOCK_BYTES, 3 * digest.BLOCK_BYTES])
def test_swapped_blocks_are_detected(algorithm, block):
    compute = mxh64 if algorithm == "mxh64" else tensor_digest
    base = pattern(16 * block, seed=block)
    expected = compute(base)
    for a, b in [(0, 1), (0, 15), (3, 9), (14, 15)]:
        swapped = base.clone().view(16, block)
        swapped[[a, b]] = swapped[[b, a]]
        assert compute(swapped) != expected, (block, a, b)


def test_swapped_words_in_one_block_differing_only_in_the_top_bit():
    """The pair a linear hash over 64-bit words would miss: Δ = 2**31 in one word pair."""
    words = torch.zeros(digest.BLOCK_WORDS, dtype=torch.int32)
    words[3] = -(2**31)
    swapped = words.clone()
    swapped[3], swapped[700] = words[700], words[3]
    assert mxh64(words) != mxh64(swapped)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_prefix_different_lengths_differ(algorithm):
    compute = mxh64 if algorithm == "mxh64" else tensor_digest
    data = torch.zeros(3 * digest.BLOCK_BYTES, dtype=torch.uint8)
    values = [compute(data[:n]) for n in (0, 1, 2, 3, 4, 5, 4095, 4096, 4097, 3 * digest.BLOCK_BYTES)]
    assert len(set(values)) == len(values)


# --- inputs --------------------------------------------------------------------


def test_zero_size_tensors_of_any_shape_and_dtype_agree():
    empties = [torch.empty(0), torch.empty(0, 5, dtype=torch.bfloat16), torch.empty(3, 0, dtype=torch.uint8)]
    assert len({both(t) for t in empties}) == 1


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_dtypes_digest_their_bytes(dtype):
    t = torch.randn(33, 7, generator=torch.Generator().manual_seed(5)).to(dtype)
    raw = t.view(torch.uint8).reshape(-1)
    assert both(t) == both(raw.clone())
    assert mxh64(t) == reference_mxh64(raw.numpy().tobytes())
    assert verify(t, tensor_digest(t)) and verify(t, mxh64(t))


@pytest.mark.parametrize("odd", [1, 3, 5, 4097])
def test_odd_byte_lengths(odd):
    t = pattern(odd, seed=odd)
    assert mxh64(t) == reference_mxh64(t.numpy().tobytes())
    assert verify(t, tensor_digest(t))


def test_scalar_tensor():
    t = torch.tensor(1.5, dtype=torch.float32)
    assert both(t) == both(torch.tensor([1.5]))


def test_non_contiguous_span_views_digest_the_transferred_bytes():
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    strided = base.t()  # what collect_tensors publishes as a span view
    span = _span_view(strided)
    assert span.dtype == torch.uint8 and span.is_contiguous()
    assert both(span) == both(base)  # the span of a transpose is the base's bytes
    inner = base[2:5]  # a contiguous slice with a storage offset
    assert both(inner) == both(inner.clone())


def test_misaligned_byte_views_are_handled():
    data = pattern(3 * digest.BLOCK_BYTES + 9, seed=11)
    for offset in (1, 2, 3):
        view = data[offset:]
        assert view.storage_offset() % 4 == offset
        assert mxh64(view) == reference_mxh64(view.numpy().tobytes())
        assert both(view) == both(view.clone())


def test_non_contiguous_tensor_is_refused():
    with pytest.raises(DigestError, match="not contiguous.*uint8 view of its byte span"):
        tensor_digest(torch.zeros(4, 4).t())


def test_meta_tensor_is_refused():
    with pytest.raises(DigestError, match="meta device"):
        tensor_digest(torch.empty(4, device="meta"))


# --- the public API --------------------------------------------------------------


def test_cpu_tensors_use_xxh3():
    assert tensor_digest(torch.zeros(4)).startswith("xxh3-64:")
    assert ALGORITHMS == ("xxh3-64", "mxh64", "blake3")


def test_verify_detects_a_change_with_either_algorithm():
    t = pattern(10_000, seed=4)
    digests = both(t)
    t[1234] ^= 1
    assert not any(verify(t, d) for d in digests)
    t[1234] ^= 1
    assert all(verify(t, d) for d in digests)


def test_verify_accepts_uppercase_hex():
    t = pattern(100)
    assert verify(t, tensor_digest(t).upper().replace("XXH3-64", "xxh3-64"))


def test_verify_names_an_unknown_algorithm_and_the_allowed_ones():
    with pytest.raises(UnknownAlgorithmError) as info:
        verify(torch.zeros(4), "sha256:" + "0" * 64)
    assert str(info.value) == (
        "unknown digest algorithm 'sha256' in 'sha256:" + "0" * 64 + "'; allowed: xxh3-64, mxh64, blake3"
    )
    assert info.value.algorithm == "sha256" and info.value.allowed == ALGORITHMS
    assert isinstance(info.value, MxError)


@pytest.mark.parametrize("bad", ["", "0123456789abcdef", "mxh64:", "mxh64:0123", "xxh3-64:zz23456789abcdef"])
def test_verify_rejects_malformed_digests(bad):
    with pytest.raises(DigestError, match="malformed digest"):
        verify(torch.zeros(4), bad)


def test_digest_many_keeps_names_and_order():
    tensors = {"b": pattern(10, 1), "a": torch.ones(3, dtype=torch.bfloat16), "c": torch.empty(0)}
    out = digest_many(tensors)
    assert list(out) == ["b", "a", "c"]
    assert out == {name: tensor_digest(t) for name, t in tensors.items()}


# --- CUDA ------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("n", [0, 1, 5, 4096, 4097, 1_000_003])
def test_cuda_mxh64_equals_cpu(n):
    t = pattern(n, seed=n)
    on_gpu = tensor_digest(t.cuda())
    assert on_gpu.startswith("mxh64:")
    assert on_gpu == mxh64(t)
    if n < 5000:
        assert on_gpu == reference_mxh64(t.numpy().tobytes())


@cuda
def test_cuda_golden_values():
    for n, (xxh3, mxh) in GOLDEN.items():
        t = (torch.arange(n, dtype=torch.int64) % 251).to(torch.uint8).cuda()
        assert tensor_digest(t) == mxh
        assert verify(t, xxh3)  # streamed to the host


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_cuda_dtypes_and_span_views(dtype):
    t = torch.randn(257, 129, generator=torch.Generator().manual_seed(9)).to(dtype)
    assert tensor_digest(t.cuda()) == mxh64(t)
    span = _span_view(t.cuda().t())
    assert tensor_digest(span) == mxh64(t)
    offset = t.cuda().view(torch.uint8).reshape(-1)[3:]  # misaligned for int32 loads
    assert tensor_digest(offset) == mxh64(t.view(torch.uint8).reshape(-1)[3:])


@cuda
def test_cuda_digest_many_sees_prior_work_on_another_stream():
    t = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    expected = mxh64(torch.ones(64 << 20, dtype=torch.uint8))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # after the zeros
    with torch.cuda.stream(side):
        t.fill_(1)  # queued on another stream; digest_many synchronizes the device first
    out = digest_many({"t": t, "cpu": torch.ones(3)})
    assert out["t"] == expected
    assert out["cpu"].startswith("xxh3-64:")


# --- blake3: the cryptographic digest a pinned manifest needs ---

def test_blake3_is_the_256_bit_blake3_of_the_bytes_and_catches_a_changed_byte():
    import blake3

    t = torch.arange(1000, dtype=torch.float32)
    d = tensor_digest(t, "blake3")
    assert d == "blake3:" + blake3.blake3(t.numpy().tobytes()).hexdigest() and len(d) == len("blake3:") + 64
    assert verify(t, d)
    u = t.clone()
    u.view(torch.uint8)[1234] ^= 1
    assert not verify(u, d)
    assert digest_many({"a": t, "b": u}, "blake3")["a"] == d


@pytest.mark.parametrize("bad", ["blake3:" + "0" * 16, "xxh3-64:" + "0" * 64])
def test_a_digest_of_the_wrong_length_for_its_algorithm_is_malformed(bad):
    with pytest.raises(DigestError, match="hex digits"):
        verify(torch.zeros(2), bad)
