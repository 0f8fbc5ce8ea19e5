"""Bad --modelexpress-config values stop SGLang at start-up with the reason."""

import pytest

from tests.sglang.harness import TARGET_ARGS, SglangServer

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
    assert "ConfigError" in server.log and message in server.log
    assert "Load weight begin" not in server.log  # rejected before any scheduler started
