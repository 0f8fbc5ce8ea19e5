"""A fleet starting at once: 1 seed (or --seeds K) and N target processes pull the same weights (no SGLang).

    PYTHONPATH=. .venv/bin/python benchmarks/fleet.py --targets 8 --size-mb 256
    PYTHONPATH=. .venv/bin/python benchmarks/fleet.py --targets 8 --size-mb 256 --cascade --max-readers 2 --max-seeds 2
    sudo PYTHONPATH=. .venv/bin/python benchmarks/fleet.py --emulate [--rate-mb-s 4] [--plot DIR]
    sudo PYTHONPATH=. .venv/bin/python benchmarks/fleet.py --cleanup

A metadata server runs in this process; the seed and every target are processes
of their own (this script with `worker`), each with its own Mooncake engine on
127.0.0.1 over tcp. Targets build empty weights, wait for one "go" sent to all
at once, pull with verify=require, and print where their bytes came from and
when they finished (seconds after "go"). With --cascade a target publishes
itself READY as soon as its pull is verified, so later targets can read from
it. At the end every publisher prints its peak concurrent readers (its reader
leases). The last line is JSON (per-link GB/s); with --emulate, --summary writes the run for benchmarks/fleet_sim.py.

--emulate (root): every process on a host of its own (benchmarks/netem.py: a
network namespace each, behind one switch namespace that also runs the metadata
server, every link shaped to --rate-mb-s both ways, so the links and not this
machine's CPUs are the bottleneck), one run per mode:

- alone: 1 seed, 1 target: the reference time T1;
- one-seed: 1 seed, N targets, no cascade, no reader cap;
- store-and-forward: a target seeds (READY) once its whole pull is verified;
- pipelined: a target serves each tensor on as soon as it is verified (target.pipeline), and each
  chunk of a larger one (the seed's chunk digests, --chunk-kb: sglang_mx.chunks);
- all-links (not in the default --modes): every host pulls a copy from its neighbour
  at once, every link loaded both ways: the CPU cost of a full pipelined chain, for
  choosing --rate-mb-s.

The cascades cap readers per publisher at --max-readers (default 1: a chain or
tree with one child per link, since every NIC has the same rate). Each mode gets
a fresh metadata server and a model name of its own. Prints a table (time until
the last target is verified, its ratio to T1, CPU busy of the machine from
/proc/stat during the mode); the last line reads
`pipelined <x>x, store-and-forward <y>x, one seed <z>x one target alone`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import selectors
import signal
import statistics
import subprocess
import sys
import threading
import time
import zlib
from typing import Sequence

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDENTITY_NAME = "bench/fleet"
MODES = ("alone", "one-seed", "store-and-forward", "pipelined", "all-links")
DEFAULT_MODES = "alone,one-seed,store-and-forward,pipelined"
SERVER_PORT = 8001  # the metadata server's, on the switch namespace's bridge address
# Chosen by measurement on the 2-core dev VM: in the heaviest mode (pipelined, 16 links at once) the machine was
# 42-45% busy at 4 MB/s and 52-53% at 5. Most of it does not scale with the rate: each pulling process's main
# thread polls its reads every millisecond (transfer.engine.POLL_S).
DEFAULT_RATE_MB_S = 4.0


# --- one process: seed or target ----------------------------------------------------------------

def _weights(size_mb: int, *, filled: bool, count: int = 16) -> dict[str, torch.Tensor]:
    """`count` tensors of uneven sizes (shares 1..7), about `size_mb` MiB in all; content seeded by name."""
    shares = [1 + (i * 5) % 7 for i in range(count)]
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


class _Progress:
    """(time, bytes verified so far) samples of one pull, fed by pull_weights(on_verified=...)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._total = 0
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:  # from reading threads
        with self._lock:
            self._total += nbytes
            self.samples.append((time.time(), self._total))


