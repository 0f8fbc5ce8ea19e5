"""--modelexpress-config parsing: defaults, env default, every rejection names the key."""

import pytest

from sglang_mx.config import MxConfig, parse_config
from sglang_mx.errors import ConfigError


def test_defaults_and_env_default_for_url():
    assert parse_config(None, env={}) == MxConfig()
    assert parse_config("", env={"MODEL_EXPRESS_URL": "mx:9000"}).url == "mx:9000"
    assert parse_config('{"url": "a:1"}', env={"MODEL_EXPRESS_URL": "mx:9000"}).url == "a:1"


def test_all_keys_parse():
    config = parse_config(
        '{"url": "h:1", "source": false, "model_name": "m", "revision": "r", "transport": "transfer_engine",'
        ' "wait_timeout_s": 2.5, "fallback": "disk", "max_candidates": 3, "heartbeat_interval_s": 5,'
        ' "timeout_s": 1}', env={})
    assert (config.url, config.source, config.model_name, config.revision) == ("h:1", False, "m", "r")
    assert (config.wait_timeout_s, config.fallback, config.max_candidates) == (2.5, "disk", 3)
    assert (config.heartbeat_interval_s, config.timeout_s) == (5, 1)


@pytest.mark.parametrize("raw, message", [
    ('{"urll": "x"}', "unknown --modelexpress-config key(s) 'urll'; allowed: url, source, model_name"),
    ('{"transport": "nixl"}', "transport 'nixl' is not supported by sglang-mx; allowed: 'transfer_engine'"),
    ('{"transport": "tcp"}', "transport 'tcp' is not supported; allowed: 'transfer_engine'"),
    ('{"fallback": "maybe"}', "fallback 'maybe' is not allowed; allowed: 'fail', 'disk'"),
    ('{"source": "yes"}', "key 'source' must be true or false, got \"yes\""),
    ('{"wait_timeout_s": true}', "key 'wait_timeout_s' must be a number, got true"),
    ('{"max_candidates": 1.5}', "key 'max_candidates' must be an integer, got 1.5"),
    ('{"max_candidates": 0}', "max_candidates=0 is out of range; allowed: an integer >= 1"),
    ('{"heartbeat_interval_s": 0}', "heartbeat_interval_s=0 is out of range"),
    ('{"wait_timeout_s": -1}', "wait_timeout_s=-1 is out of range"),
    ('{"model_name": " "}', "model_name is empty; leave it out to use --model-path"),
    ('{"url": ""}', "url is empty"),
    ('[1, 2]', "must be a JSON object, got list"),
    ('{"url": ', "--modelexpress-config is not valid JSON"),
])
def test_rejections_name_the_key_and_the_allowed_values(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={})
    assert message in str(info.value)


def test_zero_wait_is_allowed():
    assert parse_config('{"wait_timeout_s": 0}', env={}).wait_timeout_s == 0


def test_fleet_keys_parse_and_are_checked():
    config = parse_config('{"max_seeds": 3, "max_readers": 2, "reader_lease_s": 30}', env={})
    assert (config.max_seeds, config.max_readers, config.reader_lease_s) == (3, 2, 30)
    assert (MxConfig().max_seeds, MxConfig().max_readers) == (1, 0)
    for raw, message in [('{"max_seeds": 0}', "max_seeds=0 is out of range; allowed: an integer >= 1"),
                         ('{"max_readers": -1}', "max_readers=-1 is out of range; allowed: 0 (no cap of your own) to 4096"),
                         ('{"max_readers": 4097}', "max_readers=4097 is out of range; allowed: 0 (no cap of your own) to 4096"),
                         ('{"reader_lease_s": 0}', "reader_lease_s=0 is out of range"),
                         ('{"max_seeds": 1.5}', "key 'max_seeds' must be an integer, got 1.5")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            parse_config(raw, env={})


def test_any_layout_is_on_by_default_and_a_boolean():
    assert MxConfig().any_layout is True
    assert parse_config('{"any_layout": false}', env={}).any_layout is False
    with pytest.raises(ConfigError, match="key 'any_layout' must be true or false, got \"no\""):
        parse_config('{"any_layout": "no"}', env={})


def test_require_is_the_default_and_pins_are_manifest_ids():
    from sglang_mx.config import VerifyMode

    assert parse_config({}, env={}).verify is VerifyMode.REQUIRE
    m = "ab" * 32
    config = parse_config({"expect": [m], "digest": "blake3"}, env={})
    assert config.expect == (m,) and config.digest == "blake3" and not config.allow_weak_digests
    for raw, message in [({"expect": ["abc"]}, "expect holds 'abc', which is not a manifest id"),
                         ({"expect": m}, "key 'expect' must be a list of manifest ids"),
                         ({"expect": [m], "verify": "if_present"}, "expect pins digests, so it needs verify 'require'"),
                         ({"digest": "sha1"}, "digest 'sha1' is not an algorithm sglang-mx knows; allowed: xxh3-64, "
                                              "mxh64, blake3")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_config(raw, env={})
