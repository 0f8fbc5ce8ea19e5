"""Load on ONE metadata server: many targets looking up a big record while seeds heartbeat.

    .venv/bin/python benchmarks/metadata_load.py [--clients 200] [--publishers 50] [--tensors 10000] \\
        [--seconds 15] [--stores memory,redis] [--modes load,burst,cpu] [--burst 200] [--repeats 3] \\
        [--server-root DIR] [--server-args ARGS] [--no-pin]

For each store it starts `sglang-mx server` (and, for redis, a redis-server of its own in a
temporary directory) on free ports of 127.0.0.1, publishes `--publishers` READY workers of one
identity with `--tensors` tensors each (ranks 0-7), then for `--seconds` runs, in this process:

- `--clients` targets (grpc.aio, one channel each), each looping: ListSources(identity, READY,
  its rank), then GetMetadata of the first worker listed (the whole tensor list), as a target does;
- one heartbeat loop per published worker: UpdateStatus READY every `--heartbeat-interval` s.

Modes (`--modes`, default all three):

- load: the steady loop above; requests/s and p50/p99 latency per RPC and store, and the
  ListSources latency of a PROBE: one more target in a process of its own, listing every
  20 ms (the load generator's own event loop, busy with 200 targets, adds its delays to
  the latencies it measures; the probe's do not have them).
- burst: `--burst` targets start at once (a fresh connection each), each doing what a starting
  target does for its rank (ListSources, then GetMetadata of the first worker listed); the time
  until the LAST one holds its metadata, the median of `--repeats` bursts.

GetMetadata answers are taken as bytes and decoded by sample (load) or after the clock stops
(burst): one Python process plays all the targets, and decoding hundreds of 1 MB answers on its
event loop would measure this process, not the server.
- cpu: the server process's CPU time (user + system, from /proc) per call, over 200 sequential
  GetMetadata calls of one big record, then 200 ListSources calls: what one call costs the
  server, independent of queueing.
- watch (not in the default modes): `--watchers` open WatchSources streams (progress on), spread
  over the 8 ranks of one source and over `--watch-procs` client processes of `--watch-channels`
  connections each, while `--writers` pulling targets (INITIALIZING records, ranks 0-7) each send
  `--write-rate` UpdateStatus a second, in turn: progress (new verified bytes), a plain heartbeat
  (no event), a load change. For `--duration-s`: server CPU (/proc), events delivered per second,
  p50/p99 from a write to its delivery (each write's verified bytes are its wall-clock time in us),
  the server's RSS with the streams open (and before them), its idle CPU with them open, and how
  long opening them all took.
- poll (not in the default modes): the same clients and writers, but each client lists its rank
  (ListSources) once a second instead of watching; "latency" is then from a write to the first
  listing that shows it.

    .venv/bin/python benchmarks/metadata_load.py --modes watch,poll --stores memory,redis \\
        [--watchers 8000] [--watch-procs 4] [--watch-channels 16] [--writers 16] [--write-rate 1] \\
        [--duration-s 20]

`--server-root DIR` runs the server from another checkout (for a baseline: a git worktree of
an older commit); the load generator is always this one.

Placement (`--pin`, the default): the server and its redis-server run on the last CPU this
process may use, the load generator and the probe on the others, as if the server had a
machine of its own and the targets were elsewhere; unpinned, the load generator (which needs
about as much CPU as the server to play 200 targets) takes the server's CPU, and what is
measured is partly the scheduler. On a small machine the numbers are a lower bound either way.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import pathlib
import shlex
import shutil
import socket
import statistics
import random
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_mx import wire  # noqa: E402
from sglang_mx.client import MetadataClient  # noqa: E402
from sglang_mx.records import (BackendFramework, SourceIdentity, SourceStatus, TensorDescriptor,  # noqa: E402
                             WorkerRecord)

pb = wire.messages
RANKS = 8
MESSAGE_LIMIT = 256 * 1024 * 1024
IDENTITY = SourceIdentity(mx_version="0.7.0", model_name="bench/Big-MoE", backend_framework=BackendFramework.SGLANG,
                          tensor_parallel_size=RANKS, pipeline_parallel_size=1, expert_parallel_size=RANKS,
                          dtype="bfloat16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(address: str, proc: subprocess.Popen, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME), timeout=0.5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} on {address} not SERVING after {timeout_s} s")
            time.sleep(0.05)


class Processes:
    """The server (and redis-server) of one store; stops them on exit."""

    def __init__(self, store: str, workdir: pathlib.Path, server_root: pathlib.Path = ROOT,
                 server_args: tuple[str, ...] = (), server_cpus: set[int] | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.workdir = workdir
        # The server's side (sglang-mx server, redis-server) on `server_cpus` from its first instruction.
        pin = ["taskset", "-c", ",".join(map(str, sorted(server_cpus)))] if server_cpus else []
        args = []
        if store == "redis":
            redis_server = shutil.which("redis-server")
            if redis_server is None:
                raise SystemExit("redis-server is not installed (apt-get install redis-server)")
            port = _free_port()
            self.procs.append(subprocess.Popen(
                [*pin, redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                 "--appendonly", "no", "--maxmemory-policy", "noeviction"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            args = ["--store", "redis", "--redis-url", f"redis://127.0.0.1:{port}/0", "--redis-prefix", "bench:"]
            deadline = time.monotonic() + 15
            while True:  # redis-server answers quickly; a connect is enough
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start")
                    time.sleep(0.05)
        self.port = _free_port()
        self.log = open(workdir / f"server-{store}.log", "w")
        server = subprocess.Popen(
            [*pin, sys.executable, "-m", "sglang_mx.cli", "--log-level", "WARNING", "server", "--host", "127.0.0.1",
             "--port", str(self.port), *args, *server_args],
            cwd=server_root, stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(server_root)))
        self.procs.append(server)
        _wait_serving(self.address, server, f"sglang-mx server --store {store}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.log.close()


def _worker(rank: int, index: int, n_tensors: int) -> WorkerRecord:
    base = 0x7F00_0000_0000 + index * 2**36
    return WorkerRecord(
        worker_rank=rank, transfer_engine_session_id=f"10.0.{index // 256}.{index % 256}:15000",
        status=SourceStatus.READY, accelerator="cuda",
        tensors=tuple(TensorDescriptor(name=f"model.layers.{i // 64}.mlp.experts.{i % 64}.w{i % 3}.weight",
                                       addr=base + i * 2**20, size=2**20, dtype="bfloat16")
                      for i in range(n_tensors)),
    )


def publish(address: str, publishers: int, n_tensors: int) -> tuple[str, list[tuple[str, int]]]:
    workers = []
    with MetadataClient(address, timeout_s=60) as client:
        for i in range(publishers):
            worker_id = f"seed-{i}-rank{i % RANKS}"
            source = client.publish(IDENTITY, _worker(i % RANKS, i, n_tensors), worker_id)
            workers.append((worker_id, i % RANKS))
    return source, workers


async def run_load(address: str, source: str, workers: list[tuple[str, int]], *, clients: int, seconds: float,
                   heartbeat_interval_s: float, expect_tensors: int) -> dict[str, dict]:
    latencies: dict[str, list[float]] = {"ListSources": [], "GetMetadata": [], "UpdateStatus": []}
    in_window: dict[str, int] = {k: 0 for k in latencies}  # completed before the load stopped
    errors: dict[str, int] = {k: 0 for k in latencies}
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT),
               ("grpc.use_local_subchannel_pool", 1)]  # one connection per channel, like separate targets
    stop_at = time.monotonic() + seconds

    async def timed(kind: str, call):
        start = time.perf_counter()
        try:
            response = await call
        except grpc.aio.AioRpcError:
            errors[kind] += 1
            return None
        latencies[kind].append(time.perf_counter() - start)
        in_window[kind] += time.monotonic() < stop_at
        return response

    async def target(i: int) -> None:
        rank = i % RANKS
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = wire.P2pServiceStub(channel)
            get_raw = _raw_get(channel)
            request = pb.ListSourcesRequest(identity=wire.identity_to_pb(IDENTITY), status_filter=pb.SOURCE_STATUS_READY,
                                            worker_rank_filter=rank)
            calls = 0
            while time.monotonic() < stop_at:
                listed = await timed("ListSources", stub.ListSources(request, timeout=60))
                if not listed or not listed.instances:
                    errors["ListSources"] += listed is not None
                    continue
                ref = listed.instances[0]
                got = await timed("GetMetadata", get_raw(
                    pb.GetMetadataRequest(mx_source_id=ref.mx_source_id, worker_id=ref.worker_id), timeout=60))
                calls += 1
                if got is not None and not _check(got, expect_tensors, full=calls % 20 == 1):
                    errors["GetMetadata"] += 1

    async def seed(worker_id: str, rank: int, channel) -> None:
        stub = wire.P2pServiceStub(channel)
        request = pb.UpdateStatusRequest(mx_source_id=source, worker_id=worker_id, worker_rank=rank,
                                         status=pb.SOURCE_STATUS_READY)
        await asyncio.sleep(heartbeat_interval_s * (hash(worker_id) % 1000) / 1000)  # spread the beats
        while time.monotonic() < stop_at:
            beat = await timed("UpdateStatus", stub.UpdateStatus(request, timeout=60))
            if beat is not None and not beat.success:
                errors["UpdateStatus"] += 1
            await asyncio.sleep(heartbeat_interval_s)

    async with grpc.aio.insecure_channel(address, options=options) as seed_channel:
        await asyncio.gather(*(target(i) for i in range(clients)),
                             *(seed(wid, rank, seed_channel) for wid, rank in workers))
    # Rates count calls completed within the window; latencies include the calls that
    # were still queued when it closed.
    return {kind: {"calls": len(lat), "rate": in_window[kind] / seconds, "errors": errors[kind], "latencies": lat}
            for kind, lat in latencies.items()}


def _raw_get(channel):
    """GetMetadata answering the response's bytes: this one process plays hundreds of targets, and
    decoding every answer here would measure this process instead of the server (`_check` decodes
    a sample)."""
    return channel.unary_unary(f"/{wire.SERVICE_NAME}/GetMetadata",
                               request_serializer=pb.GetMetadataRequest.SerializeToString)


_checked_sizes: set[int] = set()


def _check(response: bytes, expect_tensors: int, *, full: bool) -> bool:
    """Whether a GetMetadata answer holds the whole record: decoded when `full` (and for every size
    not seen decoded before), otherwise compared by size with answers decoded before."""
    if full or len(response) not in _checked_sizes:
        got = pb.GetMetadataResponse.FromString(response)
        if not got.found or len(got.worker.tensor_source.tensors) != expect_tensors:
            return False
        _checked_sizes.add(len(response))
    return True


async def run_burst(address: str, *, targets: int, expect_tensors: int) -> dict:
    """`targets` starting targets at once; seconds until each holds its rank's metadata (its bytes:
    each is decoded and checked after the clock stops, as every target would on its own machine)."""
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.use_local_subchannel_pool", 1)]
    start = time.perf_counter()

    async def target(i: int) -> float | None:
        rank = i % RANKS
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = wire.P2pServiceStub(channel)
            try:
                listed = await stub.ListSources(pb.ListSourcesRequest(
                    identity=wire.identity_to_pb(IDENTITY), status_filter=pb.SOURCE_STATUS_READY,
                    worker_rank_filter=rank), timeout=120)
                if not listed.instances:
                    return None
                ref = listed.instances[0]
                got = await _raw_get(channel)(pb.GetMetadataRequest(mx_source_id=ref.mx_source_id,
                                                                    worker_id=ref.worker_id), timeout=120)
            except grpc.aio.AioRpcError:
                return None
            return time.perf_counter() - start, got

    done = await asyncio.gather(*(target(i) for i in range(targets)))
    ok = [d[0] for d in done if d is not None and _check(d[1], expect_tensors, full=True)]
    return {"last": max(ok) if ok else float("nan"), "p50": statistics.median(ok) if ok else float("nan"),
            "errors": len(done) - len(ok)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_per_call(address: str, pid: int, source: str, worker_id: str, calls: int = 200) -> dict[str, float]:
    """Server CPU ms per call: `calls` sequential GetMetadata, then `calls` ListSources."""
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT)]
    out = {}
    with grpc.insecure_channel(address, options=options) as channel:
        stub = wire.P2pServiceStub(channel)
        get = pb.GetMetadataRequest(mx_source_id=source, worker_id=worker_id)
        listing = pb.ListSourcesRequest(identity=wire.identity_to_pb(IDENTITY), status_filter=pb.SOURCE_STATUS_READY,
                                        worker_rank_filter=0)
        for name, method, request in (("GetMetadata", stub.GetMetadata, get), ("ListSources", stub.ListSources,
                                                                                 listing)):
            for _ in range(5):  # warm up
                method(request, timeout=60)
            before = _cpu_seconds(pid)
            for _ in range(calls):
                method(request, timeout=60)
            out[name] = (_cpu_seconds(pid) - before) / calls * 1000
    return out


def _probe(address: str, seconds: float) -> None:
    """`--probe`: ListSources every 20 ms for `seconds`; prints the latencies (s) as one JSON list."""

    lat = []
    with grpc.insecure_channel(address) as channel:
        stub = wire.P2pServiceStub(channel)
        request = pb.ListSourcesRequest(identity=wire.identity_to_pb(IDENTITY), status_filter=pb.SOURCE_STATUS_READY,
                                        worker_rank_filter=1)
        stub.ListSources(request, timeout=60)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            stub.ListSources(request, timeout=60)
            lat.append(time.perf_counter() - start)
            time.sleep(0.02)
    print(json.dumps(lat))


def _start_probe(address: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--probe", address, "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _place(pin: bool) -> tuple[set[int] | None, str]:
    """With `pin`, the CPUs the server's side gets (the last one this process may use; the rest
    are this process's and the probe's from now on), and a line saying where everything runs."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin:
        return None, f"placement: server, Redis, load generator and probe share {len(cpus) or os.cpu_count()} CPUs"
    taskset = shutil.which("taskset")
    if len(cpus) < 2 or taskset is None:
        return None, (f"placement: NOT pinned ({len(cpus)} CPU(s), taskset {'found' if taskset else 'missing'}); "
                      "server, Redis, load generator and probe share the CPUs")
    server, clients = {cpus[-1]}, set(cpus[:-1])
    os.sched_setaffinity(0, clients)  # before any channel: grpc's threads and the probe inherit it
    return server, (f"placement: server and redis-server on CPU {cpus[-1]}; load generator and probe on CPU(s) "
                    f"{','.join(map(str, sorted(clients)))} (--no-pin: all share)")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# --- watch: thousands of open WatchSources streams, against as many pollers -----------------------------

