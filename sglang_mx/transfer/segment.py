"""Ask a Mooncake engine what it installed: its segment descriptor over the P2P handshake.

In P2PHANDSHAKE mode every TransferEngine answers, on its RPC port (the port of its
session id "host:port"), a Metadata request with its own segment descriptor: the
JSON peers read before a transfer, naming the transport it installed ("protocol")
and the buffers it registered. The wire (Mooncake's common.h writeString/readString):
a little-endian u64 length, then one byte of request type (Metadata = 1) and the
JSON, the length counting both; the answer has the same framing. The Python
binding exposes no other way to learn the transport (checked up to 0.3.14).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct

_METADATA = 1
_MAX_ANSWER = 128 << 20  # Mooncake's own cap on a handshake message (MC_HANDSHAKE_MAX_LENGTH)


@dataclasses.dataclass(frozen=True)
class Segment:
    """What a Mooncake engine says of itself."""

    name: str
    protocols: tuple[str, ...]  # one, or several in multi-protocol builds
    buffers: tuple[tuple[int, int], ...]  # (addr, length) registered, in address order


def parse_segment(text: str | bytes) -> Segment:
    """A segment descriptor's JSON as Mooncake writes it (transfer_metadata.cpp encodeSegmentDesc)."""
    desc = json.loads(text)
    proto = desc.get("protocol", "")
    protocols = tuple(proto) if isinstance(proto, list) else tuple(p for p in str(proto).split(",") if p)
    buffers = sorted((int(b["addr"]), int(b["length"])) for b in desc.get("buffers", ()))
    return Segment(name=str(desc.get("name", "")), protocols=protocols, buffers=tuple(buffers))


def query_segment(session: str, *, timeout_s: float = 5.0) -> Segment:
    """The segment descriptor of the engine at `session` ("host:rpc_port"); OSError or
    ValueError when it cannot be had (not P2PHANDSHAKE, an older or newer wire)."""
    host, _, port = session.rpartition(":")
    body = b"{}"
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
        sock.sendall(struct.pack("<QB", len(body) + 1, _METADATA) + body)
        head = _read_exactly(sock, 8)
        (length,) = struct.unpack("<Q", head)
        if not 1 <= length <= _MAX_ANSWER:
            raise ValueError(f"Mooncake at {session} answered a handshake length of {length}")
        answer = _read_exactly(sock, length)
    if answer[0] != _METADATA:
        raise ValueError(f"Mooncake at {session} answered request type {answer[0]}, not Metadata ({_METADATA})")
    return parse_segment(answer[1:])


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ValueError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)
