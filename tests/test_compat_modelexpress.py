"""The REAL ModelExpress 0.7.0 client (`modelexpress.client.MxClient`) as a peer of our server,
in both directions: it publishes and we read, we publish and it reads; once per store backend.

The ModelExpress side runs in a subprocess (tests/compat/mx_peer.py): its generated
p2p_pb2 and ours both register "p2p.proto" in protobuf's default pool.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from sglang_mx.client import MetadataClient
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.records import BackendFramework, SourceIdentity, SourceStatus, TensorDescriptor, WorkerRecord

pytestmark = pytest.mark.slow  # the real ModelExpress client in processes of its own

PEER = pathlib.Path(__file__).resolve().parent / "compat" / "mx_peer.py"
GOLDEN_ID = "8b7aa4b533b72278"

# What the ModelExpress client publishes (name, addr, size, dtype); addresses use all 64 bits.
MX_WORKER_ID = "mx-seed-rank1"
MX_SESSION = "127.0.0.1:16001"
MX_TENSORS = [
    ["model.embed_tokens.weight", 0x7F12_3456_0000, 311_164_928, "bfloat16"],
    ["model.layers.0.self_attn.qkv_proj.weight", 0x7F12_6800_0000, 12_582_912, "bfloat16"],
    ["lm_head.weight", 2**64 - 2**20, 2**20, "float8_e4m3fn"],
]

# What we publish for the ModelExpress client to find.
OUR_IDENTITY = SourceIdentity(
    mx_version="0.7.0", model_name="org/Tiny-Llama", backend_framework=BackendFramework.SGLANG,
    tensor_parallel_size=2, pipeline_parallel_size=1, expert_parallel_size=1, dtype="bfloat16",
)


def _our_worker(rank: int, status: SourceStatus) -> WorkerRecord:
    return WorkerRecord(
        worker_rank=rank,
        transfer_engine_session_id=f"127.0.0.1:{17000 + rank}",
        tensors=tuple(
            TensorDescriptor(name=f"model.layers.{i}.mlp.down_proj.weight", addr=0x7E00_0000_0000 + rank * 2**32
                             + i * 65536, size=65536, dtype="bfloat16")
            for i in range(5)
        ),
        status=status,
    )


OUR_WORKERS = {
    "ours-rank0": _our_worker(0, SourceStatus.READY),
    "ours-rank1": _our_worker(1, SourceStatus.READY),
    "ours-starting": _our_worker(1, SourceStatus.INITIALIZING),  # not READY: a target must not see it
}


@pytest.fixture(scope="module", params=["memory", "redis"])
def session(request):
    """Our server over each store; our records published; then one run of the ModelExpress peer against it."""
    if importlib.util.find_spec("modelexpress") is None:
        pytest.skip("modelexpress is not installed (pip install --no-deps modelexpress==0.7.0)")
    store = {"store": request.param}
    if request.param == "redis":
        store.update(redis_url=request.getfixturevalue("redis_server").url, redis_prefix="compat-modelexpress:")
    with MetadataServer(ServerOptions(host="127.0.0.1", port=0, **store)) as server:
        with MetadataClient(server.address, timeout_s=5) as client:
            our_source = {client.publish(OUR_IDENTITY, w, wid) for wid, w in OUR_WORKERS.items()}.pop()
            spec = {
                "url": server.address,
                "publish": {"worker_id": MX_WORKER_ID, "worker_rank": 1, "session": MX_SESSION,
                            "tensors": MX_TENSORS},
                "read": {"identity": {
                    "mx_version": OUR_IDENTITY.mx_version, "model_name": OUR_IDENTITY.model_name,
                    "backend_framework": int(OUR_IDENTITY.backend_framework),
                    "tensor_parallel_size": 2, "pipeline_parallel_size": 1, "expert_parallel_size": 1,
                    "dtype": "bfloat16",
                }},
            }
            done = subprocess.run([sys.executable, str(PEER)], input=json.dumps(spec), capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, f"ModelExpress peer failed:\n{done.stderr[-4000:]}"
            yield {"result": json.loads(done.stdout.strip().splitlines()[-1]), "client": client,
                   "our_source": our_source}


# --- ModelExpress publishes, we serve and read --------------------------------------------------------

def test_mx_publish_gets_the_golden_id(session):
    assert session["result"]["publish"]["mx_source_id"] == GOLDEN_ID


def test_mx_lifecycle_initializing_ready_stale(session):
    r = session["result"]["publish"]
    assert r["ready_before"] == []
    assert r["update_ready"] is True
    assert r["ready_after"] == [MX_WORKER_ID]
    assert r["update_stale"] is True
    assert r["ready_after_stale"] == []
    assert r["stale_ids"] == [MX_WORKER_ID]


def test_mx_unknown_worker_answers(session):
    r = session["result"]["publish"]
    assert r["get_unknown_found"] is False
    assert r["update_unknown"] is False


def test_mx_get_metadata_returns_identical_tensors(session):
    got = session["result"]["publish"]["get"]
    assert got["found"] is True
    assert (got["mx_source_id"], got["worker_id"], got["worker_rank"]) == (GOLDEN_ID, MX_WORKER_ID, 1)
    assert got["status"] == "SOURCE_STATUS_READY"
    assert (got["backend_metadata"], got["session"]) == ("transfer_engine_session_id", MX_SESSION)
    assert got["updated_at"] > 0
    assert got["tensors"] == [[n, a, s, d, 0] for n, a, s, d in MX_TENSORS]
    assert (got["identity_model_name"], got["identity_backend"]) == ("Qwen/Qwen3-8B", "BACKEND_FRAMEWORK_SGLANG")


def test_we_read_what_mx_published(session, make_identity):
    stored = session["client"].get_metadata(GOLDEN_ID, MX_WORKER_ID)
    assert stored is not None
    assert stored.identity == make_identity()  # the golden Qwen/Qwen3-8B one
    assert stored.worker.status == SourceStatus.STALE
    assert stored.worker.transfer_engine_session_id == MX_SESSION
    assert [(t.name, t.addr, t.size, t.dtype) for t in stored.worker.tensors] == [tuple(t) for t in MX_TENSORS]


# --- we publish, ModelExpress reads -------------------------------------------------------------------

def test_mx_lists_our_ready_workers(session):
    refs = session["result"]["read"]["refs"]
    assert sorted(r["worker_id"] for r in refs) == ["ours-rank0", "ours-rank1"]
    assert {r["mx_source_id"] for r in refs} == {session["our_source"]}
    assert {r["worker_id"]: r["worker_rank"] for r in refs} == {"ours-rank0": 0, "ours-rank1": 1}
    assert all(r["model_name"] == "org/Tiny-Llama" and r["updated_at"] > 0 for r in refs)


def test_mx_fetches_our_records_with_the_same_tensors(session):
    records = session["result"]["read"]["records"]
    for wid in ("ours-rank0", "ours-rank1"):
        ours, theirs = OUR_WORKERS[wid], records[wid]
        assert theirs["found"] is True
        assert theirs["status"] == "SOURCE_STATUS_READY"
        assert theirs["session"] == ours.transfer_engine_session_id
        assert theirs["worker_rank"] == ours.worker_rank
        assert theirs["tensors"] == [[t.name, t.addr, t.size, t.dtype, t.device_id] for t in ours.tensors]
        assert theirs["identity"] == {"model_name": "org/Tiny-Llama", "dtype": "bfloat16", "tensor_parallel_size": 2}


def test_mx_lists_everything_without_identity(session):
    assert session["result"]["read"]["all_ids"] == sorted(
        [f"{GOLDEN_ID}/{MX_WORKER_ID}"] + [f"{session['our_source']}/{wid}" for wid in OUR_WORKERS]
    )