TOPOLOGY_VERIFIED = "mx_verified_bytes"
SAMPLES_PER_PROC = 20_000  # latencies each client process reports (a random sample of its own)
OPEN_TIMEOUT_S = 120  # for every client of a process to have its snapshot (or first listing)


def publish_pulling(address: str, writers: int) -> tuple[str, list[tuple[str, int]]]:
    """A READY seed per rank and `writers` pulling targets (INITIALIZING, ranks 0-7 in turn)."""
    targets = []
    with MetadataClient(address, timeout_s=60) as client:
        for rank in range(RANKS):
            source = client.publish(IDENTITY, _worker(rank, rank, 8), f"seed-rank{rank}")
        for i in range(writers):
            worker = dataclasses.replace(_worker(i % RANKS, RANKS + i, 8), status=SourceStatus.INITIALIZING)
            client.publish(IDENTITY, worker, f"pull-{i}-rank{i % RANKS}")
            targets.append((f"pull-{i}-rank{i % RANKS}", i % RANKS))
    return source, targets


def run_writer(address: str, source: str, target: tuple[str, int], *, rate: float, offset_s: float,
               stop: threading.Event, counts: collections.Counter) -> None:
    """One pulling target: `rate` UpdateStatus a second, in turn progress, heartbeat, load (a thread each, as
    each target is a process of its own: one slow answer does not hold up the others' writes)."""
    worker_id, rank = target
    kinds = ("progress", "heartbeat", "load")
    with MetadataClient(address, timeout_s=30) as client:
        start = time.monotonic() + offset_s
        for tick in range(10**9):
            if stop.wait(max(start + tick / rate - time.monotonic(), 0)):
                return
            kind = kinds[tick % 3]
            try:
                if kind == "heartbeat":
                    client.update_status(source, worker_id, rank, SourceStatus.INITIALIZING)
                else:
                    load = float(tick % 8) if kind == "load" else None
                    client.update_status(source, worker_id, rank, SourceStatus.INITIALIZING, source_load=load,
                                         verified_bytes=time.time_ns() // 1000)
                counts[kind] += 1
            except Exception as e:  # noqa: BLE001 - a benchmark counts failures instead of stopping
                counts[f"error {type(e).__name__}"] += 1


async def _clients(address: str, *, streams: int, channels: int, first: int, poll: bool, source: str) -> dict:
    """`streams` clients (rank = index % 8) watching (or polling every second) until told to stop."""
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    state = {"events": 0, "calls": 0, "window": None}
    ready: set[int] = set()  # clients that have their snapshot (or first listing)
    errors: collections.Counter = collections.Counter()
    latencies: list[float] = []
    all_ready = asyncio.Event()

    def seen(verified: str | None) -> None:
        window = state["window"]
        if verified is None or window is None or not window[0] <= time.time() < window[1]:
            return
        state["events"] += 1
        latencies.append(time.time() - int(verified) / 1e6)

    def is_ready(i: int) -> None:
        ready.add(i)
        if len(ready) == streams:
            all_ready.set()

    async def watch(i: int) -> None:
        stub = wire.MxWatchServiceStub(chans[i % channels])
        request = pb.MxWatchSourcesRequest(mx_source_id=source, worker_rank=(first + i) % RANKS, progress=True)
        delay = 0.2
        while True:  # as sglang_mx.client.SourceWatch: a refused or broken stream is opened again, with backoff
            try:
                async for event in stub.WatchSources(request):
                    if event.snapshot_end:
                        is_ready(i)
                    elif event.HasField("source"):
                        seen(event.source.topology.get(TOPOLOGY_VERIFIED))
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def poll_(i: int) -> None:
        stub = wire.P2pServiceStub(chans[i % channels])
        request = pb.ListSourcesRequest(identity=wire.identity_to_pb(IDENTITY), worker_rank_filter=(first + i) % RANKS)
        last: dict[str, str] = {}
        await asyncio.sleep(random.random())  # spread the pollers over the second
        while True:
            started = time.monotonic()
            try:
                listed = await stub.ListSources(request, timeout=30)
                window = state["window"]
                state["calls"] += window is not None and window[0] <= time.time() < window[1]
                for ref in listed.instances:
                    verified = ref.topology.get(TOPOLOGY_VERIFIED)
                    if ref.worker_id in last and verified != last[ref.worker_id]:
                        seen(verified)
                    last[ref.worker_id] = verified
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1
            if last:
                is_ready(i)
            await asyncio.sleep(max(1.0 - (time.monotonic() - started), 0))

    tasks = [asyncio.create_task((poll_ if poll else watch)(i)) for i in range(streams)]
    try:
        await asyncio.wait_for(all_ready.wait(), OPEN_TIMEOUT_S)
    except asyncio.TimeoutError:
        print(f"only {len(ready)} of {streams} ready after {OPEN_TIMEOUT_S} s; errors {dict(errors)}", flush=True)
        os._exit(1)
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start, end = (float(x) for x in line.split())
    state["window"] = (start, end)
    await asyncio.sleep(max(end - time.time(), 0) + 0.5)  # deliveries of the last writes
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"events": state["events"], "calls": state["calls"], "errors": dict(errors),
            "latencies": random.sample(latencies, min(len(latencies), SAMPLES_PER_PROC))}


