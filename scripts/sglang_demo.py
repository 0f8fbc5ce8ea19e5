"""The main job: an SGLang seed and an SGLang target on this machine.

Starts the embedded metadata server, generates a random Llama-shaped bf16 model
of about --size-gb (0.5 GB by default: big enough for load times to mean
something, small enough for the demo to finish in about two minutes), starts an
SGLang seed (loads from disk, publishes) and, once the seed is idle, an SGLang
target (loads from the seed through the modelexpress backend), then prints both
weight-load times with their GB/s and one greedy generation from each. The
seed's is a cold-disk load when this runs as root (the page cache is dropped
first); otherwise the page cache is as found, and it says so. Run by
`bash scripts/demo.sh`.

SGLang runs on the CPU here with the workarounds in scripts/sglang_cpu.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_mx.server import MetadataServer, ServerOptions  # noqa: E402
from sglang_mx.sglang.launch import (  # noqa: E402
    PROMPTS, TARGET_ARGS, SglangServer, drop_page_cache, make_llama, pull_stats, seed_args, weight_load_seconds,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, help="a model directory (default: generate one)")
    parser.add_argument("--size-gb", type=float, default=0.5, help="size of the generated model (default 0.5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sglang-mx-demo-") as tmp, \
            MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta:
        if args.model is None:
            print(f"generating a random Llama-shaped bf16 model of about {args.size_gb} GB ...", flush=True)
        model = args.model or make_llama(pathlib.Path(tmp) / "llama", args.size_gb)
        size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        config = {"url": meta.address}
        print(f"metadata server on {meta.address}; model {model} ({size_gb:.2f} GB of safetensors)")
        cold = drop_page_cache()
        disk = "cold page cache" if cold else "page cache as found (not root: cannot drop it)"
        print(f"starting the SGLang seed (loads from disk, {disk}, then publishes) ...", flush=True)
        seed = SglangServer(model, *seed_args(), mx_config={**config, "source": True}, name="seed")
        target = None
        try:
            seed.wait_ready()
            print("starting the SGLang target (loads from the seed) ...", flush=True)
            target = SglangServer(model, *TARGET_ARGS, mx_config=config, name="target")
            target.wait_ready()
            gb, pull_s, rate = pull_stats(target.log)
            disk_s, peer_s = weight_load_seconds(seed.log), weight_load_seconds(target.log)
            print()
            print("weight-load phase (SGLang's 'Load weight end'), one load at a time:")
            rows = [(f"seed   from disk ({disk})", disk_s, ""),
                    ("target from the seed (peer)", peer_s,
                     f"  (the Mooncake pull inside it: {gb:.3f} GB in {pull_s:.2f} s, {rate:.2f} GB/s)")]
            width = max(len(label) for label, _, _ in rows)
            for label, seconds, note in rows:
                print(f"  {label:<{width}} : {seconds:6.2f} s  {gb / seconds:5.2f} GB/s{note}")
            prompt = PROMPTS[0]
            seed_tokens, target_tokens = seed.generate(prompt), target.generate(prompt)
            print(f"greedy tokens for input_ids {prompt}:")
            print(f"  seed   {seed_tokens}")
            print(f"  target {target_tokens}")
            same = seed_tokens == target_tokens
            print("identical: " + ("yes" if same else "NO"))
            return 0 if same else 1
        finally:
            for server in (target, seed):
                if server is not None:
                    server.stop()


if __name__ == "__main__":
    sys.exit(main())
