"""Emulated hosts on one machine: a network namespace per host, a switch, every link shaped both ways.

    sudo .venv/bin/python benchmarks/netem.py check --rate-mb-s 25     # a socket across two shaped hosts
    sudo .venv/bin/python benchmarks/netem.py cleanup                  # what a crashed run left behind

`Netem(n, rate_mb_s)` (a context manager, root only) makes, under a per-run prefix
(`mxe<pid>-`):

- one switch namespace `<prefix>sw` holding a Linux bridge `br0` with SWITCH_IP;
- n host namespaces `<prefix>h0`..., each with `eth0` (HOST_IP(i)) whose veth peer
  `p<i>` is a port of the bridge, and `lo` up everywhere.

Every host link is a full-duplex NIC of `rate_mb_s` MB/s (10^6 bytes/s, counted on
the wire, so TCP at MTU 1500 moves about 96% of it as payload): a token bucket (tbf)
on eth0's egress shapes the host's upload, one on p<i>'s egress its download. tbf
cuts GSO super-packets into segments itself, so offloads stay on (checked: a
TCP stream reaches the rate, no drops). Nothing is made or changed in the root
namespace: the veth pairs are created inside the switch namespace with their
host end moved straight into the host's, and addresses are reachable only from
namespaces of this run. `exec_argv(host, argv)` runs a command in a host's
namespace (`switch_argv` in the switch's). Leaving the block (also on an
exception or Ctrl-C) kills whatever still runs in those namespaces and deletes
them, which deletes their links; `cleanup()` does the same for namespaces of
runs whose process is gone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

PREFIX = "mxe"
# A private /24 that exists only inside this run's namespaces (the root namespace never sees it).
SUBNET = "10.77.0"
SWITCH_IP = f"{SUBNET}.254"
MAX_HOSTS = 250
# tbf: the bucket holds at least this many bytes (a few 64 KiB GSO packets' worth)...
MIN_BURST_BYTES = 64 * 1024
# ... or this long at the rate, whichever is more; a packet may wait this long in the queue before it drops.
BURST_S = 0.004
LATENCY_MS = 50


class NetemError(RuntimeError):
    """A namespace, link or shaping command failed, or this process may not make them."""


@dataclasses.dataclass(frozen=True)
class Host:
    index: int
    ns: str  # the namespace's name
    ip: str  # eth0's address


def host_ip(index: int) -> str:
    return f"{SUBNET}.{index + 1}"


def run_prefix(pid: int | None = None) -> str:
    return f"{PREFIX}{os.getpid() if pid is None else pid}-"


def require_root() -> None:
    """Raise NetemError unless this process is root and `ip netns` works."""
    if os.geteuid() != 0:
        raise NetemError("emulated hosts need root (network namespaces, veth pairs, tc): run it as root "
                         "(sudo, keeping PYTHONPATH)")
    for tool in ("ip", "tc"):
        try:
            subprocess.run([tool, "-V"], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise NetemError(f"`{tool}` (iproute2) is needed for emulated hosts: {e}") from e
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise NetemError(f"`ip netns list` failed: {e.stderr.strip()}") from e


def _ip(*args: str) -> str:
    try:
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise NetemError(f"`{' '.join(args)}` failed ({e.returncode}): {e.stderr.strip()}") from e


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_and_delete(names: Sequence[str]) -> None:
    """SIGKILL every process inside the namespaces `names` (each by id), then delete them (and so their links)."""
    for ns in names:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(prefix: str = PREFIX, *, include_live: bool = False) -> list[str]:
    """Delete namespaces named `<prefix><pid>-...` left by runs whose process `pid` is gone (all of
    them with `include_live`), killing what still runs inside first. Returns the names deleted."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    doomed = []
    for ns in _namespaces():
        m = pattern.match(ns)
        if not m:
            continue
        if not include_live and _alive(int(m.group(1))):
            continue  # that run is still going (this process's own included)
        doomed.append(ns)
    _kill_and_delete(doomed)
    return doomed


