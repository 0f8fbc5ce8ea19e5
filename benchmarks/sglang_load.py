"""SGLang weight loading: from a cold disk, from a warm page cache, and from a peer through sglang-mx.

    .venv/bin/python benchmarks/sglang_load.py [--size-gb 1.0] [--repeat 3] [--drop-caches]

Generates a Llama-shaped bf16 model of about --size-gb and starts the metadata
server and an SGLang seed (loads it from disk, publishes it; idle afterwards,
--sleep-on-idle). Then, --repeat times, ONE load at a time, each instance
stopped before the next starts:

- disk, cold: the page cache dropped first (--drop-caches, root), then an
  SGLang instance loading from disk;
- peer: an SGLang target loading from the seed over Mooncake (tcp, 127.0.0.1);
- disk, warm page cache: the files just read, so one memcpy (not the bar);
- socket ceiling: a plain loopback TCP socket moving the pulled bytes between
  two processes, touched pages sent into a touched buffer of the full size.

The order of the cold-disk and peer loads alternates between repetitions. It
prints the medians (and all runs) of SGLang's own 'Load weight end' time for
each path, the peer load's phases (our log lines), and the pull's GB/s against
the same run's socket ceiling. Run by hand; numbers go into notes with the
machine they ran on.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loopback_socket import measure as loopback_seconds  # noqa: E402
from sglang_mx.server import MetadataServer, ServerOptions  # noqa: E402
from sglang_mx.sglang.launch import (  # noqa: E402
    TARGET_ARGS, SglangServer, drop_page_cache, make_llama, peer_phases, pull_stats, seed_args,
    weight_load_seconds,
)

PROMPT = [5, 6, 7]
PHASES = ("build", "collect", "register", "discover", "metadata", "transfer", "verify")


def load_once(model: pathlib.Path, *args: str, name: str, mx_config: dict | None = None) -> tuple[str, list[int]]:
    """Start one instance, wait for it, generate once, stop it; its log and tokens."""
    server = SglangServer(model, *args, mx_config=mx_config, name=name)
    try:
        server.wait_ready(600)
        return server.log, server.generate(PROMPT)
    finally:
        server.stop()


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f}  ({', '.join(f'{v:.2f}' for v in values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true", help="cold page cache for the disk loads (root)")
    args = parser.parse_args()
    loads: dict[str, list[float]] = {}
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    pulls: list[tuple[float, float]] = []  # (GB, seconds)
    ceilings: list[float] = []  # GB/s
    tokens_equal = True
    with tempfile.TemporaryDirectory(prefix="sglang-mx-bench-") as tmp, \
            MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta:
        model = make_llama(pathlib.Path(tmp) / "llama", args.size_gb)
        size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        cold_label = "disk, cold" if args.drop_caches else "disk, page cache as found"
        loads = {cold_label: [], "disk, warm page cache": [], "peer (sglang-mx)": []}
        config = {"url": meta.address}
        seed = SglangServer(model, *seed_args(), mx_config={**config, "source": True}, name="seed")
        try:
            seed.wait_ready(600)
            expected = seed.generate(PROMPT)
            for rep in range(args.repeat):
                order = ("cold", "peer") if rep % 2 == 0 else ("peer", "cold")
                for what in order:
                    if what == "cold":
                        if args.drop_caches and not drop_page_cache():
                            raise SystemExit("--drop-caches needs root")
                        log, tokens = load_once(model, name="disk-cold")
                        loads[cold_label].append(weight_load_seconds(log))
                        log, tokens2 = load_once(model, name="disk-warm")
                        loads["disk, warm page cache"].append(weight_load_seconds(log))
                        tokens_equal &= tokens == tokens2 == expected
                    else:
                        log, tokens = load_once(model, *TARGET_ARGS, name="target",
                                                mx_config={**config, "source": False})
                        loads["peer (sglang-mx)"].append(weight_load_seconds(log))
                        tokens_equal &= tokens == expected
                        gb, pull_s, _ = pull_stats(log)
                        pulls.append((gb, pull_s))
                        for key, value in peer_phases(log).items():
                            phases.setdefault(key, []).append(value)
                nbytes = int(pulls[-1][0] * 1e9)
                ceilings.append(nbytes / loopback_seconds(nbytes) / 1e9)
                print(f"repetition {rep + 1}/{args.repeat} done: " + ", ".join(
                    f"{k} {v[-1]:.2f} s" for k, v in loads.items()) + f"; socket {ceilings[-1]:.2f} GB/s",
                    flush=True)
        finally:
            seed.stop()

    rates = [gb / s for gb, s in pulls]
    peer = loads["peer (sglang-mx)"]
    overhead = [load - phase for load, phase in zip(peer, phases["transfer"])]
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"model: Llama-shaped bf16, {size_gb:.2f} GB of safetensors; {args.repeat} repetitions, one load at a "
          f"time, cold disk and peer alternated; greedy tokens identical: {tokens_equal}")
    print(f"\n{'load path (SGLang load weight end)':<36} {'median s':>8}  (runs)")
    for name, values in loads.items():
        print(f"{name:<36} {fmt(values)}")
    print("\npeer load phases, median s (runs):")
    for key in PHASES:
        if phases.get(key):
            note = "  (inside transfer, as each read lands)" if key == "verify" else ""
            print(f"  {key:<10} {fmt(phases[key])}{note}")
    print(f"  {'overhead':<10} {fmt(overhead)}  (SGLang load minus transfer)")
    ratio = [r / c for r, c in zip(rates, ceilings)]
    print(f"\nMooncake pull: {pulls[0][0]:.3f} GB at {fmt(rates)} GB/s; loopback TCP socket ceiling, same bytes, "
          f"same repetitions: {fmt(ceilings)} GB/s; pull / ceiling per repetition: {fmt(ratio)}")
    return 0 if tokens_equal else 1


if __name__ == "__main__":
    sys.exit(main())