def worker(args) -> None:
    from sglang_mx.client import MetadataClient
    from sglang_mx.records import SourceIdentity
    from sglang_mx.seed import SeedOptions, start_seed
    from sglang_mx.target import PullOptions, digest_verifier, pull_weights
    from sglang_mx.transfer.engine import MooncakeEngine
    from sglang_mx.transfer.tensors import describe

    def identity(name: str) -> SourceIdentity:
        return SourceIdentity(model_name=name, tensor_parallel_size=1, dtype="uint8")

    engine = MooncakeEngine.create(args.host, protocol="tcp")  # this host's own address (its namespace's)
    client = MetadataClient(args.url, timeout_s=10)
    seed_options = SeedOptions(ready=True, max_readers=args.max_readers, chunk_bytes=args.chunk_kb * 1024)
    publisher = None
    if args.role in ("seed", "ring"):  # a ring host seeds its own copy and pulls its neighbour's
        own = _weights(args.size_mb, filled=True, count=args.tensors)
        publisher = start_seed(own, engine, identity(args.model), client, worker_rank=0, worker_id=args.name,
                               options=seed_options)
        if args.retire_after:
            threading.Thread(target=_retire, args=(publisher, args.retire_after), daemon=True).start()
    if args.role == "seed":
        _say(name=args.name, event="ready")
    else:
        model = args.pull_model or args.model
        tensors = _weights(args.size_mb, filled=False, count=args.tensors)
        options = PullOptions(wait_timeout_s=args.wait_s, poll_interval_s=args.poll_s, verify="require",
                              max_seeds=args.max_seeds, keep_registered=args.cascade or args.pipelined)
        progress = _Progress()
        seed = None
        if args.pipelined:
            from dataclasses import replace

            from sglang_mx.target.pipeline import PipelineSeed

            # Publishes nothing until the pull has a source; on success the same worker is a READY full seed.
            seed = PipelineSeed(tensors, engine, identity(model), client, worker_rank=0, worker_id=args.name,
                                options=SeedOptions(max_readers=args.max_readers))
            options = replace(options, pipeline=True)
        _say(name=args.name, event="armed")
        sys.stdin.readline()  # "go"
        go = time.time()
        report = pull_weights(client, engine, identity(model), worker_rank=0, tensors=describe(tensors),
                              options=options, verifier=digest_verifier(tensors), pipeline=seed,
                              on_verified=progress)
        pulled = time.time()
        if seed is not None:
            publisher = seed.publisher
        elif args.cascade:
            publisher = start_seed(tensors, engine, identity(model), client, worker_rank=0, worker_id=args.name,
                                   options=seed_options, known_digests=report.digests)  # as SGLang's cascade
        samples = progress.samples
        _say(name=args.name, event="pulled", go=go, pulled=pulled, seeding=time.time() if publisher else None,
             served=report.served, bytes=report.bytes, transfer_s=report.seconds, verify_s=report.verify_seconds,
             failures=len(report.failures), samples=samples)
    sys.stdin.read()  # until the driver closes stdin
    peak = publisher.leases.peak if publisher and publisher.leases else 0
    granted = publisher.leases.granted if publisher and publisher.leases else 0
    refused = publisher.leases.refused if publisher and publisher.leases else 0
    _say(name=args.name, event="done", peak_readers=peak, leases=granted, refused=refused)
    if publisher:
        publisher.close()


def _worker_main(args) -> None:
    try:
        worker(args)
    except Exception as e:  # told to the driver, which names the process and stops the run
        _say(name=args.name, event="error", error=f"{type(e).__name__}: {e}")
        raise


# --- the driver ------------------------------------------------------------------------------------

def _worker_argv(name: str, role: str, args, **over) -> list[str]:
    v = {**vars(args), **over}
    argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "worker", "--role", role, "--name", name]
    for key in ("url", "host", "model", "pull_model", "size_mb", "tensors", "max_readers", "max_seeds", "wait_s",
                "poll_s", "retire_after", "chunk_kb"):
        if v.get(key) not in (None, ""):
            argv += [f"--{key.replace('_', '-')}", str(v[key])]
    return argv + [f"--{flag}" for flag in ("cascade", "pipelined") if v.get(flag)]


