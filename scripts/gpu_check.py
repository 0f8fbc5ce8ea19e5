"""A prepared end-to-end check on one GPU: a seed process and a target process, a metadata server,
a Llama-shaped bf16 state dict pulled over Mooncake and verified by digest. Run by gpu_check.sh.

    python3 scripts/gpu_check.py                                  # CUDA, 4 GB, tcp then nvlink
    python3 scripts/gpu_check.py --device cpu --size-gb 0.2 --protocols tcp   # smoke test, no GPU

For each protocol it starts a SEED process (builds the tensors from seeded generators on the device,
digests them there, registers them with a MooncakeEngine, publishes with start_seed) and a TARGET process
(allocates the same shapes, pull_weights, verifies every digest on the device, regenerates a few tensors
for a torch.equal spot check, flips a byte to see it caught). Each prints the transport Mooncake actually
installed (read back from its segment descriptor; a mismatch is refused by MooncakeEngine.create) and the
regions it registered per CUDA allocation (each region must lie inside one allocation).

Before the pulls a CEILINGS process measures, in the same run: a device-to-device copy in one process,
a cross-process CUDA IPC copy, a loopback socket, and host<->device copies (pinned and pageable). The
summary prints every rate as a ratio to its ceiling: tcp against the socket and the pageable copies,
nvlink_intra against the IPC copy, digest rates against the device copy.

Every failing step prints why and the check goes on. Results go to stdout (gpu_check.sh tees them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sglang_mx.client import MetadataClient  # noqa: E402
from sglang_mx.digest import digest_many, verify  # noqa: E402
from sglang_mx.seed import SeedOptions, start_seed  # noqa: E402
from sglang_mx.target import PullOptions, digest_verifier, pull_weights  # noqa: E402
from sglang_mx.transfer.engine import MooncakeEngine  # noqa: E402
from sglang_mx.transfer.tensors import describe  # noqa: E402
from sglang_mx.records import SourceIdentity  # noqa: E402

_SEED_EXIT_S = 15  # a seed gets this long to close once its stdin is closed


# --- the weights ---------------------------------------------------------------


def llama_shapes(size_gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-3-8B-shaped state dict (a narrower one below 1 GB) with layers added until >= size_gb."""
    h, kv, inter, vocab = (4096, 1024, 14336, 128256) if size_gb >= 1 else (1024, 256, 3584, 32000)
    layer = [("input_layernorm.weight", (h,)), ("self_attn.q_proj.weight", (h, h)),
             ("self_attn.k_proj.weight", (kv, h)), ("self_attn.v_proj.weight", (kv, h)),
             ("self_attn.o_proj.weight", (h, h)), ("post_attention_layernorm.weight", (h,)),
             ("mlp.gate_proj.weight", (inter, h)), ("mlp.up_proj.weight", (inter, h)),
             ("mlp.down_proj.weight", (h, inter))]
    per_layer = sum(2 * _numel(s) for _, s in layer)
    fixed = 2 * 2 * vocab * h + 2 * h
    layers = max(1, -(-int(size_gb * 1e9 - fixed) // per_layer))
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        shapes += [(f"model.layers.{i}.{name}", shape) for name, shape in layer]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fill(t: torch.Tensor, index: int) -> torch.Tensor:
    """Deterministic random bytes for tensor `index`, generated on t's device."""
    gen = torch.Generator(device=t.device).manual_seed(1000 + index)
    t.view(torch.uint8).random_(0, 256, generator=gen)
    return t


def build(shapes, device: str, *, filled: bool) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, shape) in enumerate(shapes):
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        out[name] = fill(t, i) if filled else t.zero_()
    sync(device)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocation_report(regions: list[tuple[int, int]]) -> dict:
    """How the registered regions sit in CUDA allocations (the driver's answer; host memory: none)."""
    from sglang_mx.transfer.cuda import allocation_of

    allocs = [allocation_of(addr) for addr, _ in regions]
    inside = sum(1 for (addr, n), a in zip(regions, allocs) if a is not None and addr + n <= a.end)
    return {"regions": len(regions), "allocations": len({a.base for a in allocs if a is not None}),
            "regions_inside_one_allocation": inside, "virtual_allocations": sum(1 for a in allocs if a and a.virtual)}


class CountingEngine:
    """A MooncakeEngine that remembers and times the regions it registered; everything else is the engine's."""

    def __init__(self, engine: MooncakeEngine) -> None:
        self._engine = engine
        self.regions: list[tuple[int, int]] = []
        self.register_s = 0.0

    def register(self, ranges):
        start = time.perf_counter()
        regions = self._engine.register(ranges)
        self.register_s += time.perf_counter() - start
        self.regions += regions
        return regions

    def __getattr__(self, name):
        return getattr(self._engine, name)


def identity_for(protocol: str) -> SourceIdentity:
    return SourceIdentity(model_name=f"gpu-check/{protocol}", tensor_parallel_size=1, dtype="bfloat16")


def emit(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


# --- the seed and target processes --------------------------------------------------


def run_seed(args) -> None:
    work = Path(args.workdir)
    result: dict = {"role": "seed"}
    try:
        shapes = llama_shapes(args.size_gb)
        start = time.perf_counter()
        tensors = build(shapes, args.device, filled=True)
        result["build_s"] = time.perf_counter() - start
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        digest_many(tensors)  # warm-up (kernels, keys on the device)
        start = time.perf_counter()
        digests = digest_many(tensors)
        result["digest_gbps"] = nbytes / (time.perf_counter() - start) / 1e9
        result["algorithm"] = next(iter(digests.values())).partition(":")[0]
        (work / "digests.json").write_text(json.dumps(digests))
        result.update(tensors=len(tensors), bytes=nbytes,
                      storages=len({t.untyped_storage().data_ptr() for t in tensors.values()}))
        engine = MooncakeEngine.create("127.0.0.1", protocol=args.protocol)
        result["transport"] = engine.transport  # read back from Mooncake; create refused any other
        print(f"seed: Mooncake transport {engine.transport} (asked {args.protocol})", file=sys.stderr, flush=True)
        counting = CountingEngine(engine)
        client = MetadataClient(args.url, timeout_s=10, retries=2)
        # The product's path: start_seed computes the digests on the GPU and publishes them.
        publisher = start_seed(tensors, counting, identity_for(args.protocol), client, worker_rank=0,
                               options=SeedOptions(heartbeat_interval_s=5, ready=True))
        result.update(status="ready", register_s=counting.register_s, session=engine.session_id,
                      **allocation_report(counting.regions))
        emit(work / "seed.json", result)
        sys.stdin.read()  # until the orchestrator closes our stdin
        publisher.close()
        engine.close()
        client.close()
    except BaseException as e:
        result.update(status="failed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=4))
        emit(work / "seed.json", result)
        raise SystemExit(3)


def run_target(args) -> None:
    work = Path(args.workdir)
    result: dict = {"role": "target"}
    try:
        shapes = llama_shapes(args.size_gb)
        tensors = build(shapes, args.device, filled=False)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        engine = MooncakeEngine.create("127.0.0.1", protocol=args.protocol)
        result["transport"] = engine.transport
        print(f"target: Mooncake transport {engine.transport} (asked {args.protocol})", file=sys.stderr, flush=True)
        counting = CountingEngine(engine)
        client = MetadataClient(args.url, timeout_s=10, retries=2)
        # The product's path: the target checks every tensor against the published digests on the GPU.
        report = pull_weights(client, counting, identity_for(args.protocol), worker_rank=0,
                              tensors=describe(tensors),
                              options=PullOptions(wait_timeout_s=args.wait_s, poll_interval_s=0.2, verify="require"),
                              verifier=digest_verifier(tensors))
        result.update(bytes=report.bytes, reads=report.reads, pull_s=report.seconds, pull_gbps=report.gb_per_s,
                      register_s=counting.register_s, **allocation_report(counting.regions),
                      verified_in_pull=report.verified, verify_in_pull_s=report.verify_seconds)
        expected = json.loads((work / "digests.json").read_text())
        start = time.perf_counter()
        bad = [name for name, t in tensors.items() if not verify(t, expected[name])]
        result["verify_gbps"] = nbytes / (time.perf_counter() - start) / 1e9
        result.update(digests_ok=len(tensors) - len(bad), digests_total=len(tensors), bad=bad)
        # negative control: one flipped byte in the middle of a tensor must fail its digest
        probe_name = list(tensors)[1]
        probe = tensors[probe_name].view(torch.uint8).reshape(-1)
        middle = probe.numel() // 2
        probe[middle] ^= 0x10
        result["flip_detected"] = not verify(tensors[probe_name], expected[probe_name])
        probe[middle] ^= 0x10
        names = list(tensors)
        spot = sorted({0, 1, len(names) // 2, len(names) - 2, len(names) - 1})
        equal = []
        for i in spot:
            want = fill(torch.empty_like(tensors[names[i]]), i)
            equal.append(torch.equal(want.view(torch.uint8), tensors[names[i]].view(torch.uint8)))
        result.update(spot_equal=f"{sum(equal)}/{len(equal)}", spot=[names[i] for i in spot])
        result["status"] = ("ok" if not bad and all(equal) else "wrong bytes") + (
            "" if result["flip_detected"] else ", flip missed")
        engine.close()
        client.close()
    except BaseException as e:
        result.update(status="failed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=4))
        emit(work / "target.json", result)
        raise SystemExit(3)
    emit(work / "target.json", result)


def _rate(nbytes: int, fn, device: str, repeats: int = 3) -> float:
    """Median GB/s of `fn()` moving `nbytes`, after one warm-up."""
    rates = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])


def _ipc_child(queue, done, nbytes: int) -> None:
    """Holds a CUDA buffer and hands it to the parent as a CUDA IPC handle (torch.multiprocessing)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    torch.cuda.synchronize()
    queue.put(src)
    done.wait(120)


def _socket_gbps(nbytes: int) -> float:
    """A loopback TCP socket: one thread sends touched pages, this one receives into a touched buffer."""
    import socket
    import threading

    data = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    sink = bytearray(len(data))
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def send() -> None:
        with socket.create_connection(("127.0.0.1", port)) as c:
            for _ in range(3):
                c.sendall(data)

    sender = threading.Thread(target=send)
    sender.start()
    conn, _ = server.accept()
    view, rates = memoryview(sink), []
    for _ in range(3):
        start, got = time.perf_counter(), 0
        while got < len(sink):
            got += conn.recv_into(view[got:], len(sink) - got)
        rates.append(len(sink) / (time.perf_counter() - start) / 1e9)
    sender.join()
    conn.close()
    server.close()
    return statistics.median(rates)


def run_ceilings(args) -> None:
    """Ceilings measured in this run: device copy, CUDA IPC copy, loopback socket, host<->device."""
    work = Path(args.workdir)
    out: dict = {}
    nbytes = int(min(args.size_gb, 1.0) * (1 << 30)) >> 20 << 20
    steps = [("socket_gbps", lambda: _socket_gbps(nbytes))]
    if args.device.startswith("cuda"):
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
        dev2 = torch.empty_like(dev)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(1)

        def ipc() -> float:
            import torch.multiprocessing as mp

            ctx = mp.get_context("spawn")
            queue, done = ctx.Queue(), ctx.Event()
            child = ctx.Process(target=_ipc_child, args=(queue, done, nbytes))
            child.start()
            try:
                remote = queue.get(timeout=120)  # mapped from the child through a CUDA IPC handle
                return _rate(nbytes, lambda: dev2.copy_(remote), "cuda")
            finally:
                done.set()
                child.join(30)

        steps = [("device_copy_gbps", lambda: _rate(nbytes, lambda: dev2.copy_(dev), "cuda")),
                 ("ipc_copy_gbps", ipc),
                 ("h2d_pinned_gbps", lambda: _rate(nbytes, lambda: dev2.copy_(pinned, non_blocking=True), "cuda")),
                 ("d2h_pinned_gbps", lambda: _rate(nbytes, lambda: pinned.copy_(dev, non_blocking=True), "cuda")),
                 ("h2d_pageable_gbps", lambda: _rate(nbytes, lambda: dev2.copy_(pageable), "cuda")),
                 ("d2h_pageable_gbps", lambda: _rate(nbytes, lambda: pageable.copy_(dev), "cuda"))] + steps
    for key, fn in steps:
        try:
            out[key] = fn()
        except Exception as e:  # a check script: report and go on
            out[key + "_error"] = f"{type(e).__name__}: {e}"
    out["ceiling_bytes"] = nbytes
    emit(work / "ceilings.json", out)


# --- the orchestrator --------------------------------------------------------------------


def _spawn(args, url: str, role: str, work: Path, protocol: str, **popen):
    cmd = [sys.executable, __file__, "--device", args.device, "--size-gb", str(args.size_gb), "--url", url,
           "--protocol", protocol, "--workdir", str(work), "--wait-s", str(args.wait_s), "--role", role]
    return subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), **popen)


def measure_ceilings(args, url: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-ceilings-"))
    with open(work / "ceilings.log", "w") as log_file:
        proc = _spawn(args, url, "ceilings", work, "tcp", stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            proc.wait(timeout=args.run_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    path = work / "ceilings.json"
    if not path.exists():
        print("--- ceilings: no result; last lines of its stderr:")
        print("\n".join((work / "ceilings.log").read_text(errors="replace").splitlines()[-15:]))
        return {}
    return json.loads(path.read_text())


def run_pair(args, url: str, protocol: str, timeout_s: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{protocol}-"))
    logs = {role: open(work / f"{role}.log", "w") for role in ("seed", "target")}
    seed = _spawn(args, url, "seed", work, protocol, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                  stderr=logs["seed"])
    target = _spawn(args, url, "target", work, protocol, stdout=subprocess.DEVNULL, stderr=logs["target"])
    deadline = time.monotonic() + timeout_s
    note = ""
    while target.poll() is None:
        if seed.poll() is not None:
            note = f"seed exited with {seed.returncode} before the target finished"
            target.kill()
            break
        if time.monotonic() > deadline:
            note = f"timed out after {timeout_s:.0f} s"
            target.kill()
            break
        time.sleep(0.2)
    target.wait()
    if seed.poll() is None:
        seed.stdin.close()
        try:
            seed.wait(timeout=_SEED_EXIT_S)
        except subprocess.TimeoutExpired:
            seed.kill()
            seed.wait()
    for f in logs.values():
        f.close()
    out = {"protocol": protocol, "note": note}
    for role in ("seed", "target"):
        path = work / f"{role}.json"
        out[role] = json.loads(path.read_text()) if path.exists() else {"status": "no result"}
        if out[role].get("status") not in ("ready", "ok"):
            print(f"--- {protocol} {role}: {out[role].get('status')} {out[role].get('error', '')}")
            print(out[role].get("trace", ""))
            print(f"--- last lines of the {role}'s stderr ({work / (role + '.log')}):")
            print("\n".join((work / f"{role}.log").read_text(errors="replace").splitlines()[-25:]))
    return out


def _ratio(rate: float | None, ceiling: float | None) -> str:
    return f"{rate / ceiling:.2f}x" if rate and ceiling else "-"


def summary(runs: list[dict], ceil: dict) -> None:
    print("\n=== ceilings (this run, GB/s) ===")
    for key in ("device_copy_gbps", "ipc_copy_gbps", "socket_gbps", "h2d_pinned_gbps", "d2h_pinned_gbps",
                "h2d_pageable_gbps", "d2h_pageable_gbps"):
        err = ceil.get(key + "_error")
        print(f"  {key[:-5]:14} " + (f"{ceil[key]:8.2f}" if key in ceil else f"not measured{': ' + err if err else ''}"))
    print("\n=== summary ===")
    print(f"{'protocol':13} {'status':12} {'asked->used':24} {'GB':>6} {'pull s':>7} {'GB/s':>7} {'digests':>9} "
          f"{'spot':>5} {'flip':>5}")
    for r in runs:
        s, t = r["seed"], r["target"]
        status = t.get("status", "?") if s.get("status") == "ready" else (
            f"seed {s['status']}" if s.get("status") else "not run")
        used = f"{r['protocol']}->{s.get('transport', '?')}/{t.get('transport', '?')}"
        print(f"{r['protocol']:13} {status:12} {used:24} {t.get('bytes', 0) / 1e9:6.2f} {t.get('pull_s', 0):7.3f} "
              f"{t.get('pull_gbps', 0):7.2f} "
              f"{str(t.get('digests_ok', '-')) + ' of ' + str(t.get('digests_total', '-')):>9} "
              f"{t.get('spot_equal', '-'):>5} {str(t.get('flip_detected', '-')):>5}")
        rate = t.get("pull_gbps")
        if r["protocol"] == "tcp":
            print(f"    pull vs ceilings: socket {_ratio(rate, ceil.get('socket_gbps'))}, device->host pageable "
                  f"{_ratio(rate, ceil.get('d2h_pageable_gbps'))}, host->device pageable "
                  f"{_ratio(rate, ceil.get('h2d_pageable_gbps'))}, pinned {_ratio(rate, ceil.get('h2d_pinned_gbps'))}")
        else:
            print(f"    pull vs ceilings: CUDA IPC copy {_ratio(rate, ceil.get('ipc_copy_gbps'))}, device copy "
                  f"{_ratio(rate, ceil.get('device_copy_gbps'))}")
        print(f"    digests vs device copy: seed {_ratio(s.get('digest_gbps'), ceil.get('device_copy_gbps'))} "
              f"({s.get('digest_gbps', 0):.1f} GB/s, {s.get('algorithm', '?')}), target verify "
              f"{_ratio(t.get('verify_gbps'), ceil.get('device_copy_gbps'))} ({t.get('verify_gbps', 0):.1f} GB/s)")
        for role, d in (("seed", s), ("target", t)):
            if d.get("regions") is not None:
                print(f"    {role}: {d['regions']} region(s) registered in {d.get('register_s', 0) * 1e3:.1f} ms over "
                      f"{d.get('allocations')} CUDA allocation(s); {d.get('regions_inside_one_allocation')} inside "
                      f"one allocation; {d.get('virtual_allocations')} in virtual-memory allocations")
            if d.get("error"):
                print(f"    {role} error: {d['error'][:300]}")
        if t.get("bad"):
            print(f"    {len(t['bad'])} wrong digest(s); first: {', '.join(t['bad'][:6])}")
        if r["note"]:
            print(f"    note: {r['note']}")
    seeds = [r["seed"] for r in runs if r["seed"].get("tensors")]
    if seeds:
        s = seeds[0]
        print(f"seed tensors: {s.get('tensors')}, {s.get('bytes', 0) / 1e9:.2f} GB in {s.get('storages')} storages")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--size-gb", type=float, default=4.0, help="4 GB: 48 tensors of a Llama-3-8B shape")
    p.add_argument("--protocols", default="tcp,nvlink_intra")
    p.add_argument("--run-timeout-s", type=float, default=150.0, help="per seed+target pair")
    p.add_argument("--wait-s", type=float, default=120.0, help="how long the target waits for the seed")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="total time for all runs (0: no limit); runs that no longer fit are skipped, so the "
                        "summary always prints")
    p.add_argument("--role", choices=["main", "seed", "target", "ceilings"], default="main", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--protocol", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "seed":
        return run_seed(args)
    if args.role == "target":
        return run_target(args)
    if args.role == "ceilings":
        return run_ceilings(args)

    from sglang_mx.server import MetadataServer, ServerOptions

    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()})"
             if args.device.startswith("cuda") and torch.cuda.is_available() else ""))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the smoke test")
    runs = []
    budget_end = time.monotonic() + args.budget_s if args.budget_s > 0 else float("inf")
    with MetadataServer(ServerOptions(host="127.0.0.1", port=0)) as server:
        print(f"metadata server on {server.address}")
        print("\n>>> ceilings", flush=True)
        ceil = measure_ceilings(args, server.address)
        for protocol in [x for x in args.protocols.split(",") if x]:
            print(f"\n>>> {protocol}: {args.size_gb} GB", flush=True)
            start = time.monotonic()
            timeout_s = min(args.run_timeout_s, budget_end - start - _SEED_EXIT_S - 5)
            if timeout_s < 20:
                print(f"<<< {protocol} skipped: the --budget-s of {args.budget_s:g} s is spent")
                runs.append({"protocol": protocol, "note": "skipped (time budget)", "seed": {}, "target": {}})
                continue
            try:
                run = run_pair(args, server.address, protocol, timeout_s=timeout_s)
            except Exception as e:  # a check script: report and go on to the next run
                run = {"protocol": protocol, "note": f"{type(e).__name__}: {e}", "seed": {}, "target": {}}
            print(f"<<< {protocol} done in {time.monotonic() - start:.1f} s: "
                  f"seed {run['seed'].get('status')} ({run['seed'].get('transport')}), "
                  f"target {run['target'].get('status')} ({run['target'].get('transport')})", flush=True)
            runs.append(run)
    summary(runs, ceil)


if __name__ == "__main__":
    main()
