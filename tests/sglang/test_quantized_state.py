"""Quantized post-processing state, built the way SGLang 0.5.23 builds it: which tensors move.

The modules are made in a child process by SGLang's own code
(`Fp8LinearMethod.create_weights`, `ModelOptNvFp4FusedMoEMethod.create_weights`,
`block_quant_dequant`, `swizzle_blockscale`, `alias_or_bind_derived_param`,
`marlin_make_workspace`); where SGLang's `process_weights_after_loading` only takes the
branch on CUDA (Hopper's `_block_fp8_bf16_weight`, fp8.py:858-904) or Blackwell/CUTLASS
(the NVFP4 swizzle, modelopt_quant.py:3005-3053), the child repeats just that
registration with SGLang's helpers, so each module has the attribute names and the
registration kind (buffer / Parameter / plain attribute) SGLang gives it.

Why a child process: importing SGLang in the pytest process fails on this CPU torch
(`RuntimeError: operator torchvision::nms does not exist`, which pytest.importorskip does
not catch) unless scripts/sglang_cpu's workarounds are in place before torchvision is
first imported, and the import sets process-wide SGLang state (the MoE runner backend).
The child gets them the way SGLang's own processes do: `sglang_env()` puts
scripts/sglang_cpu on PYTHONPATH. The child reports a missing SGLang module as a skip
(importorskip's behaviour) and everything else as JSON the tests assert on.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

if importlib.util.find_spec("sglang") is None:  # found, not imported (see above)
    pytest.skip("SGLang is not installed (bash scripts/setup.sh installs 0.5.23)", allow_module_level=True)

CHILD = textwrap.dedent(r'''
    import json, sys, types
    import torch

    try:
        from sglang.srt.layers.moe.utils import MoeRunnerBackend, get_flags
        from sglang.srt.layers.quantization import marlin_utils
        from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod
        from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant
        from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config, ModelOptNvFp4FusedMoEMethod
        from sglang.srt.layers.quantization.utils import swizzle_blockscale
        from sglang.srt.layers.utils.common import alias_or_bind_derived_param
    except ImportError as e:
        print(json.dumps({"skip": f"SGLang 0.5.23 module missing: {e}"}))
        sys.exit(0)

    from sglang_mx.model_tensors import collect_tensors

    def kind(module, name):
        if name in module._parameters:
            return "parameter"
        if name in module._buffers:
            return "buffer(non-persistent)" if name in module._non_persistent_buffers_set else "buffer"
        return "attribute" if name in vars(module) else "absent"

    def report(model, layer, names):
        out = {"kinds": {n: kind(layer, n) for n in names}}
        try:
            tensors = collect_tensors(model)
            out["collected"] = list(tensors)
            out["ptrs"] = {n: t.data_ptr() for n, t in tensors.items()}
        except Exception as e:  # a rule that refuses the model is reported, not hidden
            out["error"] = f"{type(e).__name__}: {e}"
        return out

    def nest(path, layer):
        """`layer` at dotted `path` inside a fresh root module (a model's prefixes)."""
        root = parent = torch.nn.Module()
        *heads, leaf = path.split(".")
        for head in heads:
            child = torch.nn.Module()
            parent.add_module(head, child)
            parent = child
        parent.add_module(leaf, layer)
        return root

    result = {}

    # --- block FP8 linear (Fp8LinearMethod, weight_block_size [32, 32]) + Hopper's bf16 cache ---
    def block_fp8_linear():
        method = Fp8LinearMethod(Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic",
                                           weight_block_size=[32, 32]))
        layer = torch.nn.Module()
        layer.tp_group = None  # what validate_block_quant_shapes reads on an unsharded layer
        layer.quant_method = method
        method.create_weights(layer, input_size_per_partition=64, output_partition_sizes=[64, 32],
                              input_size=64, output_size=96, params_dtype=torch.bfloat16,
                              weight_loader=lambda *a, **k: None)
        g = torch.Generator().manual_seed(0)
        layer.weight.data.copy_(torch.randn(96, 64, generator=g).clamp(-8, 8).to(torch.float8_e4m3fn))
        layer.weight_scale_inv.data.copy_(torch.exp2(-torch.randint(1, 8, (3, 2), generator=g).float()))
        # fp8.py:895-899 (runs only on CUDA sm90 with SGLANG_OPT_HOPPER_BLOCK_FP8_BF16): the same call.
        layer.register_buffer(
            "_block_fp8_bf16_weight",
            block_quant_dequant(layer.weight.data, layer.weight_scale_inv.data, [32, 32], torch.bfloat16),
            persistent=False,
        )
        return layer

    layer = block_fp8_linear()
    model = nest("model.layers.0.mlp.down_proj", layer)
    r = report(model, layer, ["weight", "weight_scale_inv", "_block_fp8_bf16_weight"])
    r["cache_ptr"] = layer._block_fp8_bf16_weight.data_ptr()
    result["block_fp8"] = r

    # The same layer under a path with "block" in it (vision towers: `visual.blocks.N`).
    layer = block_fp8_linear()
    result["block_path"] = report(nest("visual.blocks.0.attn.qkv", layer), layer,
                                  ["weight", "weight_scale_inv", "_block_fp8_bf16_weight"])

    # --- NVFP4 MoE (ModelOptNvFp4FusedMoEMethod) + the CUTLASS path's swizzled block scales ---
    # The constructor refuses a non-Blackwell platform unless the MoE runner is Marlin; the flag
    # only selects which branch create_weights takes (Marlin and CUTLASS register the same
    # *_blockscale_swizzled Parameters; TRT-LLM would set them to None).
    get_flags().moe.runner_backend = MoeRunnerBackend.MARLIN

    def nvfp4_moe(experts, hidden, inter):
        method = ModelOptNvFp4FusedMoEMethod(ModelOptFp4Config(is_checkpoint_nvfp4_serialized=True,
                                                               group_size=16, exclude_modules=[]))
        layer = torch.nn.Module()
        layer.num_experts = layer.num_local_experts = experts
        layer.moe_runner_config = types.SimpleNamespace(is_gated=True)
        layer.quant_method = method
        method.create_weights(layer, num_experts=experts, hidden_size=hidden,
                              intermediate_size_per_partition=inter, params_dtype=torch.bfloat16,
                              weight_loader=lambda *a, **k: None)
        g = torch.Generator().manual_seed(1)
        for name in ("w13_weight_scale", "w2_weight_scale"):
            p = getattr(layer, name)
            p.data.copy_(torch.rand(p.shape, generator=g).to(torch.float8_e4m3fn))
        # modelopt_quant.py:3005-3011 and 3046-3052: the same calls.
        for source, derived in (("w13_weight_scale", "w13_blockscale_swizzled"),
                                ("w2_weight_scale", "w2_blockscale_swizzled")):
            alias_or_bind_derived_param(layer, source, derived, swizzle_blockscale(getattr(layer, source)))
        return layer

    names = ["w13_weight_scale", "w13_blockscale_swizzled", "w2_weight_scale", "w2_blockscale_swizzled"]
    # 64 rows per expert: padded to 128 by the swizzle, so a Parameter of its own.
    layer = nvfp4_moe(2, 64, 32)
    r = report(nest("model.layers.0.mlp.experts", layer), layer, names)
    r["aliased"] = layer.w13_blockscale_swizzled is layer.w13_weight_scale
    result["nvfp4_padded"] = r
    # 128 rows, K a multiple of 4: SGLang swizzles in place and aliases the two names.
    layer = nvfp4_moe(2, 128, 64)
    r = report(nest("model.layers.0.mlp.experts", layer), layer, names)
    r["aliased"] = layer.w13_blockscale_swizzled is layer.w13_weight_scale
    result["nvfp4_aligned"] = r

    # --- runtime state: a Marlin workspace (plain attribute) and humming's locks (buffer) ---
    layer = torch.nn.Module()
    layer.register_parameter("weight", torch.nn.Parameter(torch.zeros(8, 8), requires_grad=False))
    real = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=4)
    try:  # marlin_utils_fp8.py:124 / marlin_utils_fp4.py:180: `layer.workspace = marlin_make_workspace(device)`
        layer.workspace = marlin_utils.marlin_make_workspace(torch.device("cpu"))
    finally:
        torch.cuda.get_device_properties = real
    # humming.py:883-884 (SGLang's humming layers need the `humming` package, absent here).
    layer.register_buffer("locks", torch.zeros(1024, dtype=torch.int32))
    result["runtime_state"] = report(nest("model.layers.0.mlp.gate_up_proj", layer), layer,
                                     ["weight", "workspace", "locks"])

    print(json.dumps(result))
