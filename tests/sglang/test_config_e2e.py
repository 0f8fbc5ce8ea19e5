"""Bad --modelexpress-config values stop SGLang's launcher at start-up with the reason."""

import pytest

from sglang_mx.sglang.launch import TARGET_ARGS, SglangServer, seed_args
from tests.sglang.conftest import require_sglang

require_sglang()

TARGET = TARGET_ARGS


@pytest.mark.parametrize("config, message", [
    ({"url": "127.0.0.1:1", "wait": 3}, "unknown --modelexpress-config key(s) 'wait'; allowed: url, source"),
    ({"url": "127.0.0.1:1", "wait_timeout_s": "soon"}, "key 'wait_timeout_s' must be a number, got \"soon\""),
    ({"url": "127.0.0.1:1", "transport": "nixl"}, "transport 'nixl' is not supported by sglang-mx"),
])
def test_config_errors_exit_at_startup(tiny_model, servers, config, message):
    server = SglangServer(tiny_model, *TARGET, mx_config=config, name="bad-config")
    servers.append(server)
    assert server.wait_exit(timeout_s=120) != 0
    log = server.log
    assert "ConfigError" in log and message in log
    # Raised in the launcher, by its check of the server arguments: no scheduler ever started.
    assert "in _launch_subprocesses" in log and "in _before_server_args_check" in log, log[-3000:]
    assert "Scheduler hit an exception" not in log and "Load weight begin" not in log


def test_an_instance_with_dummy_weights_never_publishes(tiny_model, mx_server, mx_client, servers):
    """`--load-format dummy` with source: true would publish random weights under the checkpoint's
    identity; it serves (its own business) but publishes nothing, and says why."""
    server = SglangServer(tiny_model, *seed_args(), "--load-format", "dummy", name="dummy-seed",
                          mx_config={"url": mx_server.address, "source": True, "heartbeat_interval_s": 1})
    servers.append(server)
    server.wait_ready()
    assert "not publishing this instance: --load-format dummy does not read the model's checkpoint" in server.log
    assert mx_client.list_sources() == []
    assert len(server.generate([5, 17, 99])) == 12
