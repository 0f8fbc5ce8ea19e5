"""Token roles, rotation without a restart, the token file's checks, safe defaults for
unauthenticated serving and plaintext tokens, mutual TLS, and metrics that only label known
methods."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.config import parse_config
from sglang_mx.errors import ConfigError, ServerError
from sglang_mx.records import SourceStatus
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.server.auth import Access, TokenFile, TokenRegistry

pb = wire.messages


def _write(path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except ServerError as e:
        return getattr(grpc.StatusCode, e.code)
    return grpc.StatusCode.OK


# --- roles ----------------------------------------------------------------------------------------------

def test_one_shared_token_file_still_does_everything(make_server, tmp_path, make_identity, make_worker):
    server = make_server(auth_token_file=_write(tmp_path / "t", "shared-token\n"))
    with MetadataClient(server.address, auth_token="shared-token", timeout_s=5) as client:
        source = client.publish(make_identity(), make_worker(status=SourceStatus.INITIALIZING), "w0")
        client.update_status(source, "w0", 0, SourceStatus.READY)
        assert [r.worker_id for r in client.list_sources(status=SourceStatus.READY)] == ["w0"]


def test_reader_and_writer_tokens(make_server, tmp_path, make_identity, make_worker):
    server = make_server(writer_token_file=_write(tmp_path / "w", "# seeds\nwriter-1\nwriter-2\n"),
                         reader_token_file=_write(tmp_path / "r", "reader-1\n"))
    with MetadataClient(server.address, auth_token="writer-2", timeout_s=5) as writer, \
            MetadataClient(server.address, auth_token="reader-1", timeout_s=5) as reader:
        source = writer.publish(make_identity(), make_worker(), "w0")
        assert reader.get_metadata(source, "w0").worker.tensors == make_worker().tensors
        assert [r.worker_id for r in reader.list_sources()] == ["w0"]
        assert _code(lambda: reader.publish(make_identity(), make_worker(), "r0")) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: reader.update_status(source, "w0", 0, SourceStatus.STALE)) == \
            grpc.StatusCode.PERMISSION_DENIED
        # two unnamed writer tokens are two principals: the other one may not change w0
        with MetadataClient(server.address, auth_token="writer-1", timeout_s=5) as other:
            assert _code(lambda: other.update_status(source, "w0", 0, SourceStatus.STALE)) == \
                grpc.StatusCode.PERMISSION_DENIED
        assert reader.get_metadata(source, "w0").worker.status == SourceStatus.READY


def test_a_named_writer_keeps_its_records_across_a_token_rotation(make_server, tmp_path, make_identity, make_worker):
    path = tmp_path / "w"
    server = make_server(writer_token_file=_write(path, "seeds old-token\n"))
    with MetadataClient(server.address, auth_token="old-token", timeout_s=5) as old:
        source = old.publish(make_identity(), make_worker(status=SourceStatus.INITIALIZING), "w0")
    _write(path, "seeds old-token\nseeds new-token\n")  # rotation: both valid for a while
    assert server.reload_tokens()
    _write(path, "seeds new-token\n")
    assert server.reload_tokens()
    with MetadataClient(server.address, auth_token="new-token", timeout_s=5) as new:
        new.update_status(source, "w0", 0, SourceStatus.READY)
        assert new.get_metadata(source, "w0").worker.status == SourceStatus.READY
    with MetadataClient(server.address, auth_token="old-token", timeout_s=5) as old:
        assert _code(old.list_sources) == grpc.StatusCode.UNAUTHENTICATED


# --- rotation -------------------------------------------------------------------------------------------

def test_a_changed_token_file_is_picked_up_without_a_restart(make_server, tmp_path, wait_for):
    path = tmp_path / "t"
    server = make_server(auth_token_file=_write(path, "first\n"))
    with MetadataClient(server.address, auth_token="first", timeout_s=5) as first, \
            MetadataClient(server.address, auth_token="second", timeout_s=5) as second:
        assert _code(first.list_sources) == grpc.StatusCode.OK
        _write(path, "second-token-is-longer\nsecond\n")
        wait_for(lambda: _code(second.list_sources) == grpc.StatusCode.OK, timeout_s=10, what="the new token")
        assert _code(first.list_sources) == grpc.StatusCode.UNAUTHENTICATED
        _write(path, "")  # a file that turns bad keeps the tokens read before
        time.sleep(1.2)
        assert _code(second.list_sources) == grpc.StatusCode.OK
        assert server.reload_tokens() is False


def test_sighup_reloads_the_token_files(tmp_path, unused_port):
    from tests.test_cli_server import _server_cmd, _wait_serving

    path = tmp_path / "t"
    _write(path, "before\n")
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_server_cmd("--host", "127.0.0.1", "--port", str(unused_port), "--auth-token-file",
                                            str(path)), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(f"127.0.0.1:{unused_port}", proc)
        _write(path, "after\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "token files reloaded" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        with MetadataClient(f"127.0.0.1:{unused_port}", auth_token="after", timeout_s=5) as client:
            assert client.list_sources() == []
        with MetadataClient(f"127.0.0.1:{unused_port}", auth_token="before", timeout_s=5) as client:
            assert _code(client.list_sources) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_registry_checks_for_changes_at_most_once_per_interval(tmp_path):
    now = [0.0]
    path = tmp_path / "t"
    registry = TokenRegistry([TokenFile(_write(path, "one\n"), Access.WRITER)], check_interval_s=1.0,
                             clock=lambda: now[0])
    _write(path, "two-two\n")
    registry.maybe_reload()
    assert registry.lookup(b"one") is not None  # not looked at yet
    now[0] = 1.0
    registry.maybe_reload()
    assert registry.lookup(b"one") is None and registry.lookup(b"two-two").role is Access.WRITER


# --- the token file's checks ----------------------------------------------------------------------------

def test_token_file_size_limit_and_mode_warning(tmp_path, caplog):
    big = tmp_path / "big"
    big.write_text("t" * 70_000)
    with pytest.raises(ConfigError, match="is 70000 bytes; a token file holds at most 65536"):
        MetadataServer(ServerOptions(host="127.0.0.1", port=0, auth_token_file=str(big)))
    loose = tmp_path / "loose"
    loose.write_text("tok\n")
    loose.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="sglang_mx.server.auth"):
        TokenRegistry([TokenFile(str(loose), Access.READER, "reader token file")])
    assert f"reader token file {str(loose)!r} can be read by group or others (mode 644): chmod 600 it" in caplog.text


# --- safe defaults --------------------------------------------------------------------------------------

def test_serving_beyond_loopback_without_a_token_needs_an_explicit_choice(caplog):
    with pytest.raises(ConfigError, match="pass --allow-unauthenticated to choose it"):
        MetadataServer(ServerOptions(host="0.0.0.0", port=0))
    # Chosen: it gets past the check (and logs it loudly); 192.0.2.1 (TEST-NET) is no address of
    # this machine, so the bind fails and nothing ever listens beyond loopback.
    with caplog.at_level(logging.WARNING, logger="sglang_mx.server.app"):
        with pytest.raises(ConfigError, match="cannot listen on 192.0.2.1"):
            MetadataServer(ServerOptions(host="192.0.2.1", port=0, allow_unauthenticated=True))
    assert "SERVING 192.0.2.1 WITHOUT AUTHENTICATION" in caplog.text


def test_cli_refuses_a_public_address_without_a_token():
    done = subprocess.run([sys.executable, "-m", "sglang_mx.cli", "server", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 2 and "--allow-unauthenticated" in done.stderr


PLAINTEXT_TOKENS = "with tokens but without TLS lets anyone on the network read the tokens callers send: give " \
                   "--tls-cert and --tls-key, listen on 127.0.0.1, or pass --allow-plaintext-tokens to choose it"


@pytest.mark.parametrize("files", [{"auth_token_file": "t"}, {"writer_token_file": "w"}, {"reader_token_file": "r"}])
def test_a_server_with_tokens_beyond_loopback_needs_tls_or_an_explicit_choice(tmp_path, files):
    files = {key: _write(tmp_path / name, "tok\n") for key, name in files.items()}
    with pytest.raises(ConfigError, match=f"^serving 0.0.0.0 {PLAINTEXT_TOKENS}"):
        ServerOptions(host="0.0.0.0", port=0, **files)
    with pytest.raises(ConfigError, match="--allow-plaintext-tokens"):
        MetadataServer(ServerOptions(host="10.1.2.3", port=0, **files))
    for host in ("127.0.0.1", "localhost", "::1"):  # loopback: nothing crosses a network
        ServerOptions(host=host, port=0, **files)
    ServerOptions(host="0.0.0.0", port=0, tls_cert_file="c.pem", tls_key_file="k.pem", **files)  # TLS
    # Chosen: it gets past the check; 192.0.2.1 (TEST-NET) is no address of this machine.
    with pytest.raises(ConfigError, match="cannot listen on 192.0.2.1"):
        MetadataServer(ServerOptions(host="192.0.2.1", port=0, allow_plaintext_tokens=True, **files))


def test_cli_refuses_tokens_in_plaintext_beyond_loopback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sglang_mx.cli", "server", "--host", "0.0.0.0", "--port", "0",
                           "--writer-token-file", _write(tmp_path / "w", "tok\n")],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 2 and f"sglang-mx: error: serving 0.0.0.0 {PLAINTEXT_TOKENS}" in done.stderr


def test_clients_refuse_to_send_a_token_in_plaintext_beyond_loopback(tmp_path):
    with pytest.raises(ConfigError, match="refusing to send the auth token in plaintext to 10.1.2.3:8001"):
        MetadataClient("10.1.2.3:8001", auth_token="tok")
    MetadataClient("10.1.2.3:8001", auth_token="tok", allow_plaintext_token=True).close()  # chosen; no call made
    for url in ("localhost:8001", "127.0.0.1:8001", "[::1]:8001", "grpc://127.0.0.2:9"):
        MetadataClient(url, auth_token="tok").close()
    token = _write(tmp_path / "tok", "tok\n")
    with pytest.raises(ConfigError, match="the token would travel in plaintext"):
        parse_config({"url": "mx.example:8001", "auth_token_file": token}, env={})
    assert parse_config({"url": "mx.example:8001", "auth_token_file": token, "allow_plaintext_token": True},
                        env={}).auth_token == "tok"


# --- mutual TLS -----------------------------------------------------------------------------------------

def test_mutual_tls_requires_a_client_certificate(make_server, tmp_path, make_identity, make_worker):
    pytest.importorskip("cryptography")
    from tests.certs import make_self_signed

    server_tls = make_self_signed(tmp_path / "server")
    client_tls = make_self_signed(tmp_path / "client", common_name="sglang-mx test client")
    server = make_server(tls_cert_file=server_tls.cert, tls_key_file=server_tls.key,
                         tls_client_ca_file=client_tls.cert, auth_token_file=_write(tmp_path / "t", "tok\n"))
    address = f"localhost:{server.port}"
    with MetadataClient(address, auth_token="tok", tls_ca_file=server_tls.cert, tls_cert_file=client_tls.cert,
                        tls_key_file=client_tls.key, timeout_s=5) as client:
        source = client.publish(make_identity(), make_worker(), "w0")
        assert client.get_metadata(source, "w0") is not None
    with MetadataClient(address, auth_token="tok", tls_ca_file=server_tls.cert, timeout_s=2, retries=0) as client:
        assert _code(client.list_sources) == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    with pytest.raises(ConfigError, match="tls_client_ca_file"):
        ServerOptions(tls_client_ca_file=client_tls.cert)


# --- metrics --------------------------------------------------------------------------------------------

def test_made_up_method_names_make_no_metrics_series(make_server, tmp_path):
    pytest.importorskip("prometheus_client")
    from tests.server.test_metrics import scrape

    server = make_server(metrics_port=0, auth_token_file=_write(tmp_path / "t", "tok\n"))
    with grpc.insecure_channel(server.address) as channel:
        for i in range(5):
            for metadata in (None, (("authorization", "Bearer tok"),)):
                with pytest.raises(grpc.RpcError):
                    channel.unary_unary(f"/made.up/Method{i}")(b"", timeout=5, metadata=metadata)
        with pytest.raises(grpc.RpcError):
            wire.P2pServiceStub(channel).ListSources(pb.ListSourcesRequest(), timeout=5)
    labels = {dict(labels)["rpc"] for (name, labels) in scrape(server.metrics_port)
              if name == "sglang_mx_rpc_requests_total"}
    assert labels == {"other", "ListSources"}, labels
