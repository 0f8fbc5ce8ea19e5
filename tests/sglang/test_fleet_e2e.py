"""Real SGLang 0.5.23 instances seeding and loading through the modelexpress backend."""

import time

from sglang_mx.records import SourceStatus
from sglang_mx.sglang.launch import TARGET_ARGS, SglangServer, seed_args
from tests.sglang.conftest import HEARTBEAT_TIMEOUT_S, require_sglang

require_sglang()

TARGET = TARGET_ARGS


def mx(server, **extra):
    return {"url": server.address, "heartbeat_interval_s": 1, **extra}


def workers(client, model, status=None):
    """worker_id -> status of every published rank of `model`."""
    refs = client.list_sources(model_name=model)
    found = {}
    for ref in refs:
        stored = client.get_metadata(ref.mx_source_id, ref.worker_id)
        if stored is not None:
            found[ref.worker_id] = stored.worker.status
    return {w: s for w, s in found.items() if status is None or s == status}


def ready_worker_of(server_log: str) -> str:
    marker = "modelexpress: worker "
    line = next(l for l in server_log.splitlines() if marker in l and "is READY" in l)
    return line.split(marker, 1)[1].split()[0]


def test_tp1_fleet_seeds_itself_and_serves_identical_tokens(tiny_model, mx_server, mx_client, servers):
    model = str(tiny_model)
    seed = SglangServer(tiny_model, *seed_args(), mx_config=mx(mx_server, source=True), name="seed")
    disk = SglangServer(tiny_model, name="disk-only")
    servers += [seed, disk]
    seed.wait_ready()
    disk.wait_ready()
    seed_worker = ready_worker_of(seed.log)

    target = SglangServer(tiny_model, *TARGET, mx_config=mx(mx_server), name="target")
    servers.append(target)
    target.wait_ready()
    assert f"(worker {seed_worker})" in target.log  # pulled from the seed
    expected = disk.generations()
    assert seed.generations() == expected
    assert target.generations() == expected
    target_worker = ready_worker_of(target.log)  # the target seeds too
    assert workers(mx_client, model, SourceStatus.READY).keys() == {seed_worker, target_worker}

    # An identity that differs (dtype) is never paired, even with READY seeds around.
    other = SglangServer(tiny_model, *TARGET, "--dtype", "float32",
                         mx_config=mx(mx_server, wait_timeout_s=2), name="float32-target")
    servers.append(other)
    assert other.wait_exit() != 0
    assert "no READY seed could serve" in other.log and "dtype float32" in other.log

    # SIGTERM: the seed is STALE at once; the next instance loads from the target.
    seed.terminate()
    assert workers(mx_client, model)[seed_worker] == SourceStatus.STALE
    disk.stop()
    third = SglangServer(tiny_model, *TARGET, mx_config=mx(mx_server), name="third")
    servers.append(third)
    third.wait_ready()
    assert f"(worker {target_worker})" in third.log
    assert third.generations() == expected

    # SIGKILL: no goodbye; the READY filter drops them after the heartbeat timeout.
    target.kill()
    third.kill()
    time.sleep(HEARTBEAT_TIMEOUT_S + 1)
    assert workers(mx_client, model, SourceStatus.READY) == {}
    late = SglangServer(tiny_model, *TARGET, mx_config=mx(mx_server, wait_timeout_s=2), name="late")
    servers.append(late)
    assert late.wait_exit() != 0
    assert "NoSourceError: no READY seed could serve" in late.log
    assert mx_server.address in late.log


def test_fallback_to_disk_then_serves_as_seed(tiny_model, mx_server, mx_client, servers):
    config = mx(mx_server, model_name="fleet/fallback", wait_timeout_s=1, fallback="disk")
    # --model-loader-extra-config is for the disk loaders: the dummy build must not get it, the fallback must.
    extra = ["--model-loader-extra-config", '{"enable_multithread_load": false}']
    first = SglangServer(tiny_model, *TARGET, *extra, mx_config=config, name="fallback")
    servers.append(first)
    first.wait_ready()
    assert "loading" in first.log and "from disk instead (fallback=disk)" in first.log
    first_worker = ready_worker_of(first.log)
    assert workers(mx_client, "fleet/fallback", SourceStatus.READY).keys() == {first_worker}

    second = SglangServer(tiny_model, *TARGET, *extra, mx_config=mx(mx_server, model_name="fleet/fallback"),
                          name="from-fallback")
    servers.append(second)
    second.wait_ready()
    assert f"(worker {first_worker})" in second.log
    assert second.generations() == first.generations()


