"""SGLang rank facts -> SourceIdentity (identity_for): anything that changes bytes must change the id."""

import dataclasses
import hashlib

import pytest

from sglang_mx.config import MxConfig
from sglang_mx.identity import mx_source_id
from sglang_mx.layout import RankInfo, identity_for, layout_refusal, model_identity, model_source_id
from sglang_mx.records import BackendFramework

INFO = RankInfo(model_path="/models/llama", tp_size=2, tp_rank=1, pp_size=2, pp_rank=1, ep_size=1,
                dtype="bfloat16", device="cuda", framework_version="0.5.23",
                layout={"attn_tp_size": "2", "moe_ep_size": "1"})


def test_identity_fields():
    identity = identity_for(INFO, MxConfig())
    assert identity.backend_framework == BackendFramework.SGLANG
    assert identity.model_name == "/models/llama"
    assert (identity.tensor_parallel_size, identity.pipeline_parallel_size, identity.expert_parallel_size) == (2, 2, 1)
    assert identity.dtype == "bfloat16" and identity.backend_framework_version == "0.5.23"
    assert identity.extra_parameters == {"device": "cuda", "attn_tp_size": "2", "moe_ep_size": "1",
                                         "model_name_sha256": hashlib.sha256(b"/models/llama").hexdigest()[:16]}
    assert INFO.worker_rank == 3  # pp_rank * tp_size + tp_rank


def test_config_model_name_and_revision_win():
    identity = identity_for(dataclasses.replace(INFO, revision="main"), MxConfig(model_name="meta/llama", revision="abc"))
    assert (identity.model_name, identity.revision) == ("meta/llama", "abc")


def test_ranks_of_one_instance_share_the_id():
    assert mx_source_id(identity_for(INFO, MxConfig())) == mx_source_id(
        identity_for(dataclasses.replace(INFO, tp_rank=0, pp_rank=0), MxConfig()))


@pytest.mark.parametrize("change", [
    {"tp_size": 4}, {"pp_size": 1}, {"ep_size": 2}, {"dtype": "float16"}, {"quantization": "fp8"},
    {"revision": "v2"}, {"device": "cpu"}, {"framework_version": "0.5.24"}, {"layout": {"attn_tp_size": "1"}},
    {"model_path": "/models/other"}, {"model_path": "/models/LLAMA"}, {"checkpoint": "files:ab"},
    {"model_overrides": '{"rope_theta": 1e6}'},
])
def test_anything_that_changes_layout_changes_the_id(change):
    base = mx_source_id(identity_for(INFO, MxConfig()))
    assert mx_source_id(identity_for(dataclasses.replace(INFO, **change), MxConfig())) != base


@pytest.mark.parametrize("change", [
    {"byte_settings": {"moe_runner_backend": "flashinfer_trtllm"}}, {"torch_version": "2.14.0"},
    {"cuda_version": "13.0"}, {"gpu_arch": "sm_100"}, {"layout_fingerprint": "0123456789abcdef"},
])
def test_what_decides_the_bytes_changes_the_id(change):
    base = mx_source_id(identity_for(INFO, MxConfig()))
    assert mx_source_id(identity_for(dataclasses.replace(INFO, **change), MxConfig())) != base


def test_gpu_facts_fill_modelexpress_identity_fields():
    identity = identity_for(dataclasses.replace(INFO, torch_version="2.11.0", cuda_version="13.0", gpu_arch="sm_90",
                                                layout_fingerprint="00ff"), MxConfig())
    assert (identity.torch_version, identity.cuda_version, identity.gpu_arch) == ("2.11.0", "13.0", "sm_90")
    assert identity.extra_parameters["layout_fingerprint"] == "00ff"


def test_a_draft_model_has_an_identity_of_its_own():
    served = identity_for(INFO, MxConfig(model_name="meta/llama"))
    draft = identity_for(dataclasses.replace(INFO, role="draft"), MxConfig(model_name="meta/llama"))
    assert draft.model_name == "meta/llama:draft" and draft.extra_parameters["role"] == "draft"
    assert mx_source_id(draft) != mx_source_id(served)
    # Without model_name the draft's own path names it.
    path_draft = identity_for(dataclasses.replace(INFO, role="draft", model_path="/models/draft"), MxConfig())
    assert path_draft.model_name == "/models/draft"


