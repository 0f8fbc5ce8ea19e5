"""A seed whose weights change in place stops seeding first, and seeds again only as what it now holds.

Real SGLang 0.5.23 on CPU: a seed loads checkpoint A, then `POST /update_weights_from_disk`
swaps in checkpoint B (same shapes). A target started for A must never get B's bytes; a
target started for B may load from that seed.
"""

import json
import urllib.request


from sglang_mx.records import SourceStatus
from sglang_mx.sglang.launch import TARGET_ARGS, SglangServer, seed_args
from tests.sglang.conftest import require_sglang

require_sglang()


def update_from_disk(server, model_path) -> dict:
    body = json.dumps({"model_path": str(model_path), "load_format": "auto"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/update_weights_from_disk", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


def statuses(client, model):
    return {ref.worker_id: client.get_metadata(ref.mx_source_id, ref.worker_id).worker.status
            for ref in client.list_sources(model_name=str(model))}


def test_update_from_disk_withdraws_then_republishes_under_the_new_checkpoint(
        tiny_model, checkpoint_b, mx_server, mx_client, servers):
    config = {"url": mx_server.address, "heartbeat_interval_s": 1}
    seed = SglangServer(tiny_model, *seed_args(), mx_config={**config, "source": True}, name="seed")
    disk_a = SglangServer(tiny_model, name="disk-a")
    servers += [seed, disk_a]
    seed.wait_ready()
    disk_a.wait_ready()
    tokens_a = disk_a.generations()
    assert seed.generations() == tokens_a
    disk_a.stop()
    [worker] = statuses(mx_client, tiny_model)

    result = update_from_disk(seed, checkpoint_b)
    assert result["success"], result
    tokens_b = seed.generations()
    assert tokens_b != tokens_a  # B's weights are served now
    assert statuses(mx_client, tiny_model) == {worker: SourceStatus.STALE}  # A's record: withdrawn
    assert statuses(mx_client, checkpoint_b) == {worker: SourceStatus.READY}  # republished as B
    assert "withdrawn from" in seed.log and "update_weights_from_disk" in seed.log

    # A target for A finds no seed of A (the only seed now holds B) and loads A from disk.
    target_a = SglangServer(tiny_model, *TARGET_ARGS, mx_config={**config, "wait_timeout_s": 2, "fallback": "disk",
                                                                 "source": False}, name="target-a")
    servers.append(target_a)
    target_a.wait_ready()
    assert "from disk instead (fallback=disk)" in target_a.log
    assert target_a.generations() == tokens_a

    # A target for B loads B from the seed.
    target_b = SglangServer(checkpoint_b, *TARGET_ARGS, mx_config={**config, "source": False}, name="target-b")
    servers.append(target_b)
    target_b.wait_ready()
    assert f"(worker {worker})" in target_b.log
    assert target_b.generations() == tokens_b