class _Proc:
    def __init__(self, name: str, argv: list[str], logs: str = "", log_name: str = "") -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_minloglevel="2")
        self.name = name
        self.log = open(os.devnull, "w") if not logs else open(f"{logs}/{log_name or name}.log", "w")
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
        said = json.loads(text)
        if said.get("event") == "error":
            raise RuntimeError(f"{self.name}: {said['error']}")
        return said

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def drive(args) -> dict:
    from sglang_mx.server import MetadataServer, ServerOptions

    server = MetadataServer(ServerOptions(host="127.0.0.1", port=0)).start()
    args.url = server.address
    procs: list[_Proc] = []
    try:
        seeds = [_Proc(name, _worker_argv(name, "seed", args), args.logs)
                 for name in (["seed"] if args.seeds == 1 else [f"seed{i + 1}" for i in range(args.seeds)])]
        procs += seeds
        for seed in seeds:
            seed.line(args.timeout_s)
        targets = [_Proc(f"t{i + 1}", _worker_argv(f"t{i + 1}", "target", args), args.logs)
                   for i in range(args.targets)]
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


# --- the emulated fleet (--emulate) --------------------------------------------------------------

class _CpuBusy:
    """The whole machine's CPU busy fraction (/proc/stat) over a window, its peak second, and the share
    of all CPUs that `pids` (this run's processes) used: the machine's figure counts whatever else runs."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._ours: list[tuple[int, float]] = []
        self._marks: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v) - v[3] - v[4], sum(v)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._marks.append(self._read())

    def _read_ours(self) -> tuple[int, float]:
        ticks = 0
        for pid in self._pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return ticks, time.monotonic()

    def __enter__(self) -> "_CpuBusy":
        self._ours.append(self._read_ours())
        self._marks.append(self._read())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._marks.append(self._read())
        self._ours.append(self._read_ours())

    @staticmethod
    def _busy(a, b) -> float:
        return (b[0] - a[0]) / max(b[1] - a[1], 1)

    @property
    def mean(self) -> float:
        return self._busy(self._marks[0], self._marks[-1])

    @property
    def ours(self) -> float:
        (t0, w0), (t1, w1) = self._ours[0], self._ours[-1]
        return (t1 - t0) / os.sysconf("SC_CLK_TCK") / max(w1 - w0, 1e-9) / os.cpu_count()

    @property
    def peak(self) -> float:
        return max(self._busy(a, b) for a, b in zip(self._marks, self._marks[1:]))


class _SwitchServer:
    """A metadata server (`sglang-mx server`) in the switch namespace, on the bridge's address."""

    def __init__(self, net, logs: str, mode: str) -> None:
        self.url = f"{net.switch_ip}:{SERVER_PORT}"
        # --allow-unauthenticated: the bridge is reachable only from this run's own namespaces.
        argv = net.switch_argv([sys.executable, "-m", "sglang_mx.cli", "server", "--host", net.switch_ip,
                                "--port", str(SERVER_PORT), "--allow-unauthenticated"])
        self._log = open(f"{logs}/server-{mode}.log", "w") if logs else None
        self._tail: list[str] = []
        self._listening = threading.Event()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._listening.wait(30):
            self.stop()
            raise RuntimeError("the metadata server in the switch namespace did not start: "
                               + " | ".join(self._tail[-5:]))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._tail = (self._tail + [line.rstrip()])[-20:]
            if self._log:
                self._log.write(line)
            if "metadata server listening on" in line:
                self._listening.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()