def _rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_watch(address: str, server_pid: int, *, poll: bool, args) -> dict:
    """One watch (or poll) run: clients in `--watch-procs` processes, writers in this one."""
    source, targets = publish_pulling(address, args.writers)
    rss_before = _rss_mb(server_pid)
    per_proc = args.watchers // args.watch_procs
    opened = time.monotonic()
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--watch-client", address, "--streams", str(per_proc), "--first", str(i * per_proc),
         "--watch-channels", str(args.watch_channels), "--source", source] + (["--poll"] if poll else []),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        for i in range(args.watch_procs)]
    try:
        for proc in procs:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a client process failed: {line or f'exit {proc.wait(timeout=30)}'}")
        open_s = time.monotonic() - opened
        cpu0 = _cpu_seconds(server_pid)
        time.sleep(3)  # every stream open (or every poller polling), nothing written
        idle = (_cpu_seconds(server_pid) - cpu0) / 3
        rss_open = _rss_mb(server_pid)
        stop, counts = threading.Event(), collections.Counter()
        writers = [threading.Thread(target=run_writer, args=(address, source, target), kwargs=dict(
            rate=args.write_rate, offset_s=i / len(targets) / args.write_rate, stop=stop, counts=counts))
            for i, target in enumerate(targets)]
        start = time.time() + 0.5
        for proc in procs:
            proc.stdin.write(f"{start} {start + args.duration_s}\n")
            proc.stdin.flush()
        for writer in writers:
            writer.start()
        time.sleep(max(start - time.time(), 0))
        cpu0 = _cpu_seconds(server_pid)
        time.sleep(args.duration_s)
        busy = (_cpu_seconds(server_pid) - cpu0) / args.duration_s
        rss_end = _rss_mb(server_pid)
        stop.set()
        for writer in writers:
            writer.join(timeout=30)
        results = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    latencies = [x for r in results for x in r["latencies"]]
    errors = collections.Counter()
    for r in results:
        errors.update(r["errors"])
    return {"clients": per_proc * args.watch_procs, "open_s": open_s, "rss_before": rss_before,
            "rss_open": rss_open, "rss_end": rss_end, "idle": idle, "busy": busy,
            "events": sum(r["events"] for r in results) / args.duration_s,
            "calls": sum(r["calls"] for r in results) / args.duration_s,
            "p50": _percentile(latencies, 50) * 1000, "p99": _percentile(latencies, 99) * 1000,
            "errors": dict(errors), "writes": dict(counts)}


