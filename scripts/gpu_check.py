"""A prepared end-to-end check on one GPU: a seed process and a target process, a metadata server,
a Llama-shaped bf16 state dict pulled over Mooncake and verified by digest. Run by gpu_check.sh.

    python3 scripts/gpu_check.py                                  # CUDA, 4 GB, tcp then nvlink
    python3 scripts/gpu_check.py --device cpu --size-gb 0.2 --protocols tcp   # smoke test, no GPU

For each protocol and registration mode it starts a SEED process (builds the tensors from seeded
generators on the device, digests them there, registers them with a MooncakeEngine, publishes with
SeedPublisher) and a TARGET process (allocates the same shapes, pull_weights, verifies every digest
on the device, regenerates a few tensors for a torch.equal spot check), then prints one summary table.

Registration modes (how the seed's memory is handed to Mooncake):
- tensors: what sglang_mx does (MooncakeEngine.register: one region per run of address-contiguous
  tensors).
- allocations: one region per CUDA allocation (caching-allocator segment) holding a tensor. Mooncake's
  nvlink transport exports a CUDA IPC handle, which names the allocation, and the reader maps the
  allocation's BASE while treating it as the registered address: a region that does not start at its
  allocation's base then reads from the wrong offset. The digests show which mode gets the bytes right.

Every failing step prints why and the check goes on. Results go to stdout (gpu_check.sh tees them).
"""

from __future__ import annotations

import argparse
import bisect
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

MODES = ("tensors", "allocations")
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


