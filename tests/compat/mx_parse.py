"""Parse serialized GetMetadataResponse bytes (base64, one per stdin line) with the modelexpress
0.7.0 wheel's OWN generated p2p_pb2; print one JSON object per line.

A process of its own, for the reason mx_descriptor.py gives.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import pathlib
import shutil
import sys
import tempfile


def main() -> int:
    spec = importlib.util.find_spec("modelexpress")
    if spec is None or not spec.submodule_search_locations:
        print("modelexpress is not installed", file=sys.stderr)
        return 3
    src = pathlib.Path(list(spec.submodule_search_locations)[0])
    with tempfile.TemporaryDirectory() as tmp:
        pkg = pathlib.Path(tmp) / "mx_wheel_proto"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        shutil.copy(src / "p2p_pb2.py", pkg / "p2p_pb2.py")
        sys.path.insert(0, tmp)
        p2p_pb2 = importlib.import_module("mx_wheel_proto.p2p_pb2")
        for line in sys.stdin:
            got = p2p_pb2.GetMetadataResponse.FromString(base64.b64decode(line))
            print(json.dumps({
                "found": got.found, "mx_source_id": got.mx_source_id, "worker_id": got.worker_id,
                "status": got.worker.status, "updated_at": got.worker.updated_at,
                "rank": got.worker.worker_rank, "session": got.worker.transfer_engine_session_id,
                "tensors": [[t.name, t.addr, t.size] for t in got.worker.tensor_source.tensors],
                "model_name": got.identity.model_name,
            }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
