"""SGLang weight loading: from disk against from a peer through sglang-mx.

    .venv/bin/python benchmarks/sglang_load.py [--size-gb 1.0] [--drop-caches]

Generates a Llama-shaped bf16 model of about --size-gb, then starts on this
machine: the metadata server, an SGLang seed that loads it from disk (cold page
cache with --drop-caches, which needs root), an SGLang target that loads it from
the seed over Mooncake, and a second disk-only instance (warm page cache). It
prints one table: SGLang's own 'Load weight end' time for each, the Mooncake
pull's GB/s, and a plain loopback TCP socket moving the same bytes (the link's
limit here). Run by hand; numbers go into notes with the machine they ran on.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loopback_socket import measure as loopback_seconds  # noqa: E402
from sglang_mx.server import MetadataServer, ServerOptions  # noqa: E402
from sglang_mx.sglang.launch import (  # noqa: E402
    CPU_ENV, TARGET_ARGS, SglangServer, pull_stats, seed_args, sglang_env, weight_load_seconds,
)

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def make_model(out: pathlib.Path, size_gb: float) -> pathlib.Path:
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * 512 + 3 * HIDDEN * INTER)
    layers = max(1, round((size_gb * 1e9 - 2 * 2 * VOCAB * HIDDEN) / per_layer))
    subprocess.run([sys.executable, str(CPU_ENV / "make_tiny_llama.py"), str(out), "--layers", str(layers),
                    "--hidden", str(HIDDEN), "--intermediate", str(INTER), "--heads", "16", "--kv-heads", "4",
                    "--vocab", str(VOCAB)], env=sglang_env(), check=True, capture_output=True)
    return out


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--drop-caches", action="store_true", help="cold page cache for the seed (root)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sglang-mx-bench-") as tmp, \
            MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta:
        model = make_model(pathlib.Path(tmp) / "llama", args.size_gb)
        size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        if args.drop_caches:
            drop_page_cache()
        config = {"url": meta.address}
        servers = []
        try:
            seed = SglangServer(model, *seed_args(), mx_config={**config, "source": True}, name="seed")
            servers.append(seed)
            seed.wait_ready(600)
            target = SglangServer(model, *TARGET_ARGS, mx_config={**config, "source": False}, name="target")
            servers.append(target)
            target.wait_ready(600)
            warm = SglangServer(model, name="disk-warm")
            servers.append(warm)
            warm.wait_ready(600)
            tokens_equal = seed.generate([5, 6, 7]) == target.generate([5, 6, 7]) == warm.generate([5, 6, 7])
            gb, pull_s, rate = pull_stats(target.log)
            rows = [
                ("disk, " + ("cold" if args.drop_caches else "page cache as found"), weight_load_seconds(seed.log)),
                ("disk, warm page cache", weight_load_seconds(warm.log)),
                ("peer (sglang-mx, Mooncake tcp)", weight_load_seconds(target.log)),
            ]
        finally:
            for server in servers:
                server.stop()
    socket_rate = gb * 1e9 / loopback_seconds(int(gb * 1e9)) / 1e9
    print(f"\nmodel: Llama-shaped bf16, {size_gb:.2f} GB of safetensors; greedy tokens identical: {tokens_equal}")
    print(f"{'load path':<34} {'SGLang load s':>14}")
    for name, seconds in rows:
        print(f"{name:<34} {seconds:>14.2f}")
    print(f"\nMooncake pull: {gb:.3f} GB in {pull_s:.2f} s = {rate:.2f} GB/s; "
          f"loopback TCP socket, same bytes: {socket_rate:.2f} GB/s ({rate / socket_rate:.0%} of it)")
    return 0 if tokens_equal else 1


if __name__ == "__main__":
    sys.exit(main())
