"""sglang_mx.identity: golden mx_source_id values and the canonicalisation rules."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_mx.identity import canonical_identity, mx_source_id
from sglang_mx.layout import global_rank
from sglang_mx.records import BackendFramework, SourceIdentity, SourceType

DEEPSEEK = SourceIdentity(
    mx_version="0.5.0",
    mx_source_type=SourceType.WEIGHTS,
    model_name="deepseek-ai/DeepSeek-V3",
    backend_framework=BackendFramework.VLLM,
    tensor_parallel_size=8,
    pipeline_parallel_size=1,
    expert_parallel_size=0,
    dtype="bfloat16",
)
QWEN = SourceIdentity(
    mx_version="0.7.0",
    mx_source_type=SourceType.WEIGHTS,
    model_name="Qwen/Qwen3-8B",
    backend_framework=BackendFramework.SGLANG,
    tensor_parallel_size=2,
    pipeline_parallel_size=1,
    expert_parallel_size=1,
    dtype="bfloat16",
)

OPTIONAL_FIELDS = (
    "backend_framework_version",
    "torch_version",
    "cuda_version",
    "triton_version",
    "gpu_arch",
    "compile_config_digest",
)
ALWAYS_PRESENT = {
    "mx_version", "mx_source_type", "model_name", "backend_framework", "tensor_parallel_size",
    "pipeline_parallel_size", "expert_parallel_size", "dtype", "quantization", "revision", "extra_parameters",
}


# --- golden values (FACTS.md section 1, computed by the reference implementation) ----------------

@pytest.mark.parametrize(
    "identity, expected",
    [
        (DEEPSEEK, "5a5f555570065064"),
        (dataclasses.replace(DEEPSEEK, revision="abc123def4567890"), "d0c184b2a9a34c82"),
        (dataclasses.replace(DEEPSEEK, extra_parameters={"Foo": "a", "foo": "b"}), "bf71fb9340cd940a"),
        (QWEN, "8b7aa4b533b72278"),
    ],
    ids=["deepseek", "deepseek+revision", "deepseek+colliding-extra", "qwen3-8b-sglang"],
)
def test_golden_ids(identity, expected):
    assert mx_source_id(identity) == expected


def test_id_is_16_lowercase_hex():
    assert re.fullmatch(r"[0-9a-f]{16}", mx_source_id(QWEN))


# --- non-ASCII: raw UTF-8, like ModelExpress's Rust server ---------------------------------------

NON_ASCII = dataclasses.replace(QWEN, model_name="ACME/Modèle-日本語")
# Written out by hand: the exact bytes the id must be the hash of.
RAW_JSON = (
    '{"backend_framework":2,"dtype":"bfloat16","expert_parallel_size":1,"extra_parameters":{},'
    '"model_name":"acme/modèle-日本語","mx_source_type":0,"mx_version":"0.7.0",'
    '"pipeline_parallel_size":1,"quantization":"","revision":"","tensor_parallel_size":2}'
)
ESCAPED_JSON = RAW_JSON.replace("è", "\\u00e8").replace("日本語", "\\u65e5\\u672c\\u8a9e")


def test_non_ascii_is_hashed_as_raw_utf8():
    expected = hashlib.sha256(RAW_JSON.encode("utf-8")).hexdigest()[:16]
    assert expected == "b1b0020ba0c4d5a9"
    assert mx_source_id(NON_ASCII) == expected


def test_non_ascii_differs_from_escaped_form():
    escaped = hashlib.sha256(ESCAPED_JSON.encode("ascii")).hexdigest()[:16]
    assert "\\u65e5" in ESCAPED_JSON  # the escaped form really is escaped
    assert mx_source_id(NON_ASCII) != escaped


# --- canonicalisation rules -----------------------------------------------------------------------

def test_strings_are_lowercased():
    shouted = dataclasses.replace(
        QWEN, model_name="QWEN/QWEN3-8B", dtype="BFloat16", mx_version="0.7.0", quantization="", revision=""
    )
    assert mx_source_id(shouted) == mx_source_id(QWEN)
    mixed = dataclasses.replace(QWEN, quantization="FP8", revision="ABC", torch_version="2.13.0+CPU")
    lower = dataclasses.replace(QWEN, quantization="fp8", revision="abc", torch_version="2.13.0+cpu")
    assert mx_source_id(mixed) == mx_source_id(lower)


def test_numbers_and_enums_are_integers_and_zero_is_kept():
    canonical = canonical_identity(DEEPSEEK)
    assert canonical["expert_parallel_size"] == 0
    assert canonical["backend_framework"] == 1 and type(canonical["backend_framework"]) is int
    assert canonical["mx_source_type"] == 0 and type(canonical["mx_source_type"]) is int


def test_every_field_changes_the_id():
    base = mx_source_id(QWEN)
    changed = {
        "mx_version": "0.7.1", "mx_source_type": SourceType.LORA, "model_name": "Qwen/Qwen3-4B",
        "backend_framework": BackendFramework.VLLM, "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
        "expert_parallel_size": 2, "dtype": "float16", "quantization": "fp8", "revision": "r1",
        "extra_parameters": {"k": "v"},
        **{name: "x" for name in OPTIONAL_FIELDS},
    }
    for name, value in changed.items():
        assert mx_source_id(dataclasses.replace(QWEN, **{name: value})) != base, name


def test_extra_parameters_collision_first_sorted_key_wins():
    # "Foo" sorts before "foo" (uppercase first), so its value wins, lowercased.
    canonical = canonical_identity(dataclasses.replace(DEEPSEEK, extra_parameters={"foo": "b", "Foo": "A"}))
    assert canonical["extra_parameters"] == {"foo": "a"}
    only_upper = dataclasses.replace(DEEPSEEK, extra_parameters={"Foo": "a"})
    both = dataclasses.replace(DEEPSEEK, extra_parameters={"foo": "b", "Foo": "a"})
    assert mx_source_id(both) == mx_source_id(only_upper) == "bf71fb9340cd940a"


def test_extra_parameters_keys_and_values_lowercased():
    canonical = canonical_identity(dataclasses.replace(QWEN, extra_parameters={"KV_Cache": "FP8", "b": "X"}))
    assert canonical["extra_parameters"] == {"kv_cache": "fp8", "b": "x"}


def test_empty_extra_parameters_is_an_empty_object():
    assert canonical_identity(QWEN)["extra_parameters"] == {}


def test_optional_fields_only_when_non_empty():
    assert set(canonical_identity(QWEN)) == ALWAYS_PRESENT
    for name in OPTIONAL_FIELDS:
        with_field = canonical_identity(dataclasses.replace(QWEN, **{name: "SM90"}))
        assert set(with_field) == ALWAYS_PRESENT | {name}
        assert with_field[name] == "sm90"


def test_always_present_fields_are_kept_when_empty():
    canonical = canonical_identity(SourceIdentity(model_name="m"))
    assert canonical["revision"] == "" and canonical["quantization"] == "" and canonical["mx_version"] == ""


_keys = st.text(alphabet="abcXYZ_-.", min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_keys, st.text(max_size=5), max_size=6), st.randoms(use_true_random=False))
def test_extra_parameters_order_does_not_matter(params, rnd):
    items = list(params.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert mx_source_id(dataclasses.replace(QWEN, extra_parameters=params)) == mx_source_id(
        dataclasses.replace(QWEN, extra_parameters=shuffled)
    )


# --- global_rank ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "tp_rank, tp_size, pp_rank, expected",
    [(0, 1, 0, 0), (1, 2, 0, 1), (0, 2, 1, 2), (1, 2, 3, 7), (3, 4, 2, 11)],
)
def test_global_rank(tp_rank, tp_size, pp_rank, expected):
    assert global_rank(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank) == expected


def test_global_rank_defaults_to_pp_rank_zero():
    assert global_rank(tp_rank=1, tp_size=4) == 1


def test_global_ranks_are_unique_across_the_grid():
    ranks = [global_rank(tp_rank=t, tp_size=4, pp_rank=p) for p in range(3) for t in range(4)]
    assert sorted(ranks) == list(range(12))


@pytest.mark.parametrize(
    "tp_rank, tp_size, pp_rank, named",
    [(-1, 2, 0, "tp_rank=-1"), (2, 2, 0, "tp_rank=2"), (0, 0, 0, "tp_rank=0"), (0, 2, -1, "pp_rank=-1")],
)
def test_global_rank_rejects_bad_input(tp_rank, tp_size, pp_rank, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        global_rank(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank)


def test_global_rank_is_keyword_only():
    with pytest.raises(TypeError):
        global_rank(0, 2)  # type: ignore[misc]
