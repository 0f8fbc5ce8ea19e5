"""Who may pair with whom: an SGLang rank's facts (`RankInfo`), the SourceIdentity it publishes
under and asks for, and the layout rules of mixed-layout pulls.

`identity_for` turns a `RankInfo` (plain facts about one SGLang rank, gathered
by sglang_mx.sglang) into the SourceIdentity that seeds publish under and
targets ask for; anything that changes a tensor's bytes or layout is in it.
`model_identity` is what the model *is* whatever its layout, `layout_refusal`
says when a rank's layout can be resharded at all, and `seed_topology` is what
a seed advertises so that targets of other layouts find it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Mapping

from sglang_mx.config import MxConfig
from sglang_mx.identity import mx_source_id
from sglang_mx.records import (
    TOPOLOGY_INSTANCE, TOPOLOGY_MODEL_ID, TOPOLOGY_PP_SIZE, TOPOLOGY_TP_SIZE, BackendFramework, SourceIdentity,
)

MX_VERSION = "0.7.0"  # the ModelExpress wire revision we speak


def global_rank(*, tp_rank: int, tp_size: int, pp_rank: int = 0) -> int:
    """The worker_rank a rank publishes under: pp_rank * tp_size + tp_rank.

    Seeds and targets pair rank for rank, so pipeline stages never collide.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside 0..{tp_size - 1} (tp_size={tp_size})")
    if pp_rank < 0:
        raise ValueError(f"pp_rank={pp_rank} must be >= 0")
    return pp_rank * tp_size + tp_rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankInfo:
    """The facts about one SGLang rank that decide which seeds it may pair with."""

    model_path: str
    tp_size: int
    tp_rank: int
    pp_size: int = 1
    pp_rank: int = 0
    ep_size: int = 1
    dtype: str  # resolved, e.g. "bfloat16"
    quantization: str = ""
    revision: str = ""
    device: str = "cuda"  # "cuda", "cpu", ...
    framework_version: str = ""  # SGLang's version: model code decides layouts
    # Other settings that change tensor layout (attention/MoE splits, ...).
    layout: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # SGLang settings and environment flags that repack weights in place at equal shapes
    # (MoE runner, FP8/FP4 GEMM backends, DeepGEMM, ...): name -> value.
    byte_settings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    torch_version: str = ""
    cuda_version: str = ""  # "" off CUDA
    gpu_arch: str = ""  # e.g. "sm_90"; FP8 repacking differs between GPU generations
    # sglang_mx.model_tensors.layout_fingerprint of the published tensors (names, shapes,
    # dtypes, strides, in order): two builds that lay tensors out differently never pair.
    layout_fingerprint: str = ""
    role: str = ""  # "draft" for a speculative-decoding draft model; "" for the served model
    # What the checkpoint is by content (sglang_mx.checkpoint.content_id), and what says it: SGLang's
    # --model-checksum manifest, when given. "" until the glue fills it in (publish, target load).
    checkpoint: str = ""
    checksum_manifest: str = ""
    # SGLang's --json-model-override-args as given ("" none): they change the model built from the files.
    model_overrides: str = ""

    @property
    def worker_rank(self) -> int:
        return global_rank(tp_rank=self.tp_rank, tp_size=self.tp_size, pp_rank=self.pp_rank)


