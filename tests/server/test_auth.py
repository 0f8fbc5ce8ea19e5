"""Bearer token and TLS on a live server: every P2pService RPC refused without the token,
health open, constant-time check, TLS with a certificate made at test time."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sglang_mx import wire
from sglang_mx.client import MetadataClient
from sglang_mx.errors import ConfigError, ServerError, ServerUnavailableError
from sglang_mx.server import MetadataServer, ServerOptions
from sglang_mx.server.auth import token_problem
from sglang_mx.records import SourceStatus

pb = wire.messages
TOKEN = "t0ken-Zm9vYmFy.~_+/="

RPCS = {
    "PublishMetadata": pb.PublishMetadataRequest(),
    "ListSources": pb.ListSourcesRequest(),
    "GetMetadata": pb.GetMetadataRequest(mx_source_id="0123456789abcdef", worker_id="w"),
    "UpdateStatus": pb.UpdateStatusRequest(mx_source_id="0123456789abcdef", status=2),
}


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")  # surrounding whitespace is not part of the token
    return str(path)


@pytest.fixture
def auth_server(make_server, token_file):
    return make_server(auth_token_file=token_file)


@pytest.fixture
def tls_files(tmp_path_factory):
    pytest.importorskip("cryptography")
    from tests.certs import make_self_signed

    return make_self_signed(tmp_path_factory.mktemp("tls"))


# --- the check itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata, problem", [
    ((), "missing bearer token"),
    ((("x-other", "1"),), "missing bearer token"),
    ((("authorization", "Basic abc"),), "malformed 'authorization' metadata: expected 'Bearer <token>'"),
    ((("authorization", "Bearer"),), "malformed"),
    ((("authorization", "Bearer nope"),), "wrong bearer token"),
    ((("authorization", "Bearer secre"),), "wrong bearer token"),
    ((("authorization", "Bearer secret"),), None),
    ((("authorization", "bearer  secret "),), None),  # scheme in any case, spaces trimmed
    ((("authorization", b"Bearer secret"),), None),
])
def test_token_problem(metadata, problem):
    found = token_problem(metadata, b"secret")
    assert found == problem if problem is None else problem in found


# --- live server --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rpc", list(RPCS))
@pytest.mark.parametrize("metadata, says", [
    (None, "missing bearer token"),
    ((("authorization", "Bearer wrong"),), "wrong bearer token"),
], ids=["missing", "wrong"])
def test_every_rpc_without_the_token_is_unauthenticated(auth_server, rpc, metadata, says):
    with grpc.insecure_channel(auth_server.address) as channel:
        method = getattr(wire.P2pServiceStub(channel), rpc)
        with pytest.raises(grpc.RpcError) as info:
            method(RPCS[rpc], timeout=5, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == f"{rpc}: unauthenticated: {says}" + (
        ": send the metadata 'authorization: Bearer <token>'" if says.startswith("missing") else "")


def test_client_with_the_token_works_and_without_it_fails_at_once(auth_server, make_identity, make_worker):
    with MetadataClient(auth_server.address, auth_token=TOKEN, timeout_s=5) as client:
        source = client.publish(make_identity(), make_worker(status=SourceStatus.INITIALIZING), "w0")
        client.update_status(source, "w0", 0, SourceStatus.READY)
        assert [r.worker_id for r in client.list_sources(status=SourceStatus.READY)] == ["w0"]
        assert client.get_metadata(source, "w0").worker.tensors == make_worker().tensors
    for token in (None, "wrong"):
        with MetadataClient(auth_server.address, auth_token=token, timeout_s=5) as client:
            with pytest.raises(ServerError) as info:
                client.list_sources()
        assert not isinstance(info.value, ServerUnavailableError), "UNAUTHENTICATED must not be retried"
        assert info.value.code == "UNAUTHENTICATED"


@pytest.mark.parametrize("service", ["", wire.SERVICE_NAME])
def test_health_stays_open_without_a_token(auth_server, service):
    with grpc.insecure_channel(auth_server.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_methods_are_refused_before_being_looked_up(auth_server):
    with grpc.insecure_channel(auth_server.address) as channel:
        call = channel.unary_unary("/model_express.p2p.WorkerService/PrepareTensorRead")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("content, says", [
    ("", "is empty"), ("  \n", "is empty"), ("# a comment only\n", "is empty"),
    ("a b c", "line 1: expected 'TOKEN' or 'NAME TOKEN', found 3 words"), ("ok\nt\u00e9", "line 2 holds characters"),
])
def test_bad_token_file_is_a_startup_error(tmp_path, content, says):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError, match=says):
        MetadataServer(ServerOptions(host="127.0.0.1", port=0, auth_token_file=str(path)))
    with pytest.raises(ConfigError, match="cannot be read"):
        MetadataServer(ServerOptions(host="127.0.0.1", port=0, auth_token_file=str(tmp_path / "absent")))


def test_cli_refuses_an_empty_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n")
    done = subprocess.run([sys.executable, "-m", "sglang_mx.cli", "server", "--host", "127.0.0.1", "--port", "0",
                           "--auth-token-file", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"auth token file {str(path)!r} is empty" in done.stderr


# --- TLS ----------------------------------------------------------------------------------------------

def test_tls_round_trip_with_token(make_server, tls_files, token_file, make_identity, make_worker):
    server = make_server(tls_cert_file=tls_files.cert, tls_key_file=tls_files.key, auth_token_file=token_file)
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        with MetadataClient(f"{host}:{server.port}", tls_ca_file=tls_files.cert, auth_token=TOKEN,
                            timeout_s=5) as client:
            source = client.publish(make_identity(), make_worker(), f"w-{host}")
            assert client.get_metadata(source, f"w-{host}").worker.tensors == make_worker().tensors
        with MetadataClient(f"{host}:{server.port}", tls_ca_file=tls_files.cert, timeout_s=5) as client:
            with pytest.raises(ServerError, match="UNAUTHENTICATED"):
                client.list_sources()


def test_plaintext_client_cannot_talk_to_a_tls_server(make_server, tls_files):
    server = make_server(tls_cert_file=tls_files.cert, tls_key_file=tls_files.key)
    with MetadataClient(server.address, timeout_s=1, retries=0) as client:
        with pytest.raises(ServerUnavailableError):
            client.list_sources()


def test_tls_client_rejects_a_certificate_it_does_not_trust(make_server, tls_files, tmp_path):
    from tests.certs import make_self_signed

    other = make_self_signed(tmp_path / "other", common_name="someone else")
    server = make_server(tls_cert_file=tls_files.cert, tls_key_file=tls_files.key)
    with MetadataClient(server.address, tls_ca_file=other.cert, timeout_s=1, retries=0) as client:
        with pytest.raises(ServerUnavailableError):
            client.list_sources()


def test_tls_options_are_checked(tls_files, tmp_path):
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        ServerOptions(tls_cert_file=tls_files.cert)
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="is not a PEM file"):
        MetadataServer(ServerOptions(host="127.0.0.1", port=0, tls_cert_file=str(not_pem), tls_key_file=tls_files.key))
    with pytest.raises(ConfigError, match="tls_ca_file .* cannot be read"):
        MetadataClient("127.0.0.1:1", tls_ca_file=str(tmp_path / "absent"))
