"""Architecture conformance: after a pull, every tensor of the target's model equals the seed's.

Correctness must be a property of the mechanism, not of the models we happened to
test: a rule that dropped names containing "lock" served Mixtral targets experts
they never pulled ("block_sparse_moe"), with every digest "verified". So, for each
architecture of SGLang 0.5.23's registry that runs here at a tiny float32 size:

- served (real SGLang servers on CPU): a seed loads checkpoint A from disk, a
  target starts on checkpoint B (same shapes, other values in every tensor) and
  pulls; every rank of both writes every tensor of its model
  (scripts/sglang_cpu/mx_dump.py: parameters, buffers, tensor attributes, found
  by a walk of its own), and the target's must equal the seed's byte for byte,
  pulled or recomputed; greedy tokens must equal the seed's. TP 2 for four dense
  models and two MoEs. Two pairs run at a time (the 2-core machine's start-ups overlap).
- in process (every architecture, also the ones whose forward pass needs a kernel
  this CPU lacks): SGLang's own loader builds the seed from A, the target from B
  and a dummy build in one process (tests/sglang/inprocess_pull.py); the product's
  walk must name the same tensors on all three, its bytes are copied as the pull
  would, `account` must prove every byte written or local by rule, and the dump's
  walk must find the target equal to the seed. Quantized checkpoints SGLang loads
  here (w8a8_int8, block FP8) too.

The README's model table is this suite's result.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import traceback

import pytest

from sglang_mx.client import MetadataClient
from sglang_mx.records import SourceStatus
from sglang_mx.sglang.launch import CPU_ENV, ROOT, TARGET_ARGS, SglangServer, seed_args, sglang_env
from tests.sglang.archs import checkpoint_tensors, differences, load_dumps, make_checkpoints
from tests.sglang.conftest import require_sglang

require_sglang()
pytestmark = pytest.mark.slow

# Every architecture the tiny-model maker writes (scripts/sglang_cpu/make_tiny_model.py --list).
ALL = subprocess.run([sys.executable, str(CPU_ENV / "make_tiny_model.py"), "--list"], capture_output=True,
                     text=True, check=True, env=sglang_env()).stdout.split()
# Architectures whose SGLang server serves on this CPU (qwen2_moe does not: its shared-expert gate
# is a Triton kernel, qwen2_moe.py `fused_gate_sigmoid_mul_add`, and Triton has no CPU driver).
SERVED = [arch for arch in ALL if arch != "qwen2_moe"]
# TP 2: dense models with distinct layers (plain; q/k norms; soft-capping and sandwich norms; fused qkv in the
# checkpoint) and two MoEs (Mixtral; DeepSeek-V2's MLA, shared experts and dense first layer). OLMoE cannot
# (SGLang 0.5.23 applies its full-width q/k norms to each rank's shard: olmoe.py).
TP2 = ("llama", "qwen3", "gemma2", "phi3", "mixtral", "deepseek_v2")
PAIRS = [(arch, 1) for arch in SERVED] + [(arch, 2) for arch in TP2]
# Quantized checkpoints SGLang 0.5.23 loads on this CPU (none serves: their GEMMs are Triton or CUDA
# kernels). Block FP8 on qwen2: SGLang's Llama loader renames weight_scale_inv and never loads its scales.
QUANTIZED = ["llama+w8a8_int8", "qwen2+fp8_block"]
IN_PROCESS = ALL + QUANTIZED


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("archs"), [(name, seed) for name in IN_PROCESS for seed in (0, 1)])


def test_the_two_checkpoints_differ_in_every_tensor(checkpoints):
    """What makes the checks below able to fail: a tensor the pull misses keeps B's values."""
    for arch in IN_PROCESS:
        a, b = checkpoint_tensors(checkpoints[arch, 0]), checkpoint_tensors(checkpoints[arch, 1])
        assert set(a) == set(b) and a, arch
        assert sorted(differences(a, b)) == sorted(f"{name}: bytes differ" for name in a), arch


@pytest.fixture(scope="module")
def in_process(checkpoints):
    """name -> the in-process check's result; every architecture in one subprocess (float32; the
    quantized ones in bfloat16, which both methods need)."""
    args = [str(x) for name in IN_PROCESS for x in (name, checkpoints[name, 0], checkpoints[name, 1],
                                                    "bfloat16" if "+" in name else "float32")]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sglang" / "inprocess_pull.py"), *args],
                          env=sglang_env(), capture_output=True, text=True, timeout=1200)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result.pop("name")] = result
    assert results, f"inprocess_pull.py printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return results


