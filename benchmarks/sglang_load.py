"""SGLang weight loading: from a cold disk, from a warm page cache, and from a peer through sglang-mx;
and the pull inside SGLang against the same pull between plain processes and the same-work ceiling (#19).

    .venv/bin/python benchmarks/sglang_load.py [--size-gb 1.0] [--repeat 3] [--drop-caches]

Generates a Llama-shaped bf16 model of about --size-gb and starts the metadata
server, an SGLang seed (loads it from disk, publishes it; idle afterwards,
--sleep-on-idle) and a plain seed process holding the same checkpoint's tensors
(benchmarks/same_work.py). Then, --repeat rounds, ONE measurement at a time,
each instance or process stopped before the next starts, the order rotated
every round:

- disk: the page cache dropped first (--drop-caches, root), an SGLang instance
  loading from disk; then one from the warm page cache (one memcpy: not the bar);
- peer: an SGLang target loading from the SGLang seed over Mooncake (tcp,
  127.0.0.1); its `modelexpress: pulled ... GB in ... s` line is the pull inside SGLang;
- plain: a fresh plain process pulling the same checkpoint's bytes from the plain
  seed with the same code as a target (`pull_weights`, never-written memory
  populated read by read, every tensor verified as it lands);
- ceiling: the same work without the engine: a fresh process receiving the same
  bytes over a loopback socket into untouched memory, hashing each 16 MiB with
  xxh3-64 as it lands.

Each round prints its load average. At the end: medians (and every run) of
SGLang's own 'Load weight end' times, the peer load's phases, the three rates,
and the per-round ratios SGLang pull / plain pull and plain pull / ceiling,
then a one-line summary. Run by hand; numbers go into notes with the machine
they ran on.
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

from same_work import PlainSeed, plain_pull, same_work_ceiling  # noqa: E402
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


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def widening_line(log: str) -> str:
    """The plugin's line about the Mooncake engine's threads (their CPU mask), if any."""
    lines = [line.split("modelexpress: ", 1)[1] for line in log.splitlines() if "modelexpress: Mooncake" in line]
    return lines[-1] if lines else "(no line: the plugin's engine hook did not run)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true", help="cold page cache for the disk loads (root)")
    args = parser.parse_args()
    if args.drop_caches and os.geteuid() != 0:
        raise SystemExit("--drop-caches needs root")
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    rates: dict[str, list[float]] = {"sglang": [], "plain": [], "ceiling": []}  # GB/s, one per round
    loads_avg: list[str] = []
    widenings: list[str] = []
    pulled_gb = plain_gb = 0.0
    tokens_equal = True
    print(f"load average at the start: {loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sglang-mx-bench-") as tmp, \
            MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta:
        model = make_llama(pathlib.Path(tmp) / "llama", args.size_gb)
        size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        cold_label = "disk, cold" if args.drop_caches else "disk, page cache as found"
        loads: dict[str, list[float]] = {cold_label: [], "disk, warm page cache": [], "peer (sglang-mx)": []}
        config = {"url": meta.address}
        with PlainSeed(meta.address, model) as plain_seed:
            seed = SglangServer(model, *seed_args(), mx_config={**config, "source": True}, name="seed")
            try:
                seed.wait_ready(600)
                expected = seed.generate(PROMPT)
                kinds = ["disk", "peer", "plain", "ceiling"]
                for rnd in range(args.repeat):
                    order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
                    loads_avg.append(loadavg())
                    for what in order:
                        if what == "disk":
                            if args.drop_caches:
                                drop_page_cache()
                            log, tokens = load_once(model, name="disk-cold")
                            loads[cold_label].append(weight_load_seconds(log))
                            log, tokens2 = load_once(model, name="disk-warm")
                            loads["disk, warm page cache"].append(weight_load_seconds(log))
                            tokens_equal &= tokens == tokens2 == expected
                        elif what == "peer":
                            log, tokens = load_once(model, *TARGET_ARGS, name="target",
                                                    mx_config={**config, "source": False})
                            loads["peer (sglang-mx)"].append(weight_load_seconds(log))
                            tokens_equal &= tokens == expected
                            pulled_gb, _, rate = pull_stats(log)
                            rates["sglang"].append(rate)
                            widenings.append(widening_line(log))
                            for key, value in peer_phases(log).items():
                                phases.setdefault(key, []).append(value)
                        elif what == "plain":
                            got = plain_pull(meta.address, model)
                            if got["verified"] != got["tensors"]:
                                raise SystemExit(f"plain pull verified {got['verified']} of {got['tensors']} tensors")
                            plain_gb = got["gb"]
                            rates["plain"].append(got["gb_per_s"])
                        else:
                            rates["ceiling"].append(same_work_ceiling(model, plain_seed.nbytes)["gb_per_s"])
                    print(f"round {rnd + 1}/{args.repeat} (order {', '.join(order)}; load average {loads_avg[-1]} "
                          f"at its start, {loadavg()} at its end): " + ", ".join(
                              f"{k} {v[-1]:.2f} s" for k, v in loads.items())
                          + f"; pull GB/s: SGLang {rates['sglang'][-1]:.2f}, plain {rates['plain'][-1]:.2f}, "
                          f"ceiling {rates['ceiling'][-1]:.2f}", flush=True)
            finally:
                seed.stop()

    peer = loads["peer (sglang-mx)"]
    load1 = [float(a.split()[0]) for a in loads_avg]
    overhead = [load - phase for load, phase in zip(peer, phases["transfer"])]
    sglang_vs_plain = [a / b for a, b in zip(rates["sglang"], rates["plain"])]
    plain_vs_ceiling = [a / b for a, b in zip(rates["plain"], rates["ceiling"])]
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"load average per round at its start: {' | '.join(loads_avg)}; at the end {loadavg()}")
    print(f"model: Llama-shaped bf16, {size_gb:.2f} GB of safetensors; {args.repeat} rounds, one measurement at a "
          f"time, order rotated; greedy tokens identical: {tokens_equal}")
    print(f"\n{'load path (SGLang load weight end)':<36} {'median s':>8}  (runs)")
    for name, values in loads.items():
        print(f"{name:<36} {fmt(values)}")
    print("\npeer load phases, median s (runs):")
    for key in PHASES:
        if phases.get(key):
            note = "  (inside transfer, as each read lands)" if key == "verify" else ""
            print(f"  {key:<10} {fmt(phases[key])}{note}")
    print(f"  {'overhead':<10} {fmt(overhead)}  (SGLang load minus transfer)")
    print("\nthe pull, GB/s, median (runs):")
    rows = [
        (f"inside SGLang (target <- SGLang seed, {pulled_gb:.3f} GB)", fmt(rates["sglang"])),
        (f"plain processes (same pull code, {plain_gb:.3f} GB)", fmt(rates["plain"])),
        ("same-work ceiling (socket, fresh memory, xxh3 per 16 MiB)", fmt(rates["ceiling"])),
        ("SGLang / plain, per round", fmt(sglang_vs_plain) + "  (target >= 0.8)"),
        ("plain / ceiling, per round", fmt(plain_vs_ceiling) + "  (target >= 0.8)"),
    ]
    for label, value in rows:
        print(f"  {label:<58} {value}")
    print(f"  SGLang target's engine threads: {widenings[-1] if widenings else '(no peer load)'}")
    print(f"\nsummary: disk {statistics.median(loads[cold_label]):.2f} s, peer {statistics.median(peer):.2f} s; pull "
          f"SGLang {statistics.median(rates['sglang']):.2f} / plain {statistics.median(rates['plain']):.2f} / ceiling "
          f"{statistics.median(rates['ceiling']):.2f} GB/s; SGLang/plain {statistics.median(sglang_vs_plain):.2f}x, "
          f"plain/ceiling {statistics.median(plain_vs_ceiling):.2f}x (medians of {args.repeat} rotated rounds; "
          f"load average {min(load1):.2f}-{max(load1):.2f})")
    return 0 if tokens_equal else 1


if __name__ == "__main__":
    sys.exit(main())
