"""Drive a metadata server with the REAL ModelExpress 0.7.0 client (`modelexpress.client.MxClient`).

Reads one JSON object on stdin, prints one JSON object on stdout:

    {"url": "127.0.0.1:PORT",
     "publish": {"worker_id": ..., "worker_rank": ..., "session": ..., "tensors": [[name, addr, size, dtype], ...]},
     "read": {"identity": {SourceIdentity fields, enums as ints}}}

"publish" runs the seed's side of a ModelExpress source's life (publish INITIALIZING, READY,
get, STALE) with the golden Qwen/Qwen3-8B identity; "read" lists READY workers of an identity
and fetches each one's record, as a ModelExpress target would. Runs in its own process:
`modelexpress.p2p_pb2` and `sglang_mx._proto.p2p_pb2` both register "p2p.proto".
"""

from __future__ import annotations

import json
import sys

from modelexpress import p2p_pb2
from modelexpress.client import MxClient


def _tensors(worker) -> list:
    return [[t.name, t.addr, t.size, t.dtype, t.device_id] for t in worker.tensor_source.tensors]


def _ready_ids(client: MxClient, identity) -> list[str]:
    response = client.list_sources(identity=identity, status_filter=p2p_pb2.SOURCE_STATUS_READY)
    return [ref.worker_id for ref in response.instances]


def publish(client: MxClient, spec: dict) -> dict:
    identity = p2p_pb2.SourceIdentity(
        mx_version="0.7.0",
        mx_source_type=p2p_pb2.MX_SOURCE_TYPE_WEIGHTS,
        model_name="Qwen/Qwen3-8B",
        backend_framework=p2p_pb2.BACKEND_FRAMEWORK_SGLANG,
        tensor_parallel_size=2,
        pipeline_parallel_size=1,
        expert_parallel_size=1,
        dtype="bfloat16",
    )
    worker = p2p_pb2.WorkerMetadata(
        worker_rank=spec["worker_rank"],
        transfer_engine_session_id=spec["session"],
        status=p2p_pb2.SOURCE_STATUS_INITIALIZING,
        tensor_source=p2p_pb2.TensorSourceMetadata(
            tensors=[p2p_pb2.TensorDescriptor(name=n, addr=a, size=s, dtype=d) for n, a, s, d in spec["tensors"]]
        ),
    )
    wid, rank = spec["worker_id"], spec["worker_rank"]
    out: dict = {"mx_source_id": client.publish_metadata(identity, worker, wid)}
    source = out["mx_source_id"]
    out["ready_before"] = _ready_ids(client, identity)
    out["update_ready"] = client.update_status(source, wid, rank, p2p_pb2.SOURCE_STATUS_READY)
    out["ready_after"] = _ready_ids(client, identity)
    got = client.get_metadata(source, wid)
    out["get"] = {
        "found": got.found,
        "mx_source_id": got.mx_source_id,
        "worker_id": got.worker_id,
        "worker_rank": got.worker.worker_rank,
        "status": p2p_pb2.SourceStatus.Name(got.worker.status),
        "session": got.worker.transfer_engine_session_id,
        "backend_metadata": got.worker.WhichOneof("backend_metadata"),
        "updated_at": got.worker.updated_at,
        "tensors": _tensors(got.worker),
        "identity_model_name": got.identity.model_name,
        "identity_backend": p2p_pb2.BackendFramework.Name(got.identity.backend_framework),
    }
    out["get_unknown_found"] = client.get_metadata(source, "no-such-worker").found
    out["update_unknown"] = client.update_status(source, "no-such-worker", rank, p2p_pb2.SOURCE_STATUS_READY)
    out["update_stale"] = client.update_status(source, wid, rank, p2p_pb2.SOURCE_STATUS_STALE)
    out["ready_after_stale"] = _ready_ids(client, identity)
    stale = client.list_sources(identity=identity, status_filter=p2p_pb2.SOURCE_STATUS_STALE)
    out["stale_ids"] = [ref.worker_id for ref in stale.instances]
    return out


def read(client: MxClient, spec: dict) -> dict:
    identity = p2p_pb2.SourceIdentity(**spec["identity"])
    response = client.list_sources(identity=identity, status_filter=p2p_pb2.SOURCE_STATUS_READY)
    refs, records = [], {}
    for ref in response.instances:
        refs.append({"mx_source_id": ref.mx_source_id, "worker_id": ref.worker_id, "worker_rank": ref.worker_rank,
                     "model_name": ref.model_name, "updated_at": ref.updated_at})
        got = client.get_metadata(ref.mx_source_id, ref.worker_id)
        records[ref.worker_id] = {
            "found": got.found,
            "status": p2p_pb2.SourceStatus.Name(got.worker.status),
            "session": got.worker.transfer_engine_session_id,
            "worker_rank": got.worker.worker_rank,
            "tensors": _tensors(got.worker),
            "identity": {"model_name": got.identity.model_name, "dtype": got.identity.dtype,
                         "tensor_parallel_size": got.identity.tensor_parallel_size},
        }
    everything = client.list_sources()  # no identity, no filter
    return {"refs": refs, "records": records,
            "all_ids": sorted(f"{r.mx_source_id}/{r.worker_id}" for r in everything.instances)}


def main() -> int:
    spec = json.load(sys.stdin)
    client = MxClient(spec["url"])
    try:
        result = {}
        if "publish" in spec:
            result["publish"] = publish(client, spec["publish"])
        if "read" in spec:
            result["read"] = read(client, spec["read"])
    finally:
        client.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
