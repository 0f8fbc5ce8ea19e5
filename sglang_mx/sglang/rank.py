"""The facts of one SGLang rank, read off SGLang's objects: its RankInfo (what it pairs with),
and the split facts of its tensors (whether targets of other layouts can be planned)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from sglang_mx.layout import RankInfo

log = logging.getLogger("sglang_mx")

# Parallel widths besides TP/PP that change a rank's tensor layout.
LAYOUT_KEYS = ("attn_tp_size", "attn_cp_size", "attn_dp_size", "moe_ep_size", "moe_tp_size", "moe_dp_size")
# ServerArgs fields that pick kernels which repack weights in place during post-processing
# (same shapes, other bytes): read from SGLang 0.5.23's quantization and MoE code.
BYTE_SETTINGS = ("moe_runner_backend", "moe_a2a_backend", "fp8_gemm_runner_backend", "fp4_gemm_runner_backend",
                 "enable_deterministic_inference")
# Environment flags read by that code with the same effect (seed and target must agree).
BYTE_ENV = ("SGLANG_ENABLE_JIT_DEEPGEMM", "SGLANG_USE_AITER", "SGLANG_USE_AITER_FP8_PER_TOKEN",
            "SGLANG_USE_AITER_MOE_GU_ITLV", "SGLANG_FORCE_FP8_MARLIN", "SGLANG_OPT_HOPPER_BLOCK_FP8_BF16",
            "SGLANG_MOE_PADDING", "SGLANG_OPT_DEEPGEMM_HC_PRENORM", "SGLANG_INT4_WEIGHT")

def byte_settings(server_args, environ=None) -> dict[str, str]:
    """The BYTE_SETTINGS this SGLang defines and the BYTE_ENV flags that are set, as strings."""
    import os

    environ = os.environ if environ is None else environ
    found = {}
    for key in BYTE_SETTINGS:
        value = getattr(server_args, key, None)
        if value is not None:
            found[key] = str(getattr(value, "value", value))
    found.update((f"env.{key}", environ[key]) for key in BYTE_ENV if key in environ)
    return found


def rank_info(model_config, device, *, tp_size: int, tp_rank: int, pp_size: int, pp_rank: int,
              width: Callable[[str], object], server_args=None) -> RankInfo:
    """The RankInfo of one rank; `width(key)` gives a LAYOUT_KEYS width, raising
    AttributeError when this SGLang build does not define it. A speculative
    draft model (`model_config.is_draft_model`) gets role "draft": its own identity."""
    import sglang
    import torch

    device_type = torch.device(device).type
    gpu_arch = cuda_version = ""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        gpu_arch, cuda_version = f"sm_{major}{minor}", torch.version.cuda or ""

    layout = {}
    for key in LAYOUT_KEYS:
        try:
            layout[key] = str(width(key))
        except AttributeError:
            log.debug("modelexpress: SGLang %s has no %s; left out of the identity", sglang.__version__, key)
    return RankInfo(
        model_path=model_config.model_path,
        tp_size=tp_size,
        tp_rank=tp_rank,
        pp_size=pp_size,
        pp_rank=pp_rank,
        ep_size=int(layout.get("moe_ep_size", 1)),
        dtype=str(model_config.dtype).removeprefix("torch."),
        quantization=model_config.quantization or "",
        revision=model_config.revision or "",
        device=device_type,
        framework_version=sglang.__version__,
        layout=layout,
        byte_settings=byte_settings(server_args) if server_args is not None else {},
        torch_version=torch.__version__,
        cuda_version=cuda_version,
        gpu_arch=gpu_arch,
        role="draft" if getattr(model_config, "is_draft_model", False) else "",
        checksum_manifest=str(getattr(server_args, "model_checksum", None) or ""),
        model_overrides=str(getattr(server_args, "json_model_override_args", None) or ""),
    )


_contents: dict[tuple[str, str, str], str] = {}  # (path, revision, checksum manifest) -> content id, per process


def with_checkpoint(info: RankInfo) -> RankInfo:
    """`info` with what its checkpoint is by content (sglang_mx.checkpoint), computed once per process."""
    from sglang_mx.checkpoint import content_id

    key = (info.model_path, info.revision, info.checksum_manifest)
    if key not in _contents:
        _contents[key] = content_id(info.model_path, revision=info.revision,
                                    checksum_manifest=info.checksum_manifest or None)
    return dataclasses.replace(info, checkpoint=_contents[key])


def layout_facts(model, tensors, info: RankInfo) -> tuple[dict | None, str]:
    """(the split facts of every tensor in `tensors`, "") when a mixed-layout pull can be planned
    for this rank, else (None, why not: the layout, or the first tensor without facts)."""
    from sglang_mx.layout import layout_refusal
    from sglang_mx.sglang.shard_facts import shard_facts

    why = layout_refusal(info)
    if why:
        return None, why
    specs, reasons = shard_facts(model)
    for name in tensors:
        if name not in specs:
            return None, f"tensor {name!r}: {reasons.get(name, 'not a parameter of a layer sglang-mx knows')}"
    return {name: specs[name] for name in tensors}, ""
