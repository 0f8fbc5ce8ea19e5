"""Write a tiny random float32 model of one of several architectures, plus a local tokenizer.

    python scripts/sglang_cpu/make_tiny_model.py OUT_DIR --arch NAME [--seed N] [--layers 2]
        [--quant {w8a8_int8,fp8_block}]

Nothing is downloaded: the tokenizer (byte-level BPE) is trained here on a fixed text and
the weights are random. The same --seed writes the same weights; two seeds differ in every
tensor (constant-initialised tensors such as norms and biases get seeded noise too).
Run with scripts/sglang_cpu on PYTHONPATH (transformers imports torchvision).
`--list` prints the architecture names.

`--quant` (dense archs only) stores every decoder-layer linear weight quantized the way SGLang
0.5.23 loads it, with `quantization_config` in config.json; embeddings, norms, biases and
lm_head are stored bfloat16 and config.json says dtype bfloat16 (SGLang refuses both methods
with float32 activations: load them with --dtype bfloat16 or auto).
  w8a8_int8: int8 `weight` + float32 `weight_scale` [out, 1] (symmetric, per output channel).
  fp8_block: float8_e4m3fn `weight` + float32 `weight_scale_inv` [ceil(out/32), ceil(in/32)]
    (one scale per 32x32 block), plus scalar float32 KV-cache scales
    `self_attn.k_proj.k_scale` and `self_attn.v_proj.v_scale`.
All scales are amax-derived, so two seeds differ in every scale tensor too. Caveat: SGLang
0.5.23's Llama loader (llama, mistral) renames `weight_scale_inv` to `weight_scale` and so never
loads block-FP8 scales (they keep their -FLT_MAX fill); qwen2 loads all of them.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny model for testing SGLang on CPU.",
    "Weights move between instances over the Mooncake transfer engine.",
    "Once upon a time there was a small model that lived in a folder.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ !?.,;:'\"()[]{}",
] * 50
SPECIAL = ["<s>", "</s>", "<unk>", "<pad>"]
# Qwen2-VL's processor looks these up in the tokenizer.
VL_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VOCAB = 1024
HIDDEN = 64

MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# NAME -> (transformers config class, model class, config overrides on top of COMMON)
ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                           sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[], **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **MOE)),
    # MLA: q/kv LoRA ranks; layer 0 dense, layer 1 MoE (routed + shared experts).
    # SGLang's CPU rope (get_rope_cpu) asserts a deepseek_yarn scaling: give yarn with factor 1.
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, head_dim=32, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
        moe_layer_freq=1, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        rope_parameters=dict(rope_type="yarn", factor=1.0, original_max_position_embeddings=2048,
                             rope_theta=10000.0, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        **MOE)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16,
        sliding_window=64, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16,
        sliding_window=64, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=None)),
    # SGLang sizes OLMoE's k_norm by hidden_size (olmoe.py:156): needs num_key_value_heads == heads.
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=4)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {}),
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", {}),
}


def train_tokenizer(out: str, extra_special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIAL + extra_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def build_config(arch: str, layers: int, tok):
    import transformers

    cfg_name, model_name, overrides = ARCHS[arch]
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    cls = getattr(transformers, cfg_name)
    if arch == "qwen2_vl":
        ids = dict(zip(["vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"],
                       tok.convert_tokens_to_ids(VL_SPECIAL)))
        text = dict(common, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                 mrope_section=[2, 3, 3]))
        vision = dict(depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      in_chans=3)  # SGLang reads in_chans (qwen2_vl.py:302)
        config = cls(text_config=text, vision_config=vision, torch_dtype="float32",
                     tie_word_embeddings=False, **ids)
    else:
        config = cls(**{**common, **overrides})
    # Attributes SGLang reads that transformers 5.19's __init__ may drop: set them explicitly.
    for key, value in overrides.items():
        if not hasattr(config, key):
            setattr(config, key, value)
    return config, getattr(transformers, model_name)


QUANT_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
BLOCK = 32  # fp8_block: weight_block_size [BLOCK, BLOCK]
QUANT_CONFIGS = {
    "w8a8_int8": {"quant_method": "w8a8_int8"},
    "fp8_block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                  "weight_block_size": [BLOCK, BLOCK]},
}


def quantize_int8(w):
    """Symmetric per-output-channel int8: w ~= q * scale, scale [out, 1] float32."""
    import torch

    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return {"weight": (w / scale).round().clamp(-127, 127).to(torch.int8), "weight_scale": scale}


def quantize_fp8_block(w):
    """float8_e4m3fn with one float32 scale per BLOCK x BLOCK tile (edge tiles may be partial)."""
    import torch

    n, k = w.shape
    rows, cols = -(-n // BLOCK), -(-k // BLOCK)
    tiles = torch.nn.functional.pad(w, (0, cols * BLOCK - k, 0, rows * BLOCK - n))
    tiles = tiles.reshape(rows, BLOCK, cols, BLOCK)
    scale = (tiles.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    return {"weight": (w / full).to(torch.float8_e4m3fn), "weight_scale_inv": scale}


def save_quantized(model, out: str, method: str) -> None:
    """Rewrite the saved checkpoint with each decoder-layer nn.Linear weight quantized."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    quantize = quantize_int8 if method == "w8a8_int8" else quantize_fp8_block
    linears = {name for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}
    path = os.path.join(out, "model.safetensors")
    tensors = {}
    for key, value in load_file(path).items():
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and prefix in linears:
            tensors.update({f"{prefix}.{n}": t.contiguous() for n, t in quantize(value.float()).items()})
            if method == "fp8_block" and prefix.endswith(("self_attn.k_proj", "self_attn.v_proj")):
                # Per-tensor FP8 KV-cache scale (modelopt name; SGLang also keeps it as a Python
                # float, k/v_scale_float). Stand-in value: seeded and positive, not calibrated.
                tensors[f"{prefix}.{prefix[-6]}_scale"] = value.float().abs().amax() * 100
        else:
            tensors[key] = value.to(torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(out, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = QUANT_CONFIGS[method]
    config["dtype"] = "bfloat16"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def randomize(model, seed: int) -> None:
    """Seeded noise on every parameter, so that two seeds differ in every tensor."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)


def save_vl_processor(out: str, tok) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    image = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    try:
        from transformers import Qwen2VLVideoProcessor
        video = Qwen2VLVideoProcessor()
    except ImportError:
        video = None
    chat = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
            "<|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    Qwen2VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                     chat_template=chat).save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?")
    p.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--quant", choices=sorted(QUANT_CONFIGS),
                   help=f"store decoder linears quantized (only --arch {', '.join(QUANT_ARCHS)})")
    p.add_argument("--list", action="store_true", help="print the architecture names and exit")
    args = p.parse_args()
    if args.list:
        print("\n".join(ARCHS))
        return
    if not args.out:
        p.error("OUT_DIR is required")
    if args.quant and args.arch not in QUANT_ARCHS:
        p.error(f"--quant {args.quant} is only for the dense archs {', '.join(QUANT_ARCHS)}, "
                f"not --arch {args.arch}")

    import torch

    os.makedirs(args.out, exist_ok=True)
    tok = train_tokenizer(args.out, VL_SPECIAL if args.arch == "qwen2_vl" else [])
    config, model_cls = build_config(args.arch, args.layers, tok)
    torch.manual_seed(args.seed)
    model = model_cls(config).to(torch.float32)
    randomize(model, args.seed)
    model.save_pretrained(args.out, safe_serialization=True)
    if args.quant:
        save_quantized(model, args.out, args.quant)
    if args.arch == "qwen2_vl":
        save_vl_processor(args.out, tok)
    print(args.out)


if __name__ == "__main__":
    sys.exit(main())