@pytest.mark.parametrize("arch", IN_PROCESS)
def test_in_process_every_tensor_equals_the_seed(arch, in_process):
    result = in_process.get(arch, {"error": "no result"})
    assert "error" not in result, result.get("error")
    assert "refused" not in result, result["refused"]
    assert result["same_layout"] and result["same_fingerprint"]
    assert result["written"] + result["local"] == result["total"]
    assert result["written"] == result["collected_bytes"] > 0
    assert result["differences"] == []
    assert result["scalars"] == []


def mx(address: str, arch: str, **extra) -> dict:
    # The target starts on other files (checkpoint B): both sides name the content alike (`checkpoint`).
    return {"url": address, "heartbeat_interval_s": 1, "model_name": f"conformance/{arch}", "verify": "require",
            "checkpoint": f"conformance/{arch}", "wait_timeout_s": 120, **extra}


def run_pair(arch: str, tp: int, checkpoints, address: str, out) -> dict:
    """Seed on checkpoint A, target on B; what the test asserts on (or "error" with the logs)."""
    result: dict = {}
    servers = []
    try:
        seed = SglangServer(checkpoints[arch, 0], *seed_args(), tp=tp, name=f"seed-{arch}-tp{tp}",
                            mx_config=mx(address, arch, source=True), env={"SGLANG_MX_TEST_DUMP": str(out / "seed")})
        servers.append(seed)
        seed.wait_ready()
        result["expected"] = seed.generations()
        with MetadataClient(address, timeout_s=5) as client:
            ready = client.list_sources(model_name=f"conformance/{arch}", status=SourceStatus.READY)
        result["ready_ranks"] = sorted(ref.worker_rank for ref in ready)
        result["reshard"] = sorted({line.split("serves targets of its own layout only: ", 1)[1]
                                    for line in seed.log.splitlines() if "serves targets of its own layout only" in line})
        target = SglangServer(checkpoints[arch, 1], *TARGET_ARGS, tp=tp, name=f"target-{arch}-tp{tp}",
                              mx_config=mx(address, arch, source=False),
                              env={"SGLANG_MX_TEST_DUMP": str(out / "target")})
        servers.append(target)
        target.wait_ready()
        result["accounted"] = target.log.count("modelexpress: every byte accounted for")
        result["tokens"] = target.generations()
        seen, held = load_dumps(out / "seed"), load_dumps(out / "target")
        result["ranks"] = (sorted(seen), sorted(held))
        result["tensors"] = {rank: len(tensors) for rank, tensors in seen.items()}
        result["differences"] = {rank: differences(seen[rank], held.get(rank, {})) for rank in seen}
    except Exception:  # noqa: BLE001  reported by this pair's test, with the servers' logs
        result["error"] = traceback.format_exc()[-3000:] + "".join(
            f"\n--- {s.name} ---\n{s.log[-2500:]}" for s in servers)
    finally:
        for server in servers:
            server.stop()
    return result


@pytest.fixture(scope="module")
def served(request, checkpoints, mx_server, tmp_path_factory):
    """(arch, tp) -> run_pair's result, for the pairs this session selected, two pairs at a time."""
    wanted = [(item.callspec.params["arch"], item.callspec.params["tp"]) for item in request.session.items
              if item.originalname == "test_served_target_equals_the_seed"]
    root = tmp_path_factory.mktemp("dumps")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {pair: pool.submit(run_pair, *pair, checkpoints, mx_server.address, root / f"{pair[0]}-tp{pair[1]}")
                   for pair in wanted}
        return {pair: future.result() for pair, future in futures.items()}


@pytest.fixture(scope="module")
def mx_server():
    """One metadata server for the module: every pair publishes under its own model name."""
    from sglang_mx.server import MetadataServer, ServerOptions

    with MetadataServer(ServerOptions(host="127.0.0.1", port=0, heartbeat_timeout_s=4.0, reaper_interval_s=1.0,
                                      gc_timeout_s=600)) as server:
        yield server


@pytest.mark.parametrize("arch, tp", PAIRS)
def test_served_target_equals_the_seed(arch, tp, served):
    result = served[arch, tp]
    assert "error" not in result, result["error"]
    assert result["ready_ranks"] == list(range(tp))
    assert result["accounted"] == tp  # every rank proved every byte written or local by rule
    assert result["ranks"] == (list(range(tp)), list(range(tp)))
    assert all(n > 0 for n in result["tensors"].values())
    assert result["differences"] == {rank: [] for rank in range(tp)}
    assert result["tokens"] == result["expected"]
