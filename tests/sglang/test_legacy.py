"""sglang_mx.sglang.legacy's decisions (what the 0.5.10 patch calls), with 0.5.10-shaped stand-ins.

The rank facts and the publication itself are replaced by recorders here; the
real 0.5.10 objects are exercised in tests/legacy/test_sglang_0510.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sglang_mx.sglang import legacy as sglang_legacy
from sglang_mx.sglang import process
from sglang_mx.sglang import publish as publish_module
from sglang_mx.errors import ConfigError


def server_args(load_format="remote_instance", backend="modelexpress", config=None):
    return SimpleNamespace(load_format=load_format, remote_instance_weight_loader_backend=backend,
                           modelexpress_config=None if config is None else json.dumps(config))


@pytest.fixture
def published(monkeypatch):
    """Calls to sglang.publish.publish; each returns a publisher recording mark_ready."""
    calls = []

    class Publisher:
        worker_id, worker_rank, mx_source_id = "w", 0, "id"
        ready = False

        def mark_ready(self):
            self.ready = True

    def publish(model, te, session_id, info, role, *, instance_id, known_digests=None):
        calls.append(SimpleNamespace(model=model, te=te, session_id=session_id, info=info, config=role.config,
                                     known_digests=known_digests, publisher=Publisher()))
        return calls[-1].publisher

    monkeypatch.setattr(sglang_legacy, "_state", process.ProcessState())
    monkeypatch.setattr(sglang_legacy, "_rank_info", lambda model_config, device, server_args: ("rank info", device))
    monkeypatch.setattr(publish_module, "publish", publish)
    return calls


def runner(args, **overrides):
    fields = dict(server_args=args, model="the model", model_config="mc", device="cpu", is_draft_worker=False,
                  remote_instance_transfer_engine="te", remote_instance_transfer_engine_session_id="127.0.0.1:1")
    return SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("args, keys", [
    (server_args(config={"url": "h:1"}), {"url": "h:1", "model_name": None, "source": True}),
    (server_args(config={"url": "h:1", "source": False}), {"url": "h:1", "model_name": None, "source": False}),
    (server_args("auto", "nccl", {"url": "h:1", "source": True, "model_name": "m"}),
     {"url": "h:1", "model_name": "m", "source": True}),
    (server_args("auto", "nccl", {"url": "h:1"}), {}),
    (server_args("auto", "nccl"), {}),
])
def test_modelexpress_keys_drive_sglang_own_properties(args, keys):
    assert sglang_legacy.modelexpress_keys(args) == keys


def test_target_url_defaults_instead_of_sglang_falling_back_to_disk(monkeypatch):
    monkeypatch.delenv("MODEL_EXPRESS_URL", raising=False)
    assert sglang_legacy.modelexpress_keys(server_args(config={}))["url"] == "localhost:8001"


def test_check_server_args_rejects_bad_config_and_ignores_other_backends():
    with pytest.raises(ConfigError, match="unknown --modelexpress-config key"):
        sglang_legacy.check_server_args(server_args(config={"nope": 1}))
    sglang_legacy.check_server_args(server_args("auto", "nccl"))


def test_target_publishes_after_load_and_goes_ready_at_the_event_loop(published):
    sglang_legacy.publish_after_load(runner(server_args(config={"url": "h:1"})))
    [call] = published
    assert (call.model, call.te, call.session_id, call.info) == ("the model", "te", "127.0.0.1:1", ("rank info", "cpu"))
    assert call.config.url == "h:1"
    assert call.known_digests is None  # not pulled here: the seed hashes its weights itself
    assert not call.publisher.ready
    sglang_legacy.mark_ready()
    assert call.publisher.ready


def test_a_pulled_model_publishes_the_digests_its_pull_verified_and_goes_ready_at_once(published):
    model_runner = runner(server_args(config={"url": "h:1"}))
    sglang_legacy._state.pulled[id(model_runner.model)] = {"w": "xxh3-64:00000000000000aa"}
    sglang_legacy.publish_after_load(model_runner)
    [call] = published
    assert call.known_digests == {"w": "xxh3-64:00000000000000aa"}
    assert call.publisher.ready  # cascade: READY before the event loop


@pytest.mark.parametrize("args, overrides", [
    (server_args(config={"url": "h:1", "source": False}), {}),  # source=false
    (server_args("auto", "nccl", {"url": "h:1"}), {}),  # disk load, source unset
    (server_args("auto", "nccl"), {}),  # not using the backend at all
    (server_args(config={"url": "h:1"}), {"is_draft_worker": True}),  # a speculative draft model
])
def test_no_publication(published, args, overrides):
    sglang_legacy.publish_after_load(runner(args, **overrides))
    sglang_legacy.mark_ready()
    assert published == []


def test_disk_seed_with_source_true_publishes(published):
    sglang_legacy.publish_after_load(runner(server_args("auto", "nccl", {"url": "h:1", "source": True})))
    assert len(published) == 1
