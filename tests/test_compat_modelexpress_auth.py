"""The REAL ModelExpress 0.7.0 client against our server with a bearer token required (both stores).

ModelExpress's client reads its token from the file named by MX_AUTH_TOKEN_PATH and
sends `authorization: Bearer <token>` on every call (modelexpress/auth.py); our
server must accept exactly that, and refuse the same client without the right token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sglang_mx.client import MetadataClient
from sglang_mx.records import SourceStatus
from tests.test_compat_modelexpress import GOLDEN_ID, MX_SESSION, MX_TENSORS, MX_WORKER_ID, PEER

TOKEN = "mx-shared-token.0123456789"

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("modelexpress") is None,
                                 reason="modelexpress is not installed (pip install --no-deps modelexpress==0.7.0)"),
              pytest.mark.slow]  # the real ModelExpress client in processes of its own


def _run_peer(url: str, token_path: str | None) -> subprocess.CompletedProcess:
    spec = {"url": url, "publish": {"worker_id": MX_WORKER_ID, "worker_rank": 1, "session": MX_SESSION,
                                    "tensors": MX_TENSORS}}
    env = {k: v for k, v in os.environ.items() if k != "MX_AUTH_TOKEN_PATH"}
    if token_path is not None:
        env["MX_AUTH_TOKEN_PATH"] = token_path
    return subprocess.run([sys.executable, str(PEER)], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(params=["memory", "redis"])
def auth_server(request, make_server, tmp_path):
    (tmp_path / "server-token").write_text(TOKEN + "\n")
    store = {"store": request.param}
    if request.param == "redis":
        store.update(redis_url=request.getfixturevalue("redis_server").url,
                     redis_prefix=request.getfixturevalue("redis_prefix"))
    return make_server(auth_token_file=str(tmp_path / "server-token"), **store)


def test_modelexpress_client_with_the_token_is_served(auth_server, tmp_path):
    (tmp_path / "mx-token").write_text(TOKEN)  # ModelExpress strips it too
    done = _run_peer(auth_server.address, str(tmp_path / "mx-token"))
    assert done.returncode == 0, f"ModelExpress peer failed:\n{done.stderr[-4000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])["publish"]
    assert result["mx_source_id"] == GOLDEN_ID
    assert result["ready_after"] == [MX_WORKER_ID] and result["stale_ids"] == [MX_WORKER_ID]
    with MetadataClient(auth_server.address, auth_token=TOKEN, timeout_s=5) as client:
        stored = client.get_metadata(GOLDEN_ID, MX_WORKER_ID)
    assert stored is not None and stored.worker.status == SourceStatus.STALE
    assert [(t.name, t.addr, t.size, t.dtype) for t in stored.worker.tensors] == [tuple(t) for t in MX_TENSORS]


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token-file", "wrong-token"])
def test_modelexpress_client_without_the_token_is_refused(auth_server, tmp_path, token):
    path = None
    if token is not None:
        path = tmp_path / "mx-token"
        path.write_text(token)
    done = _run_peer(auth_server.address, str(path) if path else str(tmp_path / "absent"))
    assert done.returncode != 0
    assert "UNAUTHENTICATED" in done.stderr
    assert ("wrong bearer token" if token else "missing bearer token") in done.stderr
    with MetadataClient(auth_server.address, auth_token=TOKEN, timeout_s=5) as client:
        assert client.list_sources() == [], "a refused client must not have stored anything"


def test_modelexpress_client_with_a_writer_token_of_a_role_split_server(make_server, tmp_path):
    """Separate reader and writer tokens: ModelExpress's seed side works with a writer token and is
    refused with a reader token (PERMISSION_DENIED on its first publish)."""
    (tmp_path / "writers").write_text(f"mx-seeds {TOKEN}\n")
    (tmp_path / "readers").write_text("reader-token-0123\n")
    server = make_server(writer_token_file=str(tmp_path / "writers"), reader_token_file=str(tmp_path / "readers"))
    (tmp_path / "mx-token").write_text(TOKEN)
    done = _run_peer(server.address, str(tmp_path / "mx-token"))
    assert done.returncode == 0, f"ModelExpress peer failed:\n{done.stderr[-4000:]}"
    assert json.loads(done.stdout.strip().splitlines()[-1])["publish"]["stale_ids"] == [MX_WORKER_ID]
    (tmp_path / "mx-token").write_text("reader-token-0123")
    done = _run_peer(server.address, str(tmp_path / "mx-token"))
    assert done.returncode != 0 and "PERMISSION_DENIED" in done.stderr
