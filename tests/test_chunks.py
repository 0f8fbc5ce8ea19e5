"""sglang_mx.chunks: chunk digests, unit names, and how a pull cuts its destinations into chunks (pure)."""

import pytest
import torch

from sglang_mx.chunks import UnitTensors, chunk_digests_of, parse_unit, spans, unit_name, units
from sglang_mx.config import ConfigError, MxConfig
from sglang_mx.digest import tensor_digest
from sglang_mx.errors import VerificationError
from sglang_mx.records import TensorDescriptor
from sglang_mx.target.stripes import Destination, chunked
from sglang_mx.target.verify import check_published, digest_verifier


def _bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_spans_cut_every_chunk_bytes_and_the_last_is_shorter():
    assert spans(10000, 4096) == [(0, 4096), (4096, 4096), (8192, 1808)]
    assert spans(8192, 4096) == [(0, 4096), (4096, 4096)]
    with pytest.raises(ValueError):
        spans(10, 0)


def test_unit_names_round_trip_and_plain_names_are_not_units():
    assert parse_unit(unit_name("model.layers.0.mlp.experts.w13_weight", 4096, 1808)) == (
        "model.layers.0.mlp.experts.w13_weight", 4096, 1808)
    for plain in ("model.embed_tokens.weight", "a#b", "w#1", "w#1+", "w#+2"):
        assert parse_unit(plain) is None


def test_chunk_digests_are_the_digests_of_each_chunk_and_small_tensors_have_none():
    big, small = _bytes(10000, 1).view(torch.int16), _bytes(4096, 2)
    out = chunk_digests_of({"big": big, "small": small}, 4096)
    assert set(out) == {"big"}  # a tensor no larger than a chunk is verified whole only
    chunk_bytes, digests = out["big"]
    flat = big.view(torch.uint8)
    assert chunk_bytes == 4096
    assert digests == tuple(tensor_digest(flat[o:o + n]) for o, n in spans(10000, 4096))


def test_chunks_a_pull_checked_are_kept_at_their_size_instead_of_hashed_again():
    t = _bytes(10000, 3)
    known = {unit_name("t", o, n): f"xxh3-64:{i:016x}" for i, (o, n) in enumerate(spans(10000, 8192))}
    assert chunk_digests_of({"t": t}, 4096, known=known) == {"t": (8192, tuple(known.values()))}
    incomplete = dict(list(known.items())[:1])  # not every chunk: cut and hashed as configured
    assert chunk_digests_of({"t": t}, 4096, known=incomplete)["t"][0] == 4096


def test_units_of_a_record_are_its_tensors_and_each_chunk_of_a_chunked_one():
    record = [TensorDescriptor("a", 0, 8, digest="d0"),
              TensorDescriptor("b", 0, 10000, digest="d", chunk_bytes=4096, chunks=("c0", "c1", "c2"))]
    assert list(units(record)) == [("a", 8, "d0"), ("b#0+4096", 4096, "c0"), ("b#4096+4096", 4096, "c1"),
                                   ("b#8192+1808", 1808, "c2")]


def test_a_verifier_checks_a_chunk_against_exactly_its_bytes():
    t = _bytes(10000, 4)
    verifier = digest_verifier({"t": t})
    expected = {unit_name("t", o, n): tensor_digest(t[o:o + n]) for o, n in spans(10000, 4096)}
    assert verifier(expected) == []
    t[5000] ^= 0xFF  # one byte of the second chunk
    assert verifier(expected) == ["t#4096+4096"]
    assert UnitTensors({"t": t})["t"] is t
    with pytest.raises(KeyError):
        UnitTensors({"t": t})["u#0+4"]