''')


@pytest.fixture(scope="module")
def built():
    from sglang_mx.sglang.launch import sglang_env

    proc = subprocess.run([sys.executable, "-c", CHILD], env=sglang_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def _collected(scenario):
    assert "error" not in scenario, scenario["error"]
    return scenario["collected"]


def test_block_fp8_bf16_cache_is_a_non_persistent_buffer_and_moves(built):
    r = built["block_fp8"]
    assert r["kinds"] == {"weight": "parameter", "weight_scale_inv": "parameter",
                          "_block_fp8_bf16_weight": "buffer(non-persistent)"}
    names = _collected(r)
    prefix = "model.layers.0.mlp.down_proj."
    assert [n for n in names if n.startswith(prefix)] == [
        prefix + "weight", prefix + "weight_scale_inv", prefix + "_block_fp8_bf16_weight"]
    assert r["ptrs"][prefix + "_block_fp8_bf16_weight"] == r["cache_ptr"]  # the buffer itself, not a copy


def test_a_module_path_with_block_in_it_moves_whole(built):
    names = _collected(built["block_path"])
    prefix = "visual.blocks.0.attn.qkv."
    assert names == [prefix + "weight", prefix + "weight_scale_inv", prefix + "_block_fp8_bf16_weight"]


def test_nvfp4_swizzled_block_scales_move_when_sglang_allocates_them(built):
    r = built["nvfp4_padded"]
    assert not r["aliased"]
    assert r["kinds"] == {name: "parameter" for name in r["kinds"]}
    names = _collected(r)
    prefix = "model.layers.0.mlp.experts."
    for name in ("w13_weight_scale", "w13_blockscale_swizzled", "w2_weight_scale", "w2_blockscale_swizzled"):
        assert prefix + name in names


def test_nvfp4_swizzled_alias_moves_once_under_the_source_name(built):
    r = built["nvfp4_aligned"]
    assert r["aliased"]  # alias_or_bind_derived_param: one Parameter under two names
    assert r["kinds"] == {name: "parameter" for name in r["kinds"]}
    names = _collected(r)
    prefix = "model.layers.0.mlp.experts."
    assert prefix + "w13_weight_scale" in names and prefix + "w2_weight_scale" in names
    assert prefix + "w13_blockscale_swizzled" not in names  # the same memory, collected once


def test_marlin_workspace_and_humming_locks_stay_local(built):
    r = built["runtime_state"]
    assert r["kinds"] == {"weight": "parameter", "workspace": "attribute", "locks": "buffer"}
    assert _collected(r) == ["model.layers.0.mlp.gate_up_proj.weight"]