def test_no_seed_and_fallback_fail_names_identity_and_server(tiny_model, mx_server, servers):
    target = SglangServer(tiny_model, *TARGET, mx_config=mx(mx_server, model_name="fleet/none", wait_timeout_s=1),
                          name="no-seed")
    servers.append(target)
    assert target.wait_exit() != 0
    assert "no READY seed could serve 'fleet/none', TP 1 PP 1 EP 1, dtype bfloat16" in target.log
    assert f"on metadata server {mx_server.address}" in target.log


def test_tp2_rank_pulls_from_rank(tiny_model, mx_server, mx_client, servers):
    seed = SglangServer(tiny_model, *seed_args(), tp=2, mx_config=mx(mx_server, source=True), name="seed-tp2")
    servers.append(seed)
    seed.wait_ready()
    target = SglangServer(tiny_model, *TARGET, tp=2, mx_config=mx(mx_server), name="target-tp2")
    servers.append(target)
    target.wait_ready()
    pulls = [l for l in target.log.splitlines() if "modelexpress: pulled" in l]
    assert len(pulls) == 2, target.log[-3000:]
    ranks = {}
    for ref in mx_client.list_sources(model_name=str(tiny_model), status=SourceStatus.READY):
        ranks.setdefault(ref.worker_rank, set()).add(ref.worker_id)
    assert sorted(ranks) == [0, 1] and all(len(w) == 2 for w in ranks.values())  # seed and target, per rank
    assert target.generations() == seed.generations()


def test_a_pipelined_target_serves_while_it_pulls_and_is_adopted_as_its_ranks_seed(
        tiny_model, mx_server, mx_client, servers):
    """config `pipeline`: the target publishes itself as a partial seed during its pull, ends READY on the
    same worker, and SGLang's publication step adopts that publisher (one record, no second seed). The seed
    publishes chunk digests (64 KiB: the embedding and MLP weights are cut), so the target verifies and serves
    on the model's larger tensors chunk by chunk, and republishes its seed's chunks (same manifest)."""
    model = str(tiny_model)
    seed = SglangServer(tiny_model, *seed_args(), mx_config=mx(mx_server, source=True, chunk_bytes=65536), name="seed")
    servers.append(seed)
    seed.wait_ready()
    seed_worker = ready_worker_of(seed.log)
    expected = seed.generations()

    target = SglangServer(tiny_model, *TARGET, mx_config=mx(mx_server, pipeline=True, max_readers=1),
                          name="pipelined")
    servers.append(target)
    target.wait_ready()
    assert f"(worker {seed_worker})" in target.log
    assert "pipelined: serving verified tensors as partial seed" in target.log
    assert "pipelined pull in chunks:" in target.log
    assert "has served its verified tensors since its pull began and is READY" in target.log
    assert target.generations() == expected
    ready = workers(mx_client, model, SourceStatus.READY)
    assert len(ready) == 2 and seed_worker in ready  # the target's one record, READY
    [target_worker] = set(ready) - {seed_worker}
    records = {r.worker_id: r for r in mx_client.list_sources(model_name=model)}
    assert records[target_worker].topology["mx_manifest"] == records[seed_worker].topology["mx_manifest"]
    chunked = [t for t in mx_client.get_metadata(records[target_worker].mx_source_id, target_worker).worker.tensors
               if t.chunks]
    assert chunked and all(t.chunk_bytes == 65536 for t in chunked)

    seed.terminate()
    child = SglangServer(tiny_model, *TARGET, mx_config=mx(mx_server, pipeline=True), name="child")
    servers.append(child)
    child.wait_ready()
    assert f"(worker {target_worker})" in child.log
    assert "pipelined pull in chunks:" in child.log
    assert child.generations() == expected
