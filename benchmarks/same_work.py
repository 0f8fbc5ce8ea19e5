"""The pull inside SGLang, compared with the same work outside it (issue #19): helpers for
benchmarks/sglang_load.py, each side a fresh process of its own.

- `PlainSeed`: a plain process holding a checkpoint's tensors (read into its memory, every page
  written) and publishing them with `start_seed`, as `sglang-mx demo` and
  benchmarks/mooncake_pull.py do. Runs until stopped.
- `plain_pull`: a fresh plain process pulls those tensors with `pull_weights` as an SGLang
  target does: never-written destinations, each read's populated just before it is submitted,
  every tensor verified (`verify="require"`) as it lands. Its GB/s is `PullReport`'s, the
  number the SGLang target logs as `modelexpress: pulled ... GB in ... s`.
- `same_work_ceiling`: a fresh process receives the same number of bytes (the checkpoint's own)
  from another process over a loopback TCP socket into untouched memory (each 16 MiB populated
  just before it is received, as a pull populates each read) and hashes each 16 MiB with
  xxh3-64 on a second thread as it lands: the bytes moved, the pages populated and the hashing
  of a pull, with no engine, metadata or bookkeeping. The sender's pages are written before the
  clock starts.

    python benchmarks/same_work.py seed URL MODEL_DIR      (what PlainSeed runs)
    python benchmarks/same_work.py pull URL MODEL_DIR      (what plain_pull runs)
    python benchmarks/same_work.py send MODEL_DIR NBYTES | recv PORT NBYTES
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHUNK = 16 << 20  # the ceiling hashes each 16 MiB as it lands
MODEL_NAME = "bench/same-work-plain"


# Socket buffers of the ceiling's two ends (the kernel caps them at net.core.[rw]mem_max): large, as a
# transfer engine sets them, so the ceiling measures copies and not window waits.
SOCKET_BUFFER = 16 << 20

def _child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    stderr = tempfile.TemporaryFile("w+")  # Mooncake's start-up chatter; shown when the child fails
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)
    proc.stderr_file = stderr
    return proc


def _expect(proc: subprocess.Popen, word: str) -> str:
    line = proc.stdout.readline()  # the child prints one line per step; a dead child gives ""
    if not line.startswith(word):
        proc.kill()
        proc.wait(30)
        proc.stderr_file.seek(0)
        raise RuntimeError(f"{proc.args[2:4]} said {line!r}, expected {word!r} (exit {proc.returncode}):\n"
                           + proc.stderr_file.read()[-3000:])
    return line[len(word):].strip()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(30)
    proc.stderr_file.close()


class PlainSeed:
    """A plain seed process of `model_dir`'s tensors on the metadata server at `url`."""

    def __init__(self, url: str, model_dir: pathlib.Path) -> None:
        self.proc = _child("seed", url, str(model_dir))
        try:
            self.nbytes = int(_expect(self.proc, "READY"))
        except BaseException:
            _stop(self.proc)
            raise

    def __enter__(self) -> "PlainSeed":
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


def plain_pull(url: str, model_dir: pathlib.Path) -> dict:
    """One pull by a fresh plain target process: {"gb", "seconds", "gb_per_s", "verified", "verify_seconds"}."""
    proc = _child("pull", url, str(model_dir))
    try:
        _expect(proc, "READY")  # engine up, tensors allocated (never written): the clock starts at "go"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return json.loads(_expect(proc, "RESULT"))
    finally:
        _stop(proc)


def same_work_ceiling(model_dir: pathlib.Path, nbytes: int) -> dict:
    """Loopback socket into fresh memory (populated per 16 MiB), xxh3-64 per 16 MiB as it lands:
    {"gb", "seconds", "gb_per_s"}."""
    sender = _child("send", str(model_dir), str(nbytes))
    try:
        port = _expect(sender, "READY")
        receiver = _child("recv", port, str(nbytes))
        try:
            return json.loads(_expect(receiver, "RESULT"))
        finally:
            _stop(receiver)
    finally:
        _stop(sender)


# --- the child processes ----------------------------------------------------------

