"""Mixed-layout load: a TP 1 SGLang target pulling from a TP 2 seed (resharded) against a TP 1 seed.

    .venv/bin/python benchmarks/reshard_load.py [--size-gb 1.0] [--repeat 3]

Generates a Llama-shaped bf16 model of about --size-gb. Then, --repeat times,
for each kind in turn (alternating which goes first): start ONE seed of it from
disk (TP 1 for the same layout, TP 2 for the resharded pull), start one TP 1
target that loads from it, stop both. Only that seed is up while its target
loads: on this 2-core machine an idle TP 2 SGLang instance alone makes another
instance's pull about 2.5x slower, so keeping both seeds up would bias the
comparison. Prints the medians (and all runs) of the pull (first read to last
byte verified and placed) and of SGLang's own 'Load weight end', and their
ratio. Greedy tokens of every target must equal the first TP 1 seed's (a TP 2
instance's own may differ: it sums partial products in another order). Run by
hand; numbers go into notes with the machine they ran on.
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
    outputs: list[list[int]] = []  # every target's greedy tokens
    with tempfile.TemporaryDirectory(prefix="sglang-mx-reshard-") as tmp, \
            MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta:
        model = make_llama(pathlib.Path(tmp) / "llama", args.size_gb)
        size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        base = {"url": meta.address, "model_name": NAME}
        expected: list[int] | None = None
        tp2_tokens_equal = True
        for rep in range(args.repeat):
            kinds = list(pulls) if rep % 2 == 0 else list(reversed(pulls))
            for kind in kinds:
                tp = 1 if kind.startswith("same") else 2
                seed = SglangServer(model, *seed_args(), tp=tp, name=f"seed-tp{tp}",
                                    mx_config={**base, "source": True})
                try:
                    seed.wait_ready(600)
                    seed_tokens = seed.generate(PROMPT)
                    if tp == 1:
                        expected = expected or seed_tokens
                        tokens_equal &= seed_tokens == expected
                    log, tokens = load_once(model, *TARGET_ARGS, name="target", mx_config={**base, "source": False})
                finally:
                    seed.stop()
                if tp == 2:
                    if "resharded from a TP 2" not in log:
                        raise SystemExit(f"the {kind} target did not reshard:\n{log[-3000:]}")
                    tp2_tokens_equal &= seed_tokens == tokens
                outputs.append(tokens)
                gb, seconds, _ = pull_stats(log)
                pulls[kind].append(seconds)
                loads[kind].append(weight_load_seconds(log))
            print(f"repetition {rep + 1}/{args.repeat}: " + ", ".join(
                f"{k} pull {v[-1]:.2f} s" for k, v in pulls.items()), flush=True)
        tokens_equal &= all(tokens == expected for tokens in outputs)

    same, resharded = pulls.values()
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"model: Llama-shaped bf16, {size_gb:.2f} GB of safetensors ({gb:.3f} GB pulled per target); "
          f"{args.repeat} repetitions, one target at a time, alternated; every target's greedy tokens equal the "
          f"TP 1 seed's: {tokens_equal} (the TP 2 seed's own equal its resharded target's: {tp2_tokens_equal})")
    print(f"\n{'TP 1 target':<30} {'pull, median s':>14}  (runs)        SGLang load weight end, median s (runs)")
    for kind in pulls:
        print(f"{kind:<30} {fmt(pulls[kind])}   {fmt(loads[kind])}")
    ratios = [r / s for r, s in zip(resharded, same)]
    print(f"\nresharded / same-layout pull, per repetition: {fmt(ratios)}  (target: <= 1.5)")
    return 0 if tokens_equal else 1


if __name__ == "__main__":
    sys.exit(main())