class Netem:
    """`hosts` emulated hosts behind one switch, every link shaped to `rate_mb_s` both ways."""

    def __init__(self, hosts: int, rate_mb_s: float, *, prefix: str | None = None) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise NetemError(f"hosts={hosts}: between 1 and {MAX_HOSTS}")
        if rate_mb_s <= 0:
            raise NetemError(f"rate_mb_s={rate_mb_s}: must be positive")
        self.rate_mb_s = rate_mb_s
        self.prefix = prefix or run_prefix()
        self.switch_ns = f"{self.prefix}sw"
        self.switch_ip = SWITCH_IP
        self.hosts = [Host(i, f"{self.prefix}h{i}", host_ip(i)) for i in range(hosts)]
        self._made: list[str] = []
        self._open = False

    # --- building and tearing down ---

    def __enter__(self) -> "Netem":
        require_root()
        taken = set(_namespaces()) & {self.switch_ns, *(h.ns for h in self.hosts)}
        if taken:
            raise NetemError(f"namespaces {', '.join(sorted(taken))} exist already (a crashed run? "
                             f"`{sys.executable} benchmarks/netem.py cleanup`)")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _ip("ip", "netns", "add", ns)
        self._made.append(ns)
        _ip("ip", "-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        sw = self.switch_ns
        self._add_ns(sw)
        _ip("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("ip", "-n", sw, "addr", "add", f"{self.switch_ip}/24", "dev", "br0")
        _ip("ip", "-n", sw, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_ns(h.ns)
            port = f"p{h.index}"
            # Made inside the switch namespace, the host end moved straight into the host's: the root
            # namespace never holds either end.
            _ip("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _ip("ip", "-n", sw, "link", "set", port, "master", "br0")
            _ip("ip", "-n", sw, "link", "set", port, "up")
            _ip("ip", "-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _ip("ip", "-n", h.ns, "link", "set", "eth0", "up")
            self._shape(h.ns, "eth0")  # upload
            self._shape(sw, port)  # download

    def _shape(self, ns: str, dev: str) -> None:
        rate = self.rate_mb_s * 1e6
        burst = max(MIN_BURST_BYTES, int(rate * BURST_S))
        _ip("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(rate * 8)}bit",
            "burst", str(burst), "latency", f"{LATENCY_MS}ms")

    def close(self) -> None:
        """Kill what runs in our namespaces and delete them; safe to call again."""
        made, self._made = self._made, []
        self._open = False
        _kill_and_delete(list(reversed(made)))

    # --- using it ---

    def host(self, host: Host | int | str) -> Host:
        if isinstance(host, Host):
            return host
        if isinstance(host, int):
            return self.hosts[host]
        for h in self.hosts:
            if host in (h.ns, f"h{h.index}"):
                return h
        raise NetemError(f"no host {host!r}; hosts are h0..h{len(self.hosts) - 1}")

    def exec_argv(self, host: Host | int | str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the host's namespace."""
        return ["ip", "netns", "exec", self.host(host).ns, *argv]

    def switch_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the switch namespace (it holds SWITCH_IP on the bridge)."""
        return ["ip", "netns", "exec", self.switch_ns, *argv]

    def link_bytes(self) -> dict[int, tuple[int, int]]:
        """Host index -> (bytes uploaded, bytes downloaded) through its shaped link, from tc's counters."""
        ports = {q["dev"]: q.get("bytes", 0) for q in json.loads(
            _ip("tc", "-s", "-j", "-n", self.switch_ns, "qdisc", "show")) if q.get("kind") == "tbf"}
        out = {}
        for h in self.hosts:
            up = [q.get("bytes", 0) for q in json.loads(_ip("tc", "-s", "-j", "-n", h.ns, "qdisc", "show", "dev",
                                                              "eth0")) if q.get("kind") == "tbf"]
            out[h.index] = (up[0] if up else 0, ports.get(f"p{h.index}", 0))
        return out


# --- a socket probe: one host sends, another receives ------------------------------------------------

PROBE_PORT = 5201


def _probe_recv(ip: str) -> None:
    with socket.create_server((ip, PROBE_PORT)) as srv:
        print("listening", flush=True)
        conn, _ = srv.accept()
        buf = bytearray(4 << 20)
        got, start = 0, None
        with conn:
            while n := conn.recv_into(buf):
                start = start or time.perf_counter()
                got += n
        print(json.dumps({"bytes": got, "seconds": time.perf_counter() - (start or time.perf_counter())}),
              flush=True)


def _probe_send(ip: str, mb: float) -> None:
    payload = memoryview(bytearray(b"\x5a") * (1 << 20))
    with socket.create_connection((ip, PROBE_PORT)) as conn:
        for _ in range(int(mb * 1e6) >> 20):
            conn.sendall(payload)


def measure(net: Netem, src: int, dst: int, mb: float = 100.0, timeout_s: float = 120.0) -> float:
    """MB/s of payload one TCP stream moves from host `src` to host `dst`."""
    me = os.path.abspath(__file__)
    recv = subprocess.Popen(net.exec_argv(dst, [sys.executable, me, "_recv", net.host(dst).ip]),
                            stdout=subprocess.PIPE, text=True)
    try:
        if recv.stdout.readline().strip() != "listening":
            raise NetemError(f"the probe receiver in {net.host(dst).ns} did not start")
        subprocess.run(net.exec_argv(src, [sys.executable, me, "_send", net.host(dst).ip, str(mb)]), check=True,
                       timeout=timeout_s)
        out, _ = recv.communicate(timeout=timeout_s)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    result = json.loads(out)
    return result["bytes"] / result["seconds"] / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="two shaped hosts; one TCP stream each way, then both at once")
    c.add_argument("--rate-mb-s", type=float, default=25.0)
    c.add_argument("--mb", type=float, default=100.0)
    sub.add_parser("cleanup", help=f"delete {PREFIX}<pid>-* namespaces whose run is gone")
    r = sub.add_parser("_recv")
    r.add_argument("ip")
    s = sub.add_parser("_send")
    s.add_argument("ip")
    s.add_argument("mb", type=float)
    args = p.parse_args(argv)
    if args.cmd == "_recv":
        _probe_recv(args.ip)
    elif args.cmd == "_send":
        _probe_send(args.ip, args.mb)
    elif args.cmd == "cleanup":
        require_root()
        gone = cleanup()
        print(f"deleted {len(gone)} namespace(s){': ' + ', '.join(gone) if gone else ''}")
    else:
        with Netem(2, args.rate_mb_s) as net:
            for src, dst in ((0, 1), (1, 0)):
                got = measure(net, src, dst, args.mb)
                print(f"h{src} -> h{dst}: {got:.1f} MB/s of payload at {args.rate_mb_s:g} MB/s set "
                      f"({got / args.rate_mb_s:.3f})")
            print("link bytes (up, down):", net.link_bytes())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NetemError as e:
        print(f"netem: error: {e}", file=sys.stderr)
        sys.exit(2)