# --- the model identity of mixed layouts (sglang_mx.layout) -------------------------------------

PLAIN = RankInfo(model_path="/models/llama", tp_size=2, tp_rank=1, dtype="bfloat16", device="cpu",
                 framework_version="0.5.23", layout={"attn_tp_size": "2", "moe_tp_size": "2", "moe_ep_size": "1"},
                 layout_fingerprint="abcd")


def test_model_id_is_the_same_across_tp_layouts_and_ranks():
    tp1 = dataclasses.replace(PLAIN, tp_size=1, tp_rank=0, layout={"attn_tp_size": "1", "moe_tp_size": "1"},
                              layout_fingerprint="other")
    assert model_source_id(PLAIN, MxConfig()) == model_source_id(tp1, MxConfig())
    assert mx_source_id(identity_for(PLAIN, MxConfig())) != mx_source_id(identity_for(tp1, MxConfig()))
    identity = model_identity(PLAIN, MxConfig())
    assert (identity.tensor_parallel_size, identity.pipeline_parallel_size, identity.expert_parallel_size) == (0, 0, 0)
    assert "layout_fingerprint" not in identity.extra_parameters and "attn_tp_size" not in identity.extra_parameters


@pytest.mark.parametrize("change", [
    {"dtype": "float16"}, {"revision": "v2"}, {"device": "cuda"}, {"framework_version": "0.5.24"},
    {"model_path": "/models/other"}, {"byte_settings": {"moe_runner_backend": "triton"}}, {"gpu_arch": "sm_90"},
])
def test_model_id_changes_with_what_decides_bytes(change):
    assert model_source_id(dataclasses.replace(PLAIN, **change), MxConfig()) != model_source_id(PLAIN, MxConfig())


@pytest.mark.parametrize("change, reason", [
    ({}, ""),
    ({"pp_size": 2}, "pipeline parallelism (PP 2)"),
    ({"ep_size": 2}, "expert parallelism (EP 2)"),
    ({"quantization": "fp8"}, "quantized models (fp8)"),
    ({"role": "draft"}, "a draft model"),
    ({"layout": {"attn_tp_size": "1"}}, "attn_tp_size=1 (plain TP needs 2)"),
    ({"layout": {"attn_dp_size": "2"}}, "attn_dp_size=2 (plain TP needs 1)"),
])
def test_layout_refusal_names_what_cannot_be_resharded(change, reason):
    found = layout_refusal(dataclasses.replace(PLAIN, **change))
    assert (reason in found) if reason else found == ""


def test_names_that_differ_only_in_case_do_not_pair():
    """The wire's rule lowercases model names; the exact name's hash keeps them apart."""
    upper = identity_for(dataclasses.replace(INFO, model_path="/models/Llama"), MxConfig())
    assert mx_source_id(upper) != mx_source_id(identity_for(INFO, MxConfig()))


def test_the_checkpoint_key_names_the_content_for_both_sides():
    computed = identity_for(dataclasses.replace(INFO, checkpoint="files:aa"), MxConfig())
    named = identity_for(dataclasses.replace(INFO, checkpoint="files:aa"), MxConfig(checkpoint="hub:c0ffee"))
    assert computed.extra_parameters["checkpoint"] == "files:aa" and named.extra_parameters["checkpoint"] == "hub:c0ffee"


def test_model_overrides_are_compared_as_json():
    a = identity_for(dataclasses.replace(INFO, model_overrides='{"b": 1, "a": 2}'), MxConfig())
    b = identity_for(dataclasses.replace(INFO, model_overrides='{ "a": 2, "b": 1 }'), MxConfig())
    none = identity_for(dataclasses.replace(INFO, model_overrides="{}"), MxConfig())
    assert mx_source_id(a) == mx_source_id(b) and mx_source_id(none) == mx_source_id(identity_for(INFO, MxConfig()))
