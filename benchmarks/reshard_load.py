"""Mixed-layout load: a TP 1 SGLang target pulling from a TP 2 seed (resharded) against a TP 1 seed.

    .venv/bin/python benchmarks/reshard_load.py [--size-gb 1.0] [--repeat 3]

Generates a Llama-shaped bf16 model of about --size-gb and starts, from disk,
two idle seeds of it (--sleep-on-idle): one of TP 1 and one of TP 2. They are
published under two revisions ("tp1", "tp2") of one model name, so a target
picks which one serves it by its own revision: the same layout (TP 1 -> TP 1,
rank for rank) or another (TP 2 -> TP 1, planned by sglang_mx.shards). Then,
--repeat times, one TP 1 target at a time, the two kinds alternated. Prints
the medians (and all runs) of the pull (first read to last byte verified and
placed) and of SGLang's own 'Load weight end', and their ratio. Greedy tokens
of every target must equal the TP 1 seed's (a TP 2 instance's own may differ:
it sums partial products in another order). Run by hand; numbers go into notes with
the machine they ran on.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sglang_load import PROMPT, fmt, load_once  # noqa: E402
from sglang_mx.server import MetadataServer, ServerOptions  # noqa: E402
from sglang_mx.sglang.launch import (  # noqa: E402
    TARGET_ARGS, SglangServer, make_llama, pull_stats, seed_args, weight_load_seconds,
)

NAME = "bench/llama"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pulls: dict[str, list[float]] = {"same layout (TP 1 -> TP 1)": [], "resharded (TP 2 -> TP 1)": []}
    loads: dict[str, list[float]] = {k: [] for k in pulls}
    gb = 0.0
    tokens_equal = True
    with tempfile.TemporaryDirectory(prefix="sglang-mx-reshard-") as tmp, \
            MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta:
        model = make_llama(pathlib.Path(tmp) / "llama", args.size_gb)
        size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        base = {"url": meta.address, "model_name": NAME}
        seeds = [SglangServer(model, *seed_args(), tp=tp, name=f"seed-tp{tp}",
                              mx_config={**base, "revision": f"tp{tp}", "source": True}) for tp in (1, 2)]
        try:
            for seed in seeds:
                seed.wait_ready(600)
            expected = seeds[0].generate(PROMPT)  # every target is TP 1, holding the TP 1 seed's bytes
            tp2_tokens_equal = seeds[1].generate(PROMPT) == expected  # TP 2 reduces in another order
            for rep in range(args.repeat):
                kinds = list(pulls) if rep % 2 == 0 else list(reversed(pulls))
                for kind in kinds:
                    revision = "tp1" if kind.startswith("same") else "tp2"
                    log, tokens = load_once(model, *TARGET_ARGS, name="target",
                                            mx_config={**base, "revision": revision, "source": False})
                    if kind.startswith("resharded") and "resharded from a TP 2" not in log:
                        raise SystemExit(f"the {kind} target did not reshard:\n{log[-3000:]}")
                    tokens_equal &= tokens == expected
                    gb, seconds, _ = pull_stats(log)
                    pulls[kind].append(seconds)
                    loads[kind].append(weight_load_seconds(log))
                print(f"repetition {rep + 1}/{args.repeat}: " + ", ".join(
                    f"{k} pull {v[-1]:.2f} s" for k, v in pulls.items()), flush=True)
        finally:
            for seed in seeds:
                seed.stop()

    same, resharded = pulls.values()
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"model: Llama-shaped bf16, {size_gb:.2f} GB of safetensors ({gb:.3f} GB pulled per target); "
          f"{args.repeat} repetitions, one target at a time, alternated; every target's greedy tokens equal the "
          f"TP 1 seed's: {tokens_equal} (the TP 2 seed's own: {tp2_tokens_equal})")
    print(f"\n{'TP 1 target':<30} {'pull, median s':>14}  (runs)        SGLang load weight end, median s (runs)")
    for kind in pulls:
        print(f"{kind:<30} {fmt(pulls[kind])}   {fmt(loads[kind])}")
    ratios = [r / s for r, s in zip(resharded, same)]
    print(f"\nresharded / same-layout pull, per repetition: {fmt(ratios)}  (target: <= 1.5)")
    return 0 if tokens_equal else 1


if __name__ == "__main__":
    sys.exit(main())
