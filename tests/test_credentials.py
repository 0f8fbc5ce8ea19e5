"""Token and TLS files on the client side: `--modelexpress-config` keys auth_token_file and
tls_ca_file, read once at parse time, and the client the integration builds from them."""

from __future__ import annotations

import pytest

from sglang_mx.credentials import bearer_metadata
from sglang_mx.config import parse_config
from sglang_mx.errors import ConfigError
from sglang_mx.client import MetadataClient
from sglang_mx.records import SourceStatus


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("abc.DEF-123\n")
    return path


def test_token_file_is_read_at_parse_time_and_kept_out_of_repr(token_file):
    config = parse_config(f'{{"auth_token_file": "{token_file}"}}', env={})
    token_file.write_text("changed")  # read once: later edits do not matter
    assert config.auth_token == "abc.DEF-123"
    assert "abc.DEF-123" not in repr(config)
    assert config.auth_token_file == str(token_file)


def test_modelexpress_token_path_env_is_the_default(token_file, tmp_path):
    assert parse_config(None, env={"MX_AUTH_TOKEN_PATH": str(token_file)}).auth_token == "abc.DEF-123"
    other = tmp_path / "other"
    other.write_text("xyz")
    assert parse_config(f'{{"auth_token_file": "{other}"}}', env={"MX_AUTH_TOKEN_PATH": str(token_file)}
                        ).auth_token == "xyz"
    assert parse_config(None, env={}).auth_token is None


@pytest.mark.parametrize("content, message", [
    ("", "auth_token_file '{path}' is empty; put the shared token in it"),
    (" \n\t", "auth_token_file '{path}' is empty"),
    ("two words", "auth_token_file '{path}' holds characters a gRPC header cannot carry"),
])
def test_bad_token_files_are_config_errors(tmp_path, content, message):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        parse_config({"auth_token_file": str(path)}, env={})
    assert message.format(path=path) in str(info.value)


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"auth_token_file '.*absent' cannot be read"):
        parse_config({"auth_token_file": str(tmp_path / "absent")}, env={})
    with pytest.raises(ConfigError, match=r"tls_ca_file '.*absent' cannot be read"):
        parse_config({"tls_ca_file": str(tmp_path / "absent")}, env={})
    (tmp_path / "ca.txt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls_ca_file .* is not a PEM file"):
        parse_config({"tls_ca_file": str(tmp_path / "ca.txt")}, env={})
    with pytest.raises(ConfigError, match="key 'auth_token_file' must be a string, got 1"):
        parse_config('{"auth_token_file": 1}', env={})
    with pytest.raises(ConfigError, match="unknown --modelexpress-config key.*'auth_token'"):
        parse_config('{"auth_token": "x"}', env={})


def test_token_helpers():
    assert bearer_metadata(None) == ()
    assert bearer_metadata("t") == (("authorization", "Bearer t"),)
    with pytest.raises(ConfigError):
        bearer_metadata("")


def test_integration_client_carries_token_and_tls(make_server, tmp_path, make_identity, make_worker):
    pytest.importorskip("cryptography")
    from tests.certs import make_self_signed

    tls = make_self_signed(tmp_path / "tls")
    (tmp_path / "token").write_text("s3cret")
    server = make_server(auth_token_file=str(tmp_path / "token"), tls_cert_file=tls.cert, tls_key_file=tls.key)
    config = parse_config({"url": server.address, "auth_token_file": str(tmp_path / "token"),
                           "tls_ca_file": tls.cert}, env={})
    with MetadataClient.for_config(config) as client:
        source = client.publish(make_identity(), make_worker(status=SourceStatus.READY), "w0")
        assert [r.worker_id for r in client.list_sources(status=SourceStatus.READY)] == ["w0"]
        assert client.get_metadata(source, "w0") is not None