def test_a_pull_cuts_chunked_destinations_tied_names_and_all_and_leaves_the_rest():
    dests = [Destination(0x1000, 4096, ("small",)), Destination(0x10000, 10000, ("embed", "lm_head")),
             Destination(0x20000, 9000, ("other",))]
    out = chunked(dests, {"embed": 4096, "lm_head": 4096})
    assert out[0] == dests[0] and out[-1] == dests[-1]
    assert out[1:-1] == [Destination(0x10000 + o, n, (unit_name("embed", o, n), unit_name("lm_head", o, n)))
                         for o, n in spans(10000, 4096)]
    assert sum(d.size for d in out) == sum(d.size for d in dests)
    # A tensor published in a single chunk is that chunk's unit all the same (as a partial seed's bitmap names it).
    assert chunked([Destination(0x1000, 4096, ("one",))], {"one": 4096}) == [
        Destination(0x1000, 4096, (unit_name("one", 0, 4096),))]


def test_a_seed_whose_chunk_digests_do_not_cut_its_tensor_is_refused():
    good = "xxh3-64:" + "0" * 16
    with pytest.raises(VerificationError, match="2 chunk digests for 10000 bytes cut every 4096") as e:
        check_published([TensorDescriptor("t", 0, 10000, digest=good, chunk_bytes=4096, chunks=(good, good))], "s")
    assert e.value.tensors == ("t",)
    with pytest.raises(VerificationError, match="malformed"):
        check_published([TensorDescriptor("t", 0, 8192, digest=good, chunk_bytes=4096, chunks=(good, "xxh3-64:zz"))],
                        "s")
    check_published([TensorDescriptor("t", 0, 8192, digest=good, chunk_bytes=4096, chunks=(good, good))], "s")


def test_chunk_bytes_is_zero_or_a_positive_multiple_of_4096():
    assert MxConfig(url="localhost:1").chunk_bytes == 64 << 20
    assert MxConfig(url="localhost:1", chunk_bytes=0).chunk_bytes == 0
    for bad in (-4096, 1000, 4097):
        with pytest.raises(ConfigError, match="chunk_bytes"):
            MxConfig(url="localhost:1", chunk_bytes=bad)


def test_a_seed_cuts_chunks_and_a_cascading_target_republishes_its_seeds_and_cuts_none_of_its_own():
    from sglang_mx.records import SourceIdentity
    from sglang_mx.seed import SeedOptions, seed_descriptors

    identity = SourceIdentity(model_name="m", tensor_parallel_size=1, dtype="uint8")
    tensors = {"big": _bytes(20000, 5), "small": _bytes(100, 6)}
    root, root_topology = seed_descriptors(tensors, identity, worker_rank=0, options=SeedOptions(chunk_bytes=8192))
    big = {t.name: t for t in root}["big"]
    assert big.chunk_bytes == 8192 and len(big.chunks) == 3 and not {t.name: t for t in root}["small"].chunks
    # A target that pulled with chunks of its seed's (every unit digest known) republishes them as they are...
    known = {"big": big.digest, "small": {t.name: t for t in root}["small"].digest,
             **{unit_name("big", o, n): d for (o, n), d in zip(spans(20000, 8192), big.chunks)}}
    again, topology = seed_descriptors(tensors, identity, worker_rank=0, options=SeedOptions(chunk_bytes=4096),
                                       known_digests=known)
    assert [(t.chunk_bytes, t.chunks) for t in again] == [(t.chunk_bytes, t.chunks) for t in root]
    assert topology["mx_manifest"] == root_topology["mx_manifest"]
    # ...and one whose seed had none cuts none either, whatever its own chunk_bytes: the manifest stays its seed's.
    plain, plain_topology = seed_descriptors(tensors, identity, worker_rank=0, options=SeedOptions(chunk_bytes=0))
    cascaded, topology = seed_descriptors(tensors, identity, worker_rank=0, options=SeedOptions(chunk_bytes=4096),
                                          known_digests={t.name: t.digest for t in plain})
    assert not any(t.chunks for t in cascaded) and topology["mx_manifest"] == plain_topology["mx_manifest"]