def _print_watch(rows: list[tuple[str, str, dict]], args) -> None:
    print(f"\nwatch vs poll: {args.watchers} clients over {RANKS} ranks of one source ({args.watch_procs} processes x "
          f"{args.watch_channels} connections), {args.writers} pulling targets writing {args.write_rate:g}/s each "
          f"(progress, heartbeat, load in turn), {args.duration_s:g} s\n")
    print("| store  | mode  | open s | RSS MB before / open / end | idle cores | busy cores | events/s | "
          "ListSources/s | write->seen p50 ms | p99 ms | refused, retried |")
    print("|--------|-------|-------:|----------------------------|-----------:|-----------:|---------:|"
          "--------------:|-------------------:|-------:|--------|")
    for store, mode, r in rows:
        print(f"| {store:<6} | {mode:<5} | {r['open_s']:>6.1f} | {r['rss_before']:>6.0f} / {r['rss_open']:>5.0f} / "
              f"{r['rss_end']:>5.0f}        | {r['idle']:>10.2f} | {r['busy']:>10.2f} | {r['events']:>8.0f} | "
              f"{r['calls']:>13.0f} | {r['p50']:>18.1f} | {r['p99']:>6.1f} | {r['errors'] or '-'} |")
    for store, mode, r in rows:
        print(f"{store} {mode}: writes {r['writes']}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="concurrent targets (default 200)")
    parser.add_argument("--publishers", type=int, default=50, help="heartbeating seeds (default 50)")
    parser.add_argument("--tensors", type=int, default=10_000, help="tensors per published worker (default 10000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load duration per store (default 15)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S",
                        help="each seed's UpdateStatus period (default 1; real seeds: 30)")
    parser.add_argument("--stores", default="memory,redis", help="comma-separated: memory, redis (default both)")
    parser.add_argument("--modes", default="load,burst,cpu", help="comma-separated: load, burst, cpu, watch, poll (default load,burst,cpu)")
    parser.add_argument("--burst", type=int, default=200, help="targets starting at once in burst mode (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per store; the median is reported (default 3)")
    parser.add_argument("--server-root", type=pathlib.Path, default=ROOT, metavar="DIR",
                        help="checkout the server runs from (default: this one)")
    parser.add_argument("--server-args", default="", metavar="ARGS",
                        help="more `sglang-mx server` flags, one string (e.g. '--workers 8')")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="the server (and redis-server) on the last CPU of this process's, the load "
                             "generator and the probe on the others, as if the server had a machine of its "
                             "own (default; needs 2+ CPUs and taskset); --no-pin lets them share every CPU")
    parser.add_argument("--watchers", type=int, default=8000,
                        help="watch/poll modes: clients, spread over the 8 ranks (default 8000)")
    parser.add_argument("--watch-procs", type=int, default=4, help="watch/poll modes: client processes (default 4)")
    parser.add_argument("--watch-channels", type=int, default=16,
                        help="watch/poll modes: connections per client process (default 16)")
    parser.add_argument("--writers", type=int, default=16,
                        help="watch/poll modes: pulling targets writing UpdateStatus (default 16)")
    parser.add_argument("--write-rate", type=float, default=1.0,
                        help="watch/poll modes: UpdateStatus per writer per second (default 1)")
    parser.add_argument("--duration-s", type=float, default=20.0,
                        help="watch/poll modes: measured seconds per run (default 20)")
    parser.add_argument("--probe", metavar="ADDRESS", help=argparse.SUPPRESS)  # the probe process
    parser.add_argument("--watch-client", metavar="ADDRESS", help=argparse.SUPPRESS)  # a watch client process
    parser.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--poll", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        _probe(args.probe, args.seconds)
        return 0
    if args.watch_client:
        print(json.dumps(asyncio.run(_clients(args.watch_client, streams=args.streams, channels=args.watch_channels,
                                              first=args.first, poll=args.poll, source=args.source))))
        return 0
    modes = set(args.modes.split(","))
    if modes - {"load", "burst", "cpu", "watch", "poll"}:
        parser.error(f"--modes {args.modes}: allowed: load, burst, cpu, watch, poll")
    server_cpus, placement = _place(args.pin)
    print(placement, file=sys.stderr)

    rows, bursts, cpu, watches = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="mx-load-") as tmp:
        for store in args.stores.split(","):
            workdir = pathlib.Path(tmp) / store
            workdir.mkdir()
            for mode in ("watch", "poll"):
                if mode not in modes:
                    continue
                with Processes(store, workdir, args.server_root.resolve(), tuple(shlex.split(args.server_args)),
                               server_cpus) as procs:
                    print(f"{store}: {mode}, {args.watchers} clients ...", file=sys.stderr)
                    watches.append((store, mode, run_watch(procs.address, procs.procs[-1].pid, poll=mode == "poll",
                                                           args=args)))
            if not modes & {"load", "burst", "cpu"}:
                continue
            with Processes(store, workdir, args.server_root.resolve(), tuple(shlex.split(args.server_args)),
                           server_cpus) as procs:
                t0 = time.monotonic()
                source, workers = publish(procs.address, args.publishers, args.tensors)
                print(f"{store}: published {len(workers)} workers x {args.tensors} tensors in "
                      f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
                if "cpu" in modes:
                    per_call = server_cpu_per_call(procs.address, procs.procs[-1].pid, source, workers[0][0])
                    cpu.append((store, per_call["GetMetadata"], per_call["ListSources"]))
                if "burst" in modes:
                    runs = [asyncio.run(run_burst(procs.address, targets=args.burst, expect_tensors=args.tensors))
                            for _ in range(args.repeats)]
                    print(f"{store}: bursts (last, s): {[round(r['last'], 3) for r in runs]}", file=sys.stderr)
                    middle = sorted(runs, key=lambda r: r["last"])[len(runs) // 2]
                    bursts.append((store, middle["last"], middle["p50"], sum(r["errors"] for r in runs)))
                if "load" in modes:
                    print(f"{store}: {args.clients} targets for {args.seconds:g} s ...", file=sys.stderr)
                    cpu0 = _cpu_seconds(procs.procs[-1].pid)
                    probe = _start_probe(procs.address, max(args.seconds - 2, 1))
                    results = asyncio.run(run_load(procs.address, source, workers, clients=args.clients,
                                                   seconds=args.seconds, heartbeat_interval_s=args.heartbeat_interval,
                                                   expect_tensors=args.tensors))
                    busy = (_cpu_seconds(procs.procs[-1].pid) - cpu0) / args.seconds
                    probed = json.loads(probe.communicate(timeout=120)[0])
                    results["probe ListSources"] = {"calls": len(probed), "rate": len(probed) / args.seconds,
                                                    "errors": 0, "latencies": probed}
                    print(f"{store}: server busy {busy:.2f} cores during the load", file=sys.stderr)
                    for kind, r in results.items():
                        rows.append((store, kind, r["calls"], r["rate"],
                                     _percentile(r["latencies"], 50) * 1000, _percentile(r["latencies"], 99) * 1000,
                                     r["errors"]))

    print(f"\nserver: {args.server_root.resolve()}; {placement}")
    if rows or bursts or cpu:
        print(f"{args.publishers} workers x {args.tensors} tensors published")
    if cpu:
        print("\nserver CPU per call (200 sequential calls each)\n")
        print(f"| {'store':<6} | {'GetMetadata ms':>14} | {'ListSources ms':>14} |")
        print(f"|{'-' * 8}|{'-' * 16}|{'-' * 16}|")
        for store, get_ms, list_ms in cpu:
            print(f"| {store:<6} | {get_ms:>14.2f} | {list_ms:>14.2f} |")
    if bursts:
        print(f"\nburst: {args.burst} targets start at once (ListSources + GetMetadata), median of {args.repeats}\n")
        print(f"| {'store':<6} | {'last has metadata s':>19} | {'median target s':>15} | errors |")
        print(f"|{'-' * 8}|{'-' * 21}|{'-' * 17}|{'-' * 8}|")
        for store, last, p50, errs in bursts:
            print(f"| {store:<6} | {last:>19.3f} | {p50:>15.3f} | {errs:>6} |")
    if watches:
        _print_watch(watches, args)
    if rows:
        print(f"\nload: {args.clients} targets (ListSources + GetMetadata of a {args.tensors}-tensor worker), "
              f"{args.publishers} seeds heartbeating every {args.heartbeat_interval:g} s, {args.seconds:g} s per store\n")
        print(f"| {'store':<6} | {'rpc':<17} | {'calls':>7} | {'req/s':>8} | {'p50 ms':>8} | {'p99 ms':>8} | errors |")
        print(f"|{'-' * 8}|{'-' * 19}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
        for store, kind, calls, rate, p50, p99, errs in rows:
            print(f"| {store:<6} | {kind:<17} | {calls:>7} | {rate:>8.1f} | {p50:>8.1f} | {p99:>8.1f} | {errs:>6} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