def _run_mode(net, mode: str, args) -> dict:
    """One mode on fresh processes and a fresh metadata server: go, wait for every target, measure."""
    n = 1 if mode == "alone" else args.targets
    t1_est = args.size_mb * 1.048576 / args.rate_mb_s
    timeout_s = 60 + 3 * n * t1_est
    common = dict(model=f"{IDENTITY_NAME}/{mode}", size_mb=args.size_mb, tensors=args.tensors, max_seeds=1,
                  chunk_kb=args.chunk_kb,
                  wait_s=timeout_s, poll_s=args.poll_s, retire_after=0,
                  max_readers=args.max_readers if mode in ("store-and-forward", "pipelined") else 0,
                  cascade=mode == "store-and-forward", pipelined=mode == "pipelined")
    server = _SwitchServer(net, args.logs, mode)
    procs: list[_Proc] = []
    try:
        common["url"] = server.url

        def proc(name: str, role: str, host: int, **over) -> _Proc:
            argv = _worker_argv(name, role, argparse.Namespace(), host=net.hosts[host].ip, **{**common, **over})
            p = _Proc(name, net.exec_argv(host, argv), args.logs, log_name=f"{mode}-{name}")
            procs.append(p)
            return p

        if mode == "all-links":  # host i seeds copy i and pulls copy i-1: every link busy both ways
            hosts = len(net.hosts)
            targets = [proc(f"h{i}", "ring", i, model=f"{common['model']}/{i}",
                            pull_model=f"{common['model']}/{(i - 1) % hosts}") for i in range(hosts)]
        else:
            proc("seed", "seed", 0).line(timeout_s)
            targets = [proc(f"t{i}", "target", i) for i in range(1, n + 1)]
        for t in targets:
            t.line(timeout_s)  # armed
        before = net.link_bytes()
        with _CpuBusy([p.proc.pid for p in procs] + [server.proc.pid]) as cpu:
            go = time.time()
            for t in targets:
                t.go()
            results = [t.line(timeout_s) for t in targets]
        after = net.link_bytes()
        for p in procs:
            p.proc.stdin.close()
        stats = {p.name: p.line(30) for p in procs}
    finally:
        for p in procs:
            p.kill()
        server.stop()
    done = sorted(r["pulled"] - go for r in results)
    moved = {h: (after[h][0] - before[h][0], after[h][1] - before[h][1]) for h in after}
    return {
        "mode": mode, "targets": len(results), "last_s": done[-1], "median_s": statistics.median(done),
        "cpu_mean": cpu.mean, "cpu_peak": cpu.peak, "cpu_ours": cpu.ours, "seed_up_mb_s": moved[0][0] / 1e6 / done[-1],
        "sum_down_mb_s": sum(d for _, d in moved.values()) / 1e6 / done[-1],
        "samples": {r["name"]: [(t - go, b) for t, b in r["samples"]] for r in results},
        "sources": {r["name"]: sorted(r["served"]) for r in results},
        "peak_readers": {name: s["peak_readers"] for name, s in stats.items()},
    }


def _steady_mb_s(samples: list) -> float:
    """Payload MB/s of one pull between its first and last verified sample (handshakes left out)."""
    (t0, b0), (t1, b1) = samples[0], samples[-1]
    return (b1 - b0) / 1e6 / (t1 - t0) if t1 > t0 else float("nan")


def chain_depth(sources: dict[str, list[str]]) -> int:
    """The deepest target's hops from the seed, following each target's first source ("seed": the root)."""
    def depth(name: str, seen: frozenset = frozenset()) -> int:
        parent = (sources.get(name) or ["seed"])[0]
        return 1 if parent == "seed" or parent in seen else 1 + depth(parent, seen | {name})
    return max((depth(t) for t in sources), default=0)


