"""roles.py: who loads from a peer, who publishes, when to fall back. Pure, no SGLang."""

import json

import pytest

from sglang_mx.config import parse_config
from sglang_mx.errors import ConfigError
from sglang_mx.roles import LaunchSettings, falls_back_to_disk, role_of


def settings(load_format="remote_instance", backend="modelexpress", config=None):
    return LaunchSettings(load_format=load_format, backend=backend,
                          modelexpress_config=None if config is None else json.dumps(config))


@pytest.mark.parametrize("launch, target, seed", [
    (settings(config={}), True, True),  # a target seeds too: the fleet seeds itself
    (settings(), True, True),  # no config at all: defaults
    (settings(config={"source": False}), True, False),
    (settings("auto", "nccl", {"source": True}), False, True),  # a disk-loaded seed
    (settings("safetensors", "nccl", {"source": True}), False, True),
])
def test_roles(launch, target, seed):
    role = role_of(launch)
    assert (role.target, role.seed, role.uses_backend) == (target, seed, True)
    assert role.config is not None


@pytest.mark.parametrize("launch", [
    settings("auto", "nccl"),  # not using the backend at all
    settings("auto", "nccl", {"url": "h:1"}),  # a config without source=true on a disk load
    settings("auto", "nccl", {"source": False}),
    settings("remote_instance", "nccl"),
])
def test_no_role(launch):
    role = role_of(launch)
    assert (role.config, role.target, role.seed, role.uses_backend) == (None, False, False, False)


@pytest.mark.parametrize("load_format", ["dummy", "remote_instance", "ipc_cache", "flash_rl", "private", "new_one"])
def test_only_weights_read_from_the_checkpoint_are_published(load_format):
    """`--load-format dummy` with source: true would publish random weights under the checkpoint's identity;
    remote_instance over another backend, IPC caches and RL updates are weights from elsewhere."""
    role = role_of(settings(load_format, "nccl", {"source": True}))
    assert (role.target, role.seed, role.uses_backend) == (False, False, False)
    assert role.config is not None  # SGLang's own publication stays off: the config asked for us
    assert f"--load-format {load_format} does not read the model's checkpoint" in role.why_not_seed
    assert "auto" in role.why_not_seed and "safetensors" in role.why_not_seed


def test_a_given_config_is_checked_even_when_it_does_nothing():
    with pytest.raises(ConfigError, match="unknown --modelexpress-config key"):
        role_of(settings("auto", "nccl", {"nope": 1}))
    with pytest.raises(ConfigError, match="fallback 'maybe' is not allowed"):
        role_of(settings(config={"fallback": "maybe"}))


def test_fallback_rule():
    assert falls_back_to_disk(parse_config({"fallback": "disk"}, env={}))
    assert not falls_back_to_disk(parse_config({}, env={}))


def test_reads_still_in_flight_never_fall_back_to_disk():
    """The dropped model's memory may still be written by a peer: no disk load may reuse it."""
    from sglang_mx.errors import ReadsInFlightError
    from sglang_mx.roles import load_with_fallback

    def pull(model):
        raise ReadsInFlightError("reads not drained", seed="s", ranges=[(0x1000, 64)])

    loaded = []
    with pytest.raises(ReadsInFlightError):
        load_with_fallback(lambda: "model", pull, lambda: loaded.append("disk"), fall_back=True, what="m")
    assert loaded == []
