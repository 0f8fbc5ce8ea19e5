"""A fleet starting at once: 1 seed (or --seeds K) and N target processes pull the same weights (no SGLang).

    PYTHONPATH=. .venv/bin/python benchmarks/fleet.py --targets 8 --size-mb 256
    PYTHONPATH=. .venv/bin/python benchmarks/fleet.py --targets 8 --size-mb 256 --cascade --max-readers 2 --max-seeds 2

A metadata server runs in this process; the seed and every target are processes
of their own (this script with `worker`), each with its own Mooncake engine on
127.0.0.1 over tcp. Targets build empty weights, wait for one "go" sent to all
at once, pull with verify=require, and print where their bytes came from and
when they finished (seconds after "go"). With --cascade a target publishes
itself READY as soon as its pull is verified, so later targets can read from
it. At the end every publisher prints its peak concurrent readers (its reader
leases). The last line is JSON for benchmarks/fleet_model.py (per-link GB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import selectors
import statistics
import subprocess
import sys
import threading
import time
import zlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDENTITY_NAME = "bench/fleet"


# --- one process: seed or target ----------------------------------------------------------------

def _weights(size_mb: int, *, filled: bool) -> dict[str, torch.Tensor]:
    """16 bf16-sized tensors of uneven sizes, about `size_mb` MiB in all; content seeded by name."""
    shares = [1 + (i * 5) % 7 for i in range(16)]
    unit = size_mb * 1024 * 1024 / sum(shares)
    out = {}
    for i, share in enumerate(shares):
        nbytes = int(unit * share) // 64 * 64
        t = torch.zeros(nbytes, dtype=torch.uint8)
        if filled:
            t.random_(generator=torch.Generator().manual_seed(zlib.crc32(f"layer.{i}".encode())))
        out[f"layer.{i}.weight"] = t
    return out


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _retire(publisher, reads: int) -> None:
    """Withdraw the seed (STALE) once it has served `reads` targets and none is reading."""
    while not (publisher.leases.granted >= reads and publisher.leases.active() == 0):
        time.sleep(0.01)
    publisher.close()


def worker(args) -> None:
    from sglang_mx.client import MetadataClient
    from sglang_mx.records import SourceIdentity
    from sglang_mx.seed import SeedOptions, start_seed
    from sglang_mx.target import PullOptions, digest_verifier, pull_weights
    from sglang_mx.transfer.engine import MooncakeEngine
    from sglang_mx.transfer.tensors import describe

    identity = SourceIdentity(model_name=IDENTITY_NAME, tensor_parallel_size=1, dtype="uint8")
    engine = MooncakeEngine.create("127.0.0.1", protocol="tcp")
    client = MetadataClient(args.url, timeout_s=10)
    tensors = _weights(args.size_mb, filled=args.role == "seed")
    publisher = None
    if args.role == "seed":
        publisher = start_seed(tensors, engine, identity, client, worker_rank=0, worker_id=args.name,
                               options=SeedOptions(ready=True, max_readers=args.max_readers))
        if args.retire_after:
            threading.Thread(target=_retire, args=(publisher, args.retire_after), daemon=True).start()
        _say(name=args.name, event="ready")
    else:
        _say(name=args.name, event="armed")
        sys.stdin.readline()  # "go"
        go = time.time()
        report = pull_weights(client, engine, identity, worker_rank=0, tensors=describe(tensors),
                              options=PullOptions(wait_timeout_s=args.wait_s, poll_interval_s=0.05,
                                                  verify="require", max_seeds=args.max_seeds),
                              verifier=digest_verifier(tensors))
        pulled = time.time()
        if args.cascade:
            publisher = start_seed(tensors, engine, identity, client, worker_rank=0, worker_id=args.name,
                                   options=SeedOptions(ready=True, max_readers=args.max_readers))
        _say(name=args.name, event="pulled", go=go, pulled=pulled, seeding=time.time() if publisher else None,
             served=report.served, bytes=report.bytes, transfer_s=report.seconds, verify_s=report.verify_seconds,
             failures=len(report.failures))
    sys.stdin.read()  # until the driver closes stdin
    peak = publisher.leases.peak if publisher and publisher.leases else 0
    granted = publisher.leases.granted if publisher and publisher.leases else 0
    refused = publisher.leases.refused if publisher and publisher.leases else 0
    _say(name=args.name, event="done", peak_readers=peak, leases=granted, refused=refused)
    if publisher:
        publisher.close()


# --- the driver ------------------------------------------------------------------------------------

class _Proc:
    def __init__(self, name: str, role: str, args) -> None:
        argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "worker", "--role", role, "--name", name,
                "--url", args.url, "--size-mb", str(args.size_mb), "--max-readers", str(args.max_readers),
                "--max-seeds", str(args.max_seeds), "--wait-s", str(args.wait_s),
                "--retire-after", str(args.retire_after)]
        if args.cascade:
            argv.append("--cascade")
        env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_minloglevel="2")
        self.name = name
        self.log = open(os.devnull, "w") if not args.logs else open(f"{args.logs}/{name}.log", "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def line(self, timeout_s: float) -> dict:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise TimeoutError(f"{self.name} said nothing for {timeout_s} s")
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"{self.name} exited with {self.proc.wait()}")
        return json.loads(text)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def drive(args) -> dict:
    from sglang_mx.server import MetadataServer, ServerOptions

    server = MetadataServer(ServerOptions(host="127.0.0.1", port=0)).start()
    args.url = server.address
    procs: list[_Proc] = []
    try:
        seeds = [_Proc("seed" if args.seeds == 1 else f"seed{i + 1}", "seed", args) for i in range(args.seeds)]
        procs += seeds
        for seed in seeds:
            seed.line(args.timeout_s)
        targets = [_Proc(f"t{i + 1}", "target", args) for i in range(args.targets)]
        procs += targets
        for t in targets:
            t.line(args.timeout_s)
        for t in targets:
            t.proc.stdin.write("go\n")
        for t in targets:
            t.proc.stdin.flush()
        results = [t.line(args.timeout_s) for t in targets]
        for p in procs:
            p.proc.stdin.close()
        stats = {p.name: p.line(30) for p in procs}
    finally:
        for p in procs:
            p.kill()
        server.stop(grace_s=0.5)
    go = min(r["go"] for r in results)
    seed_names = {s.name for s in seeds}
    print(f"fleet: {args.seeds} seed(s), {args.targets} targets, {args.size_mb} MiB each, cascade={args.cascade}, "
          f"max_seeds={args.max_seeds}, max_readers={args.max_readers or 'no cap'}")
    print(f"{'target':>6}  {'done_s':>7}  {'xfer_s':>7}  {'verify_s':>8}  {'GB/s':>5}  pulled from (MB)")
    for r in sorted(results, key=lambda r: r["pulled"]):
        sources = ", ".join(f"{w} {b / 1e6:.0f}" for w, b in sorted(r["served"].items(), key=lambda x: -x[1]))
        print(f"{r['name']:>6}  {r['pulled'] - go:7.2f}  {r['transfer_s']:7.2f}  {r['verify_s']:8.2f}  "
              f"{r['bytes'] / r['transfer_s'] / 1e9:5.2f}  {sources}")
    print("peak concurrent readers: " + ", ".join(
        f"{name} {s['peak_readers']}" for name, s in stats.items() if s["leases"] or name in seed_names))
    rates = [r["bytes"] / r["transfer_s"] / 1e9 for r in results]
    summary = {
        "targets": args.targets, "size_mb": args.size_mb, "cascade": args.cascade, "max_seeds": args.max_seeds,
        "max_readers": args.max_readers, "all_done_s": round(max(r["pulled"] for r in results) - go, 3),
        "median_target_gb_s": round(statistics.median(rates), 3),
        "seed_peak_readers": max(stats[name]["peak_readers"] for name in seed_names),
        "from_targets": sum(1 for r in results if set(r["served"]) - seed_names),
        "pulled_from": {r["name"]: sorted(r["served"]) for r in results},
        "peak_readers": {name: s["peak_readers"] for name, s in stats.items()},
    }
    print(json.dumps(summary))
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--role", choices=("seed", "target"), required=True)
    w.add_argument("--name", required=True)
    w.add_argument("--url", required=True)
    for q in (p, w):
        q.add_argument("--size-mb", type=int, default=256)
        q.add_argument("--max-readers", type=int, default=0, help="per publisher; 0: no cap")
        q.add_argument("--max-seeds", type=int, default=1, help="stripes per target")
        q.add_argument("--cascade", action="store_true", help="a target seeds as soon as its pull is verified")
        q.add_argument("--wait-s", type=float, default=60.0)
    w.add_argument("--retire-after", type=int, default=0)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--retire-after", type=int, default=0,
                   help="each seed withdraws (STALE) after serving this many targets (0: never)")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--logs", default="", help="a folder for each process's log")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cmd == "worker":
        worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