def _checkpoint_shapes(model_dir: pathlib.Path) -> dict:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shapes[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return shapes


def _identity():
    from sglang_mx.records import SourceIdentity

    return SourceIdentity(model_name=MODEL_NAME, tensor_parallel_size=1, dtype="bfloat16")


def _seed(url: str, model_dir: pathlib.Path) -> None:
    import torch
    from safetensors.torch import load_file

    from sglang_mx.client import MetadataClient
    from sglang_mx.seed import SeedOptions, start_seed
    from sglang_mx.transfer.engine import MooncakeEngine

    torch.set_num_threads(1)
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors |= {name: t.clone() for name, t in load_file(str(path)).items()}  # our own written pages
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with MetadataClient(url) as client, MooncakeEngine.create("127.0.0.1") as engine:
        publisher = start_seed(tensors, engine, _identity(), client, worker_rank=0, options=SeedOptions(ready=True))
        print(f"READY {nbytes}", flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
        publisher.close()


def _pull(url: str, model_dir: pathlib.Path) -> None:
    import torch

    from sglang_mx.client import MetadataClient
    from sglang_mx.target import PullOptions, digest_verifier, pull_weights
    from sglang_mx.transfer.engine import MooncakeEngine
    from sglang_mx.transfer.memory import populate
    from sglang_mx.transfer.tensors import describe

    torch.set_num_threads(1)
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    local = {name: torch.empty(shape, dtype=dtypes[dtype])  # never written, as a target's dummy build
             for name, (shape, dtype) in _checkpoint_shapes(model_dir).items()}
    with MetadataClient(url) as client, MooncakeEngine.create("127.0.0.1") as engine:
        print("READY", flush=True)
        sys.stdin.readline()
        report = pull_weights(client, engine, _identity(), worker_rank=0, tensors=describe(local),
                              options=PullOptions(wait_timeout_s=30, verify="require"),
                              verifier=digest_verifier(local),
                              prepare=lambda read: populate(read.local_addr, read.length))
    print("RESULT " + json.dumps(dict(gb=report.bytes / 1e9, seconds=report.seconds, gb_per_s=report.gb_per_s,
                                      verified=report.verified, tensors=report.tensors,
                                      verify_seconds=report.verify_seconds)), flush=True)


def _send(model_dir: pathlib.Path, nbytes: int) -> None:
    payload = bytearray(nbytes)  # the checkpoint's bytes, in pages this process has written
    view, got = memoryview(payload), 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            while got < nbytes and (n := f.readinto(view[got:])):
                got += n
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(f"READY {server.getsockname()[1]}", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            conn.sendall(view)
    sys.stdin.read()


def _recv(port: int, nbytes: int) -> None:
    import ctypes

    import xxhash

    from sglang_mx.transfer.memory import populate

    buf = mmap.mmap(-1, nbytes)  # anonymous, never touched: fresh memory, as a target's
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    view, got, digests = memoryview(buf), 0, []
    # Receiving and hashing on two threads, as a pull does them (a Mooncake thread receives while the
    # main thread verifies what landed): each 16 MiB piece is hashed as soon as it is full.
    landed: queue.Queue = queue.Queue()

    def hash_pieces() -> None:
        while (piece := landed.get()) is not None:
            digests.append(xxhash.xxh3_64_intdigest(view[piece[0]:piece[1]]))

    hasher = threading.Thread(target=hash_pieces, name="hash")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # before connect: the window
        conn.connect(("127.0.0.1", port))
        start = time.perf_counter()
        hasher.start()
        while got < nbytes:
            first = got - got % CHUNK  # the 16 MiB piece being filled
            end = min(first + CHUNK, nbytes)
            if got == first:  # populated just before its bytes are received, as a pull does each read
                populate(base + first, end - first)
            n = conn.recv_into(view[got:end], end - got)
            if n == 0:
                raise RuntimeError(f"the sender closed after {got} of {nbytes} bytes")
            got += n
            if got == end:
                landed.put((first, end))
        landed.put(None)
        hasher.join()
        seconds = time.perf_counter() - start
    assert len(digests) == -(-nbytes // CHUNK)
    view.release()
    buf.close()
    print("RESULT " + json.dumps(dict(gb=nbytes / 1e9, seconds=seconds, gb_per_s=nbytes / seconds / 1e9)), flush=True)


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "seed":
        _seed(rest[0], pathlib.Path(rest[1]))
    elif role == "pull":
        _pull(rest[0], pathlib.Path(rest[1]))
    elif role == "send":
        _send(pathlib.Path(rest[0]), int(rest[1]))
    elif role == "recv":
        _recv(int(rest[0]), int(rest[1]))
    else:
        raise SystemExit(__doc__)
