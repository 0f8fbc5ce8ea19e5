"""Parse serialized GetMetadataResponse bytes (base64, one per stdin line) with the modelexpress
0.7.0 wheel's OWN generated p2p_pb2; print one JSON object per line.

A process of its own, for the reason mx_descriptor.py gives.
"""

from __future__ import annotations

import base64
import json
import sys

from mx_wheel import NotInstalled, wheel_p2p  # this directory is on sys.path: run as a script


def main() -> int:
    try:
        with wheel_p2p() as p2p_pb2:
            for line in sys.stdin:
                got = p2p_pb2.GetMetadataResponse.FromString(base64.b64decode(line))
                print(json.dumps({
                    "found": got.found, "mx_source_id": got.mx_source_id, "worker_id": got.worker_id,
                    "status": got.worker.status, "updated_at": got.worker.updated_at,
                    "rank": got.worker.worker_rank, "session": got.worker.transfer_engine_session_id,
                    "tensors": [[t.name, t.addr, t.size] for t in got.worker.tensor_source.tensors],
                    "model_name": got.identity.model_name,
                }))
    except NotInstalled as e:
        print(e, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
