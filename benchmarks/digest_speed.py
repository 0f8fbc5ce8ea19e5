"""GB/s of the tensor digests (sglang_mx.digest) on 1 GB of bf16 weights in ~100 tensors.

    .venv/bin/python benchmarks/digest_speed.py                 # CPU (one thread), and CUDA if present
    .venv/bin/python benchmarks/digest_speed.py --device cuda --gb 4

CPU runs with torch.set_num_threads(1), so its figures are per core for xxh3-64
and mxh64 (xxhash is single-threaded anyway); blake3 uses every core (the blake3
package's own threads), as seeds use it. On CUDA, a device-to-device copy of the same tensors in
the same run is the reference: a digest reads each byte once, a copy reads and
writes it. Each figure is the median of --repeats runs (min and max beside it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sglang_mx.digest import ALGORITHMS, digest_many, verify


def make_tensors(total_bytes: int, count: int, device: str) -> dict[str, torch.Tensor]:
    """`count` bf16 tensors of uneven sizes adding up to about `total_bytes`, random content."""
    weights = [1 + (i * 7) % 13 for i in range(count)]  # sizes from 1x to 13x
    unit = total_bytes / sum(weights)
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for i, w in enumerate(weights):
        numel = max(1, int(unit * w) // 2) | 1  # odd element counts: tails are exercised too
        t = torch.empty(numel, dtype=torch.bfloat16, device=device)
        t.view(torch.int16).random_(generator=gen)
        tensors[f"layer.{i}.weight"] = t
    return tensors


def timed(fn, repeats: int, sync) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def bench(device: str, gb: float, count: int, repeats: int) -> tuple[list[tuple[str, str, str, list[float]]], int]:
    tensors = make_tensors(int(gb * 1e9), count, device)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    rows = []
    # the device's own algorithm, all tensors in one call
    first = next(iter(digest_many({"x": next(iter(tensors.values()))}).values())).partition(":")[0]
    rows.append((device, first, "digest_many", timed(lambda: digest_many(tensors), repeats, sync)))
    for algorithm in ALGORITHMS:
        wrong = f"{algorithm}:{'0' * (64 if algorithm == 'blake3' else 16)}"  # costs the same as a right one
        fn = lambda: [verify(t, wrong) for t in tensors.values()]  # noqa: E731
        reps = repeats if (algorithm == first or device == "cpu") else 1  # the host-streamed path is slow
        rows.append((device, algorithm, "verify each", timed(fn, reps, sync)))
    if device.startswith("cuda"):
        copies = {name: torch.empty_like(t) for name, t in tensors.items()}

        def copy():
            for name, t in tensors.items():
                copies[name].copy_(t)

        copy()
        rows.append((device, "(d2d copy)", "copy_ each", timed(copy, repeats, sync)))
    return [(d, a, api, [nbytes / s / 1e9 for s in secs]) for d, a, api, secs in rows], nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="all: CPU, then CUDA when available (default)")
    p.add_argument("--gb", type=float, default=1.0, help="total size in GB (1e9 bytes)")
    p.add_argument("--tensors", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("no CUDA device")
        devices.remove("cuda")
    torch.set_num_threads(1)  # CPU figures per core
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"{'device':7} {'algorithm':11} {'api':12} {'GB/s median':>11} {'min':>8} {'max':>8}  bytes")
    for device in devices:
        rows, nbytes = bench(device, args.gb, args.tensors, args.repeats)
        for d, algorithm, api, rates in rows:
            print(f"{d:7} {algorithm:11} {api:12} {statistics.median(rates):11.2f} {min(rates):8.2f} "
                  f"{max(rates):8.2f}  {nbytes} in {args.tensors} tensors", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
