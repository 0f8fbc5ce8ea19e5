"""The main job without SGLang: a server, a seed process and a target process.

`sglang-mx demo` starts the embedded metadata server, a seed process that
writes a Llama-shaped checkpoint (about 1 GB by default) to safetensors and
loads it, and a target process that pulls the same tensors over Mooncake and
checks every byte against the file. It prints what moved and how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from sglang_mx.records import SourceIdentity

DEMO_MODEL = "sglang-mx/demo-llama"


def llama_shapes(size_gb: float) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A Llama-shaped state dict whose bf16 weights add up to about `size_gb` GB.

    Norms are float32; `lm_head.weight` is tied to the embedding (added at
    load time, not stored); one buffer has zero elements.
    """
    hidden, inter, vocab, kv = 2048, 5632, 32000, 512
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    layers = max(1, round((size_gb * 1e9 - 2 * vocab * hidden) / per_layer))
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "model.embed_tokens.weight": ((vocab, hidden), torch.bfloat16),
        "model.norm.weight": ((hidden,), torch.float32),
        "model.rotary_emb.unused_cache": ((0,), torch.float32),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": ((hidden,), torch.float32),
            f"{p}.post_attention_layernorm.weight": ((hidden,), torch.float32),
            f"{p}.self_attn.q_proj.weight": ((hidden, hidden), torch.bfloat16),
            f"{p}.self_attn.k_proj.weight": ((kv, hidden), torch.bfloat16),
            f"{p}.self_attn.v_proj.weight": ((kv, hidden), torch.bfloat16),
            f"{p}.self_attn.o_proj.weight": ((hidden, hidden), torch.bfloat16),
            f"{p}.mlp.gate_proj.weight": ((inter, hidden), torch.bfloat16),
            f"{p}.mlp.up_proj.weight": ((inter, hidden), torch.bfloat16),
            f"{p}.mlp.down_proj.weight": ((hidden, inter), torch.bfloat16),
        }
    return shapes


def write_checkpoint(path: str, size_gb: float, seed: int = 0) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) if shape[0] else torch.empty(shape, dtype=dtype)
        for name, (shape, dtype) in llama_shapes(size_gb).items()
    }
    save_file(tensors, path)


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Read the file into memory and tie lm_head to the embedding, as a Llama loader does."""
    from safetensors.torch import load_file

    # load_file maps the file; clone() reads every byte into process memory.
    tensors = {name: t.clone() for name, t in load_file(path).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors


def empty_like_checkpoint(size_gb: float) -> dict[str, torch.Tensor]:
    """What a target has before loading: same shapes, touched memory, tied pair."""
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in llama_shapes(size_gb).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors


def _identity() -> SourceIdentity:
    from sglang_mx.records import BackendFramework

    return SourceIdentity(
        model_name=DEMO_MODEL, backend_framework=BackendFramework.UNKNOWN, tensor_parallel_size=1,
        pipeline_parallel_size=1, expert_parallel_size=1, dtype="bfloat16",
    )


# --- the two roles, each run in its own process -------------------------

def _run_seed(args: argparse.Namespace) -> None:
    from sglang_mx.client import MetadataClient
    from sglang_mx.seed import SeedOptions, start_seed
    from sglang_mx.transfer.engine import MooncakeEngine

    t0 = time.monotonic()
    write_checkpoint(args.file, args.size_gb)
    t1 = time.monotonic()
    tensors = load_checkpoint(args.file)
    load_s = time.monotonic() - t1
    engine = MooncakeEngine.create(args.host, protocol=args.protocol)
    client = MetadataClient(args.url)
    publisher = start_seed(tensors, engine, _identity(), client, worker_rank=0, options=SeedOptions(ready=True))
    print(json.dumps({"write_s": t1 - t0, "load_s": load_s, "worker_id": publisher.worker_id}), flush=True)
    sys.stdin.read()  # the parent closes our stdin when it is done with us
    publisher.close()


def _run_target(args: argparse.Namespace) -> None:
    from sglang_mx.client import MetadataClient
    from sglang_mx.target import PullOptions, pull_weights
    from sglang_mx.transfer.engine import MooncakeEngine
    from sglang_mx.transfer.tensors import describe

    tensors = empty_like_checkpoint(args.size_gb)
    engine = MooncakeEngine.create(args.host, protocol=args.protocol)
    with MetadataClient(args.url) as client:
        report = pull_weights(
            client, engine, _identity(), worker_rank=0, tensors=describe(tensors),
            options=PullOptions(wait_timeout_s=120),
        )
    expected = load_checkpoint(args.file)
    differing = [n for n, t in tensors.items() if not torch.equal(t.view(torch.uint8), expected[n].view(torch.uint8))]
    print(json.dumps({
        "seed": report.seed_worker_id, "session": report.seed_session_id, "tensors": report.tensors,
        "bytes": report.bytes, "reads": report.reads, "seconds": report.seconds, "gb_per_s": report.gb_per_s,
        "differing": differing,
    }), flush=True)


def run_demo(size_gb: float, protocol: str, host: str) -> int:
    from sglang_mx.server import MetadataServer, ServerOptions

    with tempfile.TemporaryDirectory(prefix="sglang-mx-demo-") as tmp, \
            MetadataServer(ServerOptions(host=host, port=0, allow_unauthenticated=True)) as server:
        # allow_unauthenticated: a demo of one machine's processes, on the address --host names
        ckpt = os.path.join(tmp, "model.safetensors")
        common = ["--url", server.address, "--file", ckpt, "--size-gb", str(size_gb), "--protocol", protocol,
                  "--host", host]
        print(f"metadata server on {server.address}; seed writing and loading a {size_gb:g} GB checkpoint ...")
        seed = subprocess.Popen([sys.executable, "-m", "sglang_mx.demo", "seed", *common],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            seed_line = seed.stdout.readline()
            if not seed_line:
                print("seed process failed; see its log above", file=sys.stderr)
                return 1
            seed_info = json.loads(seed_line)
            target = subprocess.run([sys.executable, "-m", "sglang_mx.demo", "target", *common],
                                    stdout=subprocess.PIPE, text=True)
            if target.returncode != 0:
                print(f"target process failed with exit code {target.returncode}", file=sys.stderr)
                return 1
            result = json.loads(target.stdout.strip().splitlines()[-1])
        finally:
            seed.stdin.close()
            seed.wait(timeout=30)
    ok = not result["differing"]
    print(f"seed    loaded {result['bytes'] / 1e9:.3f} GB from safetensors in {seed_info['load_s']:.2f} s")
    print(f"target  pulled {result['tensors']} tensors, {result['bytes'] / 1e9:.3f} GB in {result['reads']} reads "
          f"from {result['session']} over Mooncake {protocol}: {result['seconds']:.2f} s, "
          f"{result['gb_per_s']:.2f} GB/s")
    print("bytes identical to the checkpoint: " + ("yes" if ok else f"NO ({len(result['differing'])} tensors differ)"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_mx.demo")
    parser.add_argument("role", choices=["seed", "target"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--size-gb", type=float, required=True)
    parser.add_argument("--protocol", default="tcp")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    (_run_seed if args.role == "seed" else _run_target)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
