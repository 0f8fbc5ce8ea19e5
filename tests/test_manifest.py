"""sglang_mx.manifest: the id an operator pins (pure)."""

import hashlib

from sglang_mx.manifest import is_manifest_id, manifest_id, weak_digests
from sglang_mx.records import PieceDigest, TensorDescriptor

B3 = "blake3:" + "ab" * 32


def t(name, size=8, digest=B3, addr=0x1000, **kw):
    return TensorDescriptor(name=name, addr=addr, size=size, digest=digest, **kw)


def test_manifest_is_sha256_over_id_rank_and_every_name_size_digest_in_order():
    tensors = [t("a"), t("b", size=4, digest="xxh3-64:" + "0" * 16)]
    want = hashlib.sha256(("sglang-mx manifest v1\nsrc\n3\n" f"a\t8\t{B3}\nb\t4\txxh3-64:{'0' * 16}\n").encode())
    assert manifest_id("src", 3, tensors) == want.hexdigest()
    assert is_manifest_id(manifest_id("src", 3, tensors))


def test_every_part_changes_the_manifest_and_addresses_do_not():
    base = manifest_id("src", 0, [t("a"), t("b")])
    assert manifest_id("src", 0, [t("a"), t("b", addr=0x9999)]) == base  # where bytes live is not what they are
    for other in (manifest_id("other", 0, [t("a"), t("b")]), manifest_id("src", 1, [t("a"), t("b")]),
                  manifest_id("src", 0, [t("b"), t("a")]), manifest_id("src", 0, [t("a"), t("b", size=9)]),
                  manifest_id("src", 0, [t("a"), t("c")]),
                  manifest_id("src", 0, [t("a"), t("b", digest="blake3:" + "cd" * 32)])):
        assert other != base


def test_a_pin_binds_piece_and_chunk_digests_too():
    # A mixed-TP target checks pieces, a pipelined one chunks: a pinned manifest must change when either does,
    # or a seed could publish the pinned whole digests beside forged piece or chunk digests.
    pieces = (PieceDigest(0, 4, B3), PieceDigest(4, 4, B3))
    chunked = dict(size=8192, chunk_bytes=4096, chunks=(B3, B3))
    base = manifest_id("src", 0, [t("a", pieces=pieces), t("b", **chunked)])
    other_piece = (PieceDigest(0, 4, B3), PieceDigest(4, 4, "blake3:" + "cd" * 32))
    for other in (manifest_id("src", 0, [t("a", pieces=other_piece), t("b", **chunked)]),
                  manifest_id("src", 0, [t("a", pieces=pieces[:1]), t("b", **chunked)]),
                  manifest_id("src", 0, [t("a", pieces=pieces), t("b", **{**chunked, "chunks": (B3, "blake3:" + "cd" * 32)})]),
                  manifest_id("src", 0, [t("a", pieces=pieces), t("b", **{**chunked, "chunk_bytes": 8192, "chunks": (B3,)})]),
                  manifest_id("src", 0, [t("a"), t("b", size=8192)])):
        assert other != base
    # A tensor with neither hashes as it always did (ids operators pinned before stay valid).
    assert manifest_id("src", 0, [t("a")]) == hashlib.sha256(f"sglang-mx manifest v1\nsrc\n0\na\t8\t{B3}\n".encode()).hexdigest()


def test_weak_digests_are_missing_or_non_cryptographic_whole_piece_or_chunk_digests():
    tensors = [t("strong"), t("empty", size=0, digest=""), t("none", digest=""),
               t("xxh", digest="xxh3-64:" + "0" * 16), t("weak_piece", pieces=(PieceDigest(0, 1, "mxh64:" + "0" * 16),)),
               t("strong_chunks", size=8192, chunk_bytes=4096, chunks=(B3, B3)),
               t("weak_chunk", size=8192, chunk_bytes=4096, chunks=(B3, "xxh3-64:" + "0" * 16))]
    assert weak_digests(tensors) == ["none", "xxh", "weak_piece", "weak_chunk"]


def test_manifest_id_shape():
    assert not is_manifest_id("ab" * 31) and not is_manifest_id("AB" * 32) and is_manifest_id("ab" * 32)
