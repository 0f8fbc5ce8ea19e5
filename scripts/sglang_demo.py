"""The main job: an SGLang seed and an SGLang target on this machine.

Starts the embedded metadata server, generates a tiny Llama locally, starts an
SGLang seed (loads from disk, publishes) and an SGLang target (loads from the
seed through the modelexpress backend), then prints both weight-load times and
one greedy generation from each. Run by `bash scripts/demo.sh`.

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
    PROMPTS, TARGET_ARGS, SglangServer, make_tiny_llama, pull_stats, seed_args, weight_load_seconds,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, help="a model directory (default: generate a tiny Llama)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sglang-mx-demo-") as tmp, \
            MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta:
        model = args.model or make_tiny_llama(pathlib.Path(tmp) / "tiny-llama")
        config = {"url": meta.address}
        print(f"metadata server on {meta.address}; model {model}")
        print("starting the SGLang seed (loads from disk, then publishes) ...", flush=True)
        seed = SglangServer(model, *seed_args(), mx_config={**config, "source": True}, name="seed")
        target = None
        try:
            seed.wait_ready()
            print("starting the SGLang target (loads from the seed) ...", flush=True)
            target = SglangServer(model, *TARGET_ARGS, mx_config=config, name="target")
            target.wait_ready()
            gb, pull_s, rate = pull_stats(target.log)
            print()
            print(f"seed   weights from disk : {weight_load_seconds(seed.log):6.2f} s  (SGLang 'Load weight end')")
            print(f"target weights from peer : {weight_load_seconds(target.log):6.2f} s  "
                  f"(of which the Mooncake pull: {gb:.4f} GB in {pull_s:.2f} s, {rate:.3f} GB/s)")
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