def allocations(tensors: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(base, size) of each allocation holding a tensor: CUDA allocator segments, or CPU storages."""
    first = next(iter(tensors.values()))
    if first.device.type == "cuda":
        spans = [(s["address"], s["total_size"]) for s in torch.cuda.memory_snapshot()]
    else:
        spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors.values()]
    spans = sorted(set(spans))
    starts = [a for a, _ in spans]
    used = set()
    for t in tensors.values():
        i = bisect.bisect_right(starts, t.data_ptr()) - 1
        if i >= 0 and t.data_ptr() < spans[i][0] + spans[i][1]:
            used.add(spans[i])
    return sorted(used)


class CountingEngine:
    """A MooncakeEngine that counts and times registrations, and in mode 'allocations' registers the
    whole allocation holding each range instead of the range."""

    def __init__(self, engine: MooncakeEngine, allocs: list[tuple[int, int]] | None) -> None:
        self._engine = engine
        self._allocs = allocs
        self.session_id = engine.session_id
        self.regions = 0
        self.register_s = 0.0

    def register(self, ranges):
        ranges = [r for r in ranges if r[1] > 0]
        if self._allocs is not None:
            starts = [a for a, _ in self._allocs]
            expanded = set()
            for addr, length in ranges:
                i = bisect.bisect_right(starts, addr) - 1
                base, size = self._allocs[max(i, 0)]
                if i < 0 or addr + length > base + size:
                    raise RuntimeError(f"range 0x{addr:x}+{length} lies in no known allocation")
                expanded.add((base, size))
            ranges = sorted(expanded)
        start = time.perf_counter()
        regions = self._engine.register(ranges)
        self.register_s += time.perf_counter() - start
        self.regions += len(regions)
        return regions

    def unregister(self, regions) -> None:
        self._engine.unregister(regions)

    def read(self, session, reads) -> None:
        self._engine.read(session, reads)

    def close(self) -> None:
        self._engine.close()


def identity_for(protocol: str, mode: str) -> SourceIdentity:
    return SourceIdentity(model_name=f"gpu-check/{protocol}-{mode}", tensor_parallel_size=1, dtype="bfloat16")


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
        allocs = allocations(tensors)
        bases = {a for a, _ in allocs}
        result.update(tensors=len(tensors), bytes=nbytes, allocations=len(allocs),
                      tensors_at_allocation_base=sum(t.data_ptr() in bases for t in tensors.values()),
                      not_at_base=[name for name, t in tensors.items() if t.data_ptr() not in bases],
                      storages=len({t.untyped_storage().data_ptr() for t in tensors.values()}))
        engine = MooncakeEngine.create("127.0.0.1", protocol=args.protocol)
        counting = CountingEngine(engine, allocs if args.mode == "allocations" else None)
        client = MetadataClient(args.url, timeout_s=10, retries=2)
        # The product's path: start_seed computes the digests on the GPU and publishes them.
        publisher = start_seed(tensors, counting, identity_for(args.protocol, args.mode), client, worker_rank=0,
                               options=SeedOptions(heartbeat_interval_s=5, ready=True))
        result.update(status="ready", registrations=counting.regions, register_s=counting.register_s,
                      session=engine.session_id)
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
        counting = CountingEngine(engine, None)
        client = MetadataClient(args.url, timeout_s=10, retries=2)
        # The product's path: the target checks every tensor against the published digests on the GPU.
        report = pull_weights(client, counting, identity_for(args.protocol, args.mode), worker_rank=0,
                              tensors=describe(tensors),
                              options=PullOptions(wait_timeout_s=args.wait_s, poll_interval_s=0.2, verify="require"),
                              verifier=digest_verifier(tensors))
        result.update(bytes=report.bytes, reads=report.reads, pull_s=report.seconds, pull_gbps=report.gb_per_s,
                      registrations=counting.regions, register_s=counting.register_s,
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
        if args.copy_ceiling:
            result["copy_gbps"] = copy_gbps(tensors, args.device)
        result["status"] = ("ok" if not bad and all(equal) else "wrong bytes") + (
            "" if result["flip_detected"] else ", flip missed")
        engine.close()
        client.close()
    except BaseException as e:
        result.update(status="failed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=4))
        emit(work / "target.json", result)
        raise SystemExit(3)
    emit(work / "target.json", result)


def copy_gbps(tensors: dict[str, torch.Tensor], device: str, repeats: int = 3) -> float:
    """Median GB/s (bytes copied, each counted once) of copying every tensor into a fresh one."""
    copies = {name: torch.empty_like(t) for name, t in tensors.items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rates = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for name, t in tensors.items():
            copies[name].copy_(t)
        sync(device)
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])


# --- the orchestrator --------------------------------------------------------------------


def run_pair(args, url: str, protocol: str, mode: str, first: bool, timeout_s: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{protocol}-{mode}-"))
    common = [sys.executable, __file__, "--device", args.device, "--size-gb", str(args.size_gb), "--url", url,
              "--protocol", protocol, "--mode", mode, "--workdir", str(work), "--wait-s", str(args.wait_s)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if protocol in ("nvlink", "nvlink_intra") and args.nvlink_ipc:
        env["MC_USE_NVLINK_IPC"] = "1"  # Mooncake: CUDA IPC handles, not fabric handles (cuMemCreate only)
    logs = {role: open(work / f"{role}.log", "w") for role in ("seed", "target")}
    seed = subprocess.Popen(common + ["--role", "seed"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=logs["seed"], env=env)
    target = subprocess.Popen(common + ["--role", "target"] + (["--copy-ceiling"] if first else []),
                              stdout=subprocess.DEVNULL, stderr=logs["target"], env=env)
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
    out = {"protocol": protocol, "mode": mode, "note": note}
    for role in ("seed", "target"):
        path = work / f"{role}.json"
        out[role] = json.loads(path.read_text()) if path.exists() else {"status": "no result"}
        if out[role].get("status") not in ("ready", "ok"):
            print(f"--- {protocol}/{mode} {role}: {out[role].get('status')} {out[role].get('error', '')}")
            print(out[role].get("trace", ""))
            print(f"--- last lines of the {role}'s stderr ({work / (role + '.log')}):")
            print("\n".join((work / f"{role}.log").read_text(errors="replace").splitlines()[-25:]))
    return out


def summary(runs: list[dict]) -> None:
    print("\n=== summary ===")
    head = (f"{'run':20} {'status':12} {'GB':>6} {'pull s':>7} {'GB/s':>7} {'digests':>9} {'spot':>5} "
            f"{'seed regs':>9} {'reg ms':>7} {'allocs':>6} {'at base':>7} {'dig GB/s':>8} {'ver GB/s':>8}")
    print(head)
    for r in runs:
        s, t = r["seed"], r["target"]
        status = t.get("status", "?") if s.get("status") == "ready" else (
            f"seed {s['status']}" if s.get("status") else "not run")
        print(f"{r['protocol'] + '/' + r['mode']:20} {status:12} {t.get('bytes', 0) / 1e9:6.2f} "
              f"{t.get('pull_s', 0):7.3f} {t.get('pull_gbps', 0):7.2f} "
              f"{str(t.get('digests_ok', '-')) + '/' + str(t.get('digests_total', '-')):>9} "
              f"{t.get('spot_equal', '-'):>5} {s.get('registrations', '-'):>9} "
              f"{s.get('register_s', 0) * 1e3:7.1f} {s.get('allocations', '-'):>6} "
              f"{s.get('tensors_at_allocation_base', '-'):>7} {s.get('digest_gbps', 0):8.1f} "
              f"{t.get('verify_gbps', 0):8.1f}")
        for key in ("error",):
            for role, d in (("seed", s), ("target", t)):
                if d.get(key):
                    print(f"    {role} {key}: {d[key][:300]}")
        if t.get("bad"):
            off_base = set(s.get("not_at_base", ()))
            print(f"    {len(t['bad'])} wrong digest(s), {len(off_base & set(t['bad']))} of them on tensors that do "
                  f"not start at their allocation's base on the seed ({len(off_base)} such tensors in all); "
                  f"first: {', '.join(t['bad'][:6])}")
        if t.get("registrations") is not None:
            print(f"    target: {t['registrations']} registration(s) in {t.get('register_s', 0) * 1e3:.1f} ms, "
                  f"{t.get('reads')} reads; verified in the pull: {t.get('verified_in_pull')} tensors in "
                  f"{t.get('verify_in_pull_s', 0):.3f} s; a flipped byte caught: {t.get('flip_detected')}; "
                  f"spot-checked {', '.join(t.get('spot', []))}")
        if r["note"]:
            print(f"    note: {r['note']}")
        if t.get("copy_gbps"):
            print(f"    device copy of the same tensors (copy_ each, ceiling): {t['copy_gbps']:.2f} GB/s")
    seeds = [r["seed"] for r in runs if r["seed"].get("tensors")]
    if seeds:
        s = seeds[0]
        print(f"seed tensors: {s.get('tensors')}, {s.get('bytes', 0) / 1e9:.2f} GB in {s.get('storages')} storages "
              f"and {s.get('allocations')} allocations; digest algorithm {s.get('algorithm')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--size-gb", type=float, default=4.0)
    p.add_argument("--protocols", default="tcp,nvlink_intra")
    p.add_argument("--modes", default=",".join(MODES), help=f"registration modes, of {', '.join(MODES)}")
    p.add_argument("--no-nvlink-ipc", dest="nvlink_ipc", action="store_false",
                   help="leave MC_USE_NVLINK_IPC unset for nvlink (Mooncake then uses fabric handles "
                        "where the GPU supports them)")
    p.add_argument("--run-timeout-s", type=float, default=150.0, help="per seed+target pair")
    p.add_argument("--wait-s", type=float, default=120.0, help="how long the target waits for the seed")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="total time for all runs (0: no limit); runs that no longer fit are skipped, so the "
                        "summary always prints")
    p.add_argument("--role", choices=["main", "seed", "target"], default="main", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--protocol", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--copy-ceiling", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "seed":
        return run_seed(args)
    if args.role == "target":
        return run_target(args)

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
        for protocol in [x for x in args.protocols.split(",") if x]:
            for mode in [x for x in args.modes.split(",") if x]:
                print(f"\n>>> {protocol}/{mode}: {args.size_gb} GB", flush=True)
                start = time.monotonic()
                timeout_s = min(args.run_timeout_s, budget_end - start - _SEED_EXIT_S - 5)
                if timeout_s < 20:
                    print(f"<<< {protocol}/{mode} skipped: the --budget-s of {args.budget_s:g} s is spent")
                    runs.append({"protocol": protocol, "mode": mode, "note": "skipped (time budget)",
                                 "seed": {}, "target": {}})
                    continue
                try:
                    run = run_pair(args, server.address, protocol, mode, first=not runs, timeout_s=timeout_s)
                except Exception as e:  # a check script: report and go on to the next run
                    run = {"protocol": protocol, "mode": mode, "note": f"{type(e).__name__}: {e}",
                           "seed": {}, "target": {}}
                print(f"<<< {protocol}/{mode} done in {time.monotonic() - start:.1f} s: "
                      f"seed {run['seed'].get('status')}, target {run['target'].get('status')}", flush=True)
                runs.append(run)
    summary(runs)


if __name__ == "__main__":
    main()
