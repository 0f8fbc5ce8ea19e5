"""The link's limit on this machine: a plain TCP socket on loopback between two
processes, moving the same number of bytes as a weight transfer.

    .venv/bin/python benchmarks/loopback_socket.py --gb 1.0

Both sides' pages are touched before the clock starts (a full-size receive
buffer, written; a written payload), so it measures the link, not page faults.
benchmarks/sglang_load.py runs it in the same repetitions as the pulls.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time

CHUNK = 4 * 1024 * 1024


def _receiver(port_q, nbytes: int, result_q) -> None:
    buf = bytearray(b"\x01") * nbytes  # every page written up front: a ready destination
    view = memoryview(buf)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            got = 0
            start = time.perf_counter()
            while got < nbytes:
                n = conn.recv_into(view[got:], min(CHUNK, nbytes - got))
                if n == 0:
                    raise RuntimeError(f"sender closed after {got} of {nbytes} bytes")
                got += n
            result_q.put(time.perf_counter() - start)


def measure(nbytes: int) -> float:
    """Seconds to move `nbytes` from one process to another over 127.0.0.1."""
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(target=_receiver, args=(port_q, nbytes, result_q))
    receiver.start()
    payload = memoryview(bytearray(b"\x5a") * nbytes)  # every page written: nothing faults on the way
    with socket.create_connection(("127.0.0.1", port_q.get(timeout=30))) as sock:
        sock.sendall(payload)
    seconds = result_q.get(timeout=300)
    receiver.join(timeout=30)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="bytes to move, in GB (default 1.0)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(args.gb * 1e9)
    rates = [nbytes / measure(nbytes) / 1e9 for _ in range(args.repeat)]
    print(f"loopback TCP socket, {nbytes / 1e9:.3f} GB between two processes: "
          f"best {max(rates):.2f} GB/s, runs " + ", ".join(f"{r:.2f}" for r in rates))


if __name__ == "__main__":
    main()
