"""Mixed parallelism with real SGLang 0.5.23 on CPU: a seed of TP a feeds a target of TP b.

The target starts on other weights (checkpoint B, same shapes) under the seed's
model name: it can only generate the seed's tokens if every byte came from the seed,
cut and placed for its own layout.
"""

from sglang_mx.records import SourceStatus
from sglang_mx.sglang.launch import TARGET_ARGS, SglangServer, seed_args
from tests.sglang.conftest import require_sglang

require_sglang()

NAME = "reshard/tiny-llama"


def mx(server, **extra):
    # The target starts on other files (checkpoint B): both sides name the content alike (`checkpoint`).
    return {"url": server.address, "heartbeat_interval_s": 1, "model_name": NAME, "verify": "require",
            "checkpoint": NAME, **extra}


def reshard_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "modelexpress: resharded from a TP" in line]


def test_tp1_seed_feeds_a_tp2_target(tiny_model, checkpoint_b, mx_server, mx_client, servers):
    seed = SglangServer(tiny_model, *seed_args(), mx_config=mx(mx_server, source=True), name="seed-tp1")
    servers.append(seed)
    seed.wait_ready()
    expected = seed.generations()

    # Without any_layout a TP 2 target waits for a TP 2 seed, and there is none.
    strict = SglangServer(checkpoint_b, *TARGET_ARGS, tp=2, name="strict-tp2",
                          mx_config=mx(mx_server, any_layout=False, wait_timeout_s=2))
    servers.append(strict)
    assert strict.wait_exit() != 0
    assert "no READY seed could serve" in strict.log and "TP 2" in strict.log

    target = SglangServer(checkpoint_b, *TARGET_ARGS, tp=2, mx_config=mx(mx_server), name="target-tp2")
    servers.append(target)
    target.wait_ready()
    lines = reshard_lines(target.log)
    assert len(lines) == 2 and all("from a TP 1 seed instance to TP 2" in l for l in lines), target.log[-3000:]
    assert target.generations() == expected
    # Having pulled, the TP 2 target seeds its own layout (cascade), both ranks READY.
    ranks = {ref.worker_rank for ref in mx_client.list_sources(model_name=NAME, status=SourceStatus.READY)
             if ref.topology.get("mx_tp_size") == "2"}
    assert ranks == {0, 1}


def test_tp2_seed_feeds_a_tp1_target(tiny_model, checkpoint_b, mx_server, servers):
    seed = SglangServer(tiny_model, *seed_args(), tp=2, mx_config=mx(mx_server, source=True), name="seed-tp2")
    servers.append(seed)
    seed.wait_ready()
    expected = seed.generations()

    target = SglangServer(checkpoint_b, *TARGET_ARGS, mx_config=mx(mx_server), name="target-tp1")
    servers.append(target)
    target.wait_ready()
    lines = reshard_lines(target.log)
    assert len(lines) == 1 and "from a TP 2 seed instance to TP 1 rank 0" in lines[0], target.log[-3000:]
    assert "verified" in target.log
    assert target.generations() == expected