def granularity_bound(sizes: Sequence[int], hops: int) -> float:
    """The least time a pipelined chain of `hops` equal links can take to fill its last target, as a
    multiple of one link moving every tensor, when each target forwards a tensor only once it has
    all of it (verified): a proportionate flow shop, whose makespan is sum + (hops - 1) x largest
    whatever the order. Tensors smaller against the model, or a shallower tree, bring it to 1."""
    total = sum(sizes)
    return 1.0 + max(hops - 1, 0) * max(sizes, default=0) / total if total else 1.0


def _ratio(runs: dict, mode: str) -> str:
    if mode not in runs or "alone" not in runs:
        return "n/a"
    return f"{runs[mode]['last_s'] / runs['alone']['last_s']:.2f}x"


def _plot(runs: dict, args) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(runs)
    cols = 1 if len(modes) == 1 else 2
    rows = -(-len(modes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(modes):]:
        ax.set_visible(False)
    t1 = runs["alone"]["last_s"] if "alone" in runs else None
    size_mb = sum(_weights_sizes(args)) / 1e6
    for ax, mode in zip(axes.flat, modes):
        run = runs[mode]
        names = sorted(run["samples"], key=lambda s: int(s.lstrip("th")))
        cmap = plt.get_cmap("viridis", max(len(names), 2))
        for i, name in enumerate(names):
            pts = [(0.0, 0)] + [tuple(p) for p in run["samples"][name]]
            ax.plot([t for t, _ in pts], [b / 1e6 for _, b in pts], color=cmap(i), lw=1.2, label=name,
                    drawstyle="steps-post")
        if t1 is not None:
            ax.axvline(t1, color="grey", ls="--", lw=0.8, label=f"T1 (alone) {t1:.1f} s")
        ax.axhline(size_mb, color="black", ls=":", lw=0.6)
        ax.set_title(f"{mode}: last {run['last_s']:.1f} s ({_ratio(runs, mode)} alone)\n"
                     f"CPU busy {run['cpu_mean']:.0%} (peak {run['cpu_peak']:.0%}, this run {run['cpu_ours']:.0%})",
                     fontsize=9)
        ax.set_xlabel("seconds since go")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("MB verified (per target)")
    widest = max(modes, key=lambda m: len(runs[m]["samples"]))
    axes.flat[modes.index(widest)].legend(fontsize=6, ncol=2, loc="lower right")
    fig.suptitle(f"emulated fleet: 1 seed + {args.targets} targets, {size_mb:.0f} MB in {args.tensors} tensors, "
                 f"every link {args.rate_mb_s:g} MB/s both ways, max_readers {args.max_readers} (cascades)",
                 fontsize=10)
    fig.tight_layout()
    out = pathlib.Path(args.plot)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fleet-emulated.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _weights_sizes(args) -> list[int]:
    shares = [1 + (i * 5) % 7 for i in range(args.tensors)]
    unit = args.size_mb * 1024 * 1024 / sum(shares)
    return [int(unit * s) // 64 * 64 for s in shares]


def _unit_sizes(args) -> list[int]:
    """What a pipelined target verifies and serves on, one at a time: each tensor, or each chunk of a larger one."""
    from sglang_mx.chunks import spans

    chunk = args.chunk_kb * 1024
    return [n for size in _weights_sizes(args) for _, n in (spans(size, chunk) if 0 < chunk < size else [(0, size)])]


def _netem():
    """benchmarks/netem.py, imported as a sibling module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import netem

    return netem


def emulate(args) -> tuple[dict[str, dict], list[str]]:
    """Every mode of `args.modes` on one emulated network: (the runs by mode, the modes that failed).
    A mode that fails is said why and left out; the others still run."""
    netem = _netem()
    netem.require_root()
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"fleet: unknown mode(s) {', '.join(unknown)}; allowed: {', '.join(MODES)}")
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)

    def _terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)  # cleaned up like Ctrl-C
    runs: dict[str, dict] = {}
    failed: list[str] = []
    start = time.time()
    with netem.Netem(1 + args.targets, args.rate_mb_s) as net:
        print(f"emulated: {len(net.hosts)} hosts ({net.prefix}h0..), switch {net.switch_ns} {net.switch_ip}, "
              f"every link {args.rate_mb_s:g} MB/s both ways; {args.size_mb} MiB in {args.tensors} tensors, chunk "
              f"digests every {args.chunk_kb} KiB",
              flush=True)
        for mode in modes:
            try:
                runs[mode] = run = _run_mode(net, mode, args)
            except (RuntimeError, TimeoutError) as e:
                failed.append(mode)
                print(f"  {mode}: FAILED: {e}", flush=True)
                continue
            print(f"  {mode}: last target verified at {run['last_s']:.2f} s, CPU busy {run['cpu_mean']:.0%} "
                  f"(this run's processes {run['cpu_ours']:.0%})", flush=True)
    print(f"\n{'mode':<18} {'last s':>7} {'x alone':>8} {'median s':>8} {'CPU %':>6} {'peak %':>6} {'ours %':>6} "
          f"{'seed up MB/s':>12} {'sum MB/s':>8}")
    for mode, r in runs.items():
        print(f"{mode:<18} {r['last_s']:7.2f} {_ratio(runs, mode):>8} {r['median_s']:8.2f} "
              f"{r['cpu_mean'] * 100:6.0f} {r['cpu_peak'] * 100:6.0f} {r['cpu_ours'] * 100:6.0f} "
              f"{r['seed_up_mb_s']:12.2f} {r['sum_down_mb_s']:8.2f}")
    for mode, r in runs.items():
        steady = [_steady_mb_s(s) for s in r["samples"].values() if len(s) > 1]
        if steady:
            print(f"{mode}: per-target payload rate while pulling, median {statistics.median(steady):.2f} MB/s "
                  f"(set {args.rate_mb_s:g} MB/s per link); sources " + ", ".join(
                      f"{t}<-{'+'.join(s)}" for t, s in sorted(r["sources"].items(),
                                                                key=lambda x: int(x[0].lstrip("th")))))
    if "pipelined" in runs:
        sizes, hops = _unit_sizes(args), chain_depth(runs["pipelined"]["sources"])
        runs["pipelined"]["bound"] = bound = granularity_bound(sizes, hops)
        print(f"pipelined: {hops} hops deep; a target forwards a tensor (or a chunk of {args.chunk_kb} KiB) only once "
              f"it is verified, so with the largest unit {max(sizes) / 1e6:.2f} of {sum(sizes) / 1e6:.1f} MB no chain "
              f"this deep can beat {bound:.2f}x alone (sum + (hops - 1) x largest)")
    if args.plot and runs:
        print(f"plot: {_plot(runs, args)}")
    if args.summary:
        _write_summary(args.summary, runs, args)
    print(f"all modes in {time.time() - start:.0f} s")
    print(f"pipelined {_ratio(runs, 'pipelined')}, store-and-forward {_ratio(runs, 'store-and-forward')}, "
          f"one seed {_ratio(runs, 'one-seed')} one target alone")
    return runs, failed


def _write_summary(path: str, runs: dict[str, dict], args) -> None:
    """The run for benchmarks/fleet_sim.py --emulated-json: its parameters and each mode's last verified time."""
    with open(path, "w") as f:
        json.dump({"rate_mb_s": args.rate_mb_s, "size_mb": args.size_mb, "tensors": args.tensors,
                   "chunk_kb": args.chunk_kb,
                   "targets": args.targets, "max_readers": args.max_readers, "poll_s": args.poll_s, "watch": True,
                   "measured": {mode: round(r["last_s"], 3) for mode, r in runs.items()},
                   **({"pipelined_bound": round(runs["pipelined"]["bound"], 3)} if "bound" in runs.get("pipelined", {})
                      else {})}, f, indent=1)
    print(f"summary: {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--role", choices=("seed", "target", "ring"), required=True)
    w.add_argument("--name", required=True)
    w.add_argument("--url", required=True)
    w.add_argument("--host", default="127.0.0.1", help="the address this process's Mooncake engine advertises")
    w.add_argument("--model", default=IDENTITY_NAME)
    w.add_argument("--pull-model", default="", help="ring: the model to pull (the neighbour's)")
    w.add_argument("--poll-s", type=float, default=0.05)
    w.add_argument("--pipelined", action="store_true")
    w.add_argument("--retire-after", type=int, default=0)
    for q in (p, w):
        q.add_argument("--size-mb", type=int, default=None, help="default 256 (64 with --emulate)")
        q.add_argument("--tensors", type=int, default=None, help="default 16 (64 with --emulate)")
        q.add_argument("--max-readers", type=int, default=None,
                       help="per publisher; 0: no cap (default 0; with --emulate 1, for the cascades)")
        q.add_argument("--max-seeds", type=int, default=1, help="stripes per target")
        q.add_argument("--cascade", action="store_true", help="a target seeds as soon as its pull is verified")
        q.add_argument("--wait-s", type=float, default=60.0)
        q.add_argument("--chunk-kb", type=int, default=None,
                       help="the seed's chunk digests (SeedOptions.chunk_bytes), KiB: a pipelined target serves a "
                            "larger tensor on chunk by chunk; 0: whole tensors only (default: the model's size / 128, "
                            "as 64 MiB is to a TP 8 rank of a 70B model)")
    p.add_argument("--targets", type=int, default=None, help="default 8 (16 with --emulate)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--retire-after", type=int, default=0,
                   help="each seed withdraws (STALE) after serving this many targets (0: never)")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--logs", default="", help="a folder for each process's log")
    e = p.add_argument_group("emulated hosts (root; benchmarks/netem.py)")
    e.add_argument("--emulate", action="store_true", help="every process on a host (network namespace) of its own")
    e.add_argument("--rate-mb-s", type=float, default=DEFAULT_RATE_MB_S,
                   help=f"every link's rate, each way, MB/s (default {DEFAULT_RATE_MB_S:g})")
    e.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, of {', '.join(MODES)} "
                                                          f"(default {DEFAULT_MODES})")
    e.add_argument("--poll-s", type=float, default=None,
                   help="a waiting target's poll interval, s (default 0.05; 0.1 with --emulate)")
    e.add_argument("--plot", metavar="DIR", help="write DIR/fleet-emulated.png (matplotlib)")
    e.add_argument("--summary", metavar="FILE", help="write the run as JSON, for benchmarks/fleet_sim.py --emulated-json")
    e.add_argument("--cleanup", action="store_true", help="delete what a crashed --emulate run left, and exit")
    args = p.parse_args(argv)
    emulated = args.cmd != "worker" and args.emulate
    for key, plain, emu in (("size_mb", 256, 64), ("tensors", 16, 64), ("max_readers", 0, 1), ("targets", 8, 16),
                            ("poll_s", None, 0.1)):
        if getattr(args, key, 0) is None:
            setattr(args, key, emu if emulated else plain)
    if args.chunk_kb is None:
        args.chunk_kb = args.size_mb * 1024 // 128
    if args.chunk_kb < 0 or args.chunk_kb % 4:
        p.error(f"--chunk-kb {args.chunk_kb}: allowed 0 or a positive multiple of 4 (chunks of whole 4 KiB pages)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cmd == "worker":
        _worker_main(args)
    elif args.cleanup or args.emulate:
        netem = _netem()
        try:
            if args.emulate:
                _, failed = emulate(args)
                sys.exit(1 if failed else 0)
            netem.require_root()
            gone = netem.cleanup()
            print(f"fleet: deleted {len(gone)} namespace(s) of crashed runs{': ' + ', '.join(gone) if gone else ''}")
        except netem.NetemError as e:
            raise SystemExit(f"fleet: {e}") from None
    else:
        drive(args)


if __name__ == "__main__":
    main()
