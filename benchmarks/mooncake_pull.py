"""The pull alone: sglang-mx's Mooncake read against a loopback socket, same bytes, same rounds.

    .venv/bin/python benchmarks/mooncake_pull.py [--size-gb 1.0] [--rounds 5]

A seed process publishes a Llama-shaped state dict of about --size-gb (the
shapes of `sglang-mx demo`); this process pulls it with `pull_weights`
(Mooncake tcp, 127.0.0.1) in rotating order with benchmarks/loopback_socket.py
moving the same number of bytes. Variants:

- touched: destinations written before the clock starts, verify off (the
  transfer path alone, comparable with the socket, whose buffers are touched too);
- touched+verify: the same, every tensor checked against its digest as it lands;
- fresh+populate+verify: what a target does: never-written tensors, each read's
  destination populated just before it is submitted, verified as it lands.

Prints medians of GB/s and of each variant's ratio to the socket of the same round.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # a fixed threshold: freed tensors are unmapped, so
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"   # "fresh" ones really are (glibc's dynamic one reuses)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from loopback_socket import measure as loopback_seconds  # noqa: E402
from sglang_mx.client import MetadataClient  # noqa: E402
from sglang_mx.records import SourceIdentity  # noqa: E402
from sglang_mx.server import MetadataServer, ServerOptions  # noqa: E402
from sglang_mx.target import PullOptions, digest_verifier, pull_weights  # noqa: E402
from sglang_mx.transfer.memory import populate  # noqa: E402
from sglang_mx.transfer.engine import MooncakeEngine  # noqa: E402
from sglang_mx.transfer.tensors import describe  # noqa: E402
from sglang_mx.demo import llama_shapes  # noqa: E402

IDENTITY = SourceIdentity(model_name="bench/mooncake-pull", tensor_parallel_size=1, dtype="bfloat16")
VARIANTS = ("touched", "touched+verify", "fresh+populate+verify")


def build(size_gb: float, *, fill: bool) -> dict[str, torch.Tensor]:
    """The state dict: each tensor a distinct constant (fill), or never written (torch.empty)."""
    out = {}
    for i, (name, (shape, dtype)) in enumerate(llama_shapes(size_gb).items()):
        out[name] = torch.full(shape, (i % 97) / 97, dtype=dtype) if fill else torch.empty(shape, dtype=dtype)
    return out


def populate_read(read) -> None:
    populate(read.local_addr, read.length)


def _seed(url: str, size_gb: float, ready, stop) -> None:
    from sglang_mx.seed import SeedOptions, start_seed

    tensors = build(size_gb, fill=True)
    with MetadataClient(url) as client, MooncakeEngine.create("127.0.0.1") as engine:
        publisher = start_seed(tensors, engine, IDENTITY, client, worker_rank=0, options=SeedOptions(ready=True))
        ready.set()
        stop.wait()
        publisher.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {v: [] for v in ("socket", *VARIANTS)}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as meta, \
            MetadataClient(meta.address) as client, MooncakeEngine.create("127.0.0.1") as engine:
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        seed = ctx.Process(target=_seed, args=(meta.address, args.size_gb, ready, stop))
        seed.start()
        if not ready.wait(600):
            raise SystemExit("the seed process did not publish")
        touched = build(args.size_gb, fill=True)
        try:
            for rnd in range(args.rounds):
                order = ["socket", *VARIANTS]
                order = order[rnd % len(order):] + order[:rnd % len(order)]
                got: dict[str, float] = {}
                for variant in order:
                    if variant == "socket":
                        nbytes = sum(t.numel() * t.element_size() for t in touched.values())
                        got[variant] = nbytes / loopback_seconds(nbytes) / 1e9
                        continue
                    local = touched if variant.startswith("touched") else build(args.size_gb, fill=False)
                    verify = variant.endswith("verify")
                    start = time.perf_counter()
                    report = pull_weights(client, engine, IDENTITY, worker_rank=0, tensors=describe(local),
                                          options=PullOptions(wait_timeout_s=30, verify="require" if verify else "off"),
                                          verifier=digest_verifier(local) if verify else None,
                                          prepare=None if variant.startswith("touched") else populate_read)
                    wall = time.perf_counter() - start
                    got[variant] = report.bytes / report.seconds / 1e9
                    print(f"round {rnd + 1} {variant:<22} {got[variant]:.2f} GB/s (transfer {report.seconds:.3f} s, "
                          f"verify {report.verify_seconds:.3f} s inside it, pull_weights {wall:.3f} s)", flush=True)
                    del local
                print(f"round {rnd + 1} socket                 {got['socket']:.2f} GB/s", flush=True)
                for variant, rate in got.items():
                    rates[variant].append(rate)
                    if variant != "socket":
                        ratios[variant].append(rate / got["socket"])
        finally:
            stop.set()
            seed.join(60)
    print(f"\n{nbytes / 1e9:.3f} GB, {args.rounds} rounds, order rotated each round; load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<24} {'GB/s median':>11} {'x socket (per-round median)':>28}")
    for variant, values in rates.items():
        ratio = f"{statistics.median(ratios[variant]):.2f}x" if variant in ratios else ""
        print(f"{variant:<24} {statistics.median(values):>11.2f} {ratio:>28}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
