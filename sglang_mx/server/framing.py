"""GetMetadata answers framed around the bytes a worker was stored as, never decoding them.

The server keeps a published worker as the bytes it arrived as (`wire.encode_published`)
and answers GetMetadata by framing those bytes. A protobuf message is the
concatenation of its fields' encodings, in any order, and for a scalar field that
appears twice the last one wins; WorkerMetadata.status (4) and updated_at (5) are
removed from the stored bytes at publish and appended with their current values at
answer time. A pulling target's progress (UpdateStatus mx_verified_bytes) is appended
the same way, as one more WorkerMetadata.topology (11) entry: a map field's entries
are repeated submessages, and a later entry with the same key wins. Only field numbers
of the ModelExpress wire appear here; the generated protobuf types stay in sglang_mx.wire.
"""

from __future__ import annotations

from sglang_mx import wire
from sglang_mx.records import TOPOLOGY_VERIFIED_BYTES, SourceStatus, WorkerBytes

_MASK64 = (1 << 64) - 1
# GetMetadataResponse fields: found 1, worker 2, mx_source_id 3, worker_id 4, identity 5.
# WorkerMetadata fields: status 4, updated_at 5, topology 11 (entries: key 1, value 2).


def varint(value: int) -> bytes:
    value &= _MASK64  # negative int64 values take ten bytes, as protobuf encodes them
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field: int, *parts: bytes) -> list[bytes]:
    return [varint(field << 3 | 2), varint(sum(map(len, parts))), *parts]


def status_suffix(status: SourceStatus, updated_at_ms: int) -> bytes:
    """WorkerMetadata's status and updated_at, appended to its stored bytes."""
    return varint(4 << 3) + varint(int(status)) + varint(5 << 3) + varint(updated_at_ms)


def topology_entry(key: str, value: str) -> bytes:
    """One WorkerMetadata.topology map entry, appended to stored bytes."""
    return b"".join(length_delimited(11, *length_delimited(1, key.encode()), *length_delimited(2, value.encode())))


def get_response_bytes(stored: WorkerBytes | None, *, mx_source_id: str, worker_id: str) -> bytes:
    """A serialized GetMetadataResponse, framed around the stored bytes without decoding them."""
    if stored is None:
        return wire.not_found_response_bytes(mx_source_id, worker_id)
    return b"".join([
        b"\x08\x01",  # found = true
        *length_delimited(2, stored.worker_bytes, status_suffix(stored.status, stored.updated_at_ms),
                          b"" if stored.verified_bytes is None else
                          topology_entry(TOPOLOGY_VERIFIED_BYTES, str(stored.verified_bytes))),
        *length_delimited(3, mx_source_id.encode()),
        *length_delimited(4, worker_id.encode()),
        *length_delimited(5, stored.identity_bytes),
    ])