def identity_for(info: RankInfo, config: MxConfig) -> SourceIdentity:
    """The SourceIdentity of an SGLang instance; anything that changes bytes is in it.

    The wire's hashing rule lowercases names; `model_name_sha256` keeps names that differ only in case
    apart. `checkpoint` (the config key, else what the files are by content) and the model-config
    overrides decide what was built, so they are in it too.
    """
    model_name = config.model_name or info.model_path
    if info.role and config.model_name:
        model_name = f"{config.model_name}:{info.role}"  # model_name names the served model, not its draft
    checkpoint = config.checkpoint or info.checkpoint
    overrides = _canonical_json(info.model_overrides)
    return SourceIdentity(
        mx_version=MX_VERSION,
        model_name=model_name,
        backend_framework=BackendFramework.SGLANG,
        tensor_parallel_size=info.tp_size,
        pipeline_parallel_size=info.pp_size,
        expert_parallel_size=info.ep_size,
        dtype=info.dtype,
        quantization=info.quantization,
        revision=config.revision or info.revision,
        backend_framework_version=info.framework_version,
        torch_version=info.torch_version,
        cuda_version=info.cuda_version,
        gpu_arch=info.gpu_arch,
        extra_parameters={
            "device": info.device,
            **info.layout,
            **info.byte_settings,
            **({"layout_fingerprint": info.layout_fingerprint} if info.layout_fingerprint else {}),
            **({"role": info.role} if info.role else {}),
            "model_name_sha256": hashlib.sha256(model_name.encode()).hexdigest()[:16],
            **({"checkpoint": checkpoint} if checkpoint else {}),
            **({"model_overrides": hashlib.sha256(overrides.encode()).hexdigest()[:16]} if overrides else {}),
        },
    )


def _canonical_json(text: str) -> str:
    """`text` as compact JSON with sorted keys (so spacing and key order do not matter); "" for none."""
    if not text or not text.strip():
        return ""
    try:
        value = json.loads(text)
    except ValueError:
        return text  # SGLang refuses it anyway; hash what was given
    return "" if value in ({}, None) else json.dumps(value, sort_keys=True, separators=(",", ":"))


# LaunchSettings layout widths that must equal these for a rank's layout to be plannable
# (a value of "tp" means: equal to the rank's TP size).
_PLAIN_LAYOUT = {"attn_tp_size": "tp", "attn_cp_size": "1", "attn_dp_size": "1", "moe_ep_size": "1",
                 "moe_tp_size": "tp", "moe_dp_size": "1"}


def layout_refusal(info: RankInfo) -> str:
    """"" when a mixed-layout pull can be planned for this rank's layout, else why not.

    Plannable: one pipeline stage, no expert parallelism, attention and MoE split like
    the rest of the model (plain TP), an unquantized model (quantized post-processing
    repacks weights per layout), not a draft model.
    """
    if info.pp_size != 1:
        return f"pipeline parallelism (PP {info.pp_size}) is not resharded"
    if info.ep_size != 1:
        return f"expert parallelism (EP {info.ep_size}) is not resharded"
    if info.quantization:
        return f"quantized models ({info.quantization}) repack weights per layout and are not resharded"
    if info.role:
        return f"a {info.role} model is not resharded"
    for key, plain in _PLAIN_LAYOUT.items():
        value = info.layout.get(key)
        want = str(info.tp_size) if plain == "tp" else plain
        if value is not None and value != want:
            return f"{key}={value} (plain TP needs {want}) is not resharded"
    return ""


def model_identity(info: RankInfo, config: MxConfig) -> SourceIdentity:
    """What the model *is*, whatever its layout: `identity_for` without the TP/PP/EP sizes,
    the layout widths and the layout fingerprint (a mixed-layout plan checks those tensor by
    tensor instead). Everything that decides bytes (dtype, quantization, revision, SGLang,
    torch and CUDA versions, GPU arch, the byte settings) stays in."""
    plain = dataclasses.replace(info, tp_size=1, tp_rank=0, pp_size=1, pp_rank=0, ep_size=1, layout={},
                                layout_fingerprint="")
    return dataclasses.replace(identity_for(plain, config), tensor_parallel_size=0, pipeline_parallel_size=0,
                               expert_parallel_size=0)


def model_source_id(info: RankInfo, config: MxConfig) -> str:
    """mx_source_id of `model_identity`: seeds and targets of one model agree on it across layouts."""
    return mx_source_id(model_identity(info, config))


def seed_topology(*, model_id: str, tp_size: int, pp_size: int, instance: str) -> dict[str, str]:
    """The worker record topology of a seed that targets of other layouts may reshard from."""
    return {TOPOLOGY_MODEL_ID: model_id, TOPOLOGY_TP_SIZE: str(tp_size), TOPOLOGY_PP_SIZE: str(pp_size),
            TOPOLOGY_INSTANCE: instance}
