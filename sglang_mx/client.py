"""A typed client for the metadata server's four RPCs.

Every call has a deadline; UNAVAILABLE and DEADLINE_EXCEEDED are retried a
bounded number of times with exponential backoff, every other failure is raised
at once. Errors name the server and the RPC.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import grpc

from sglang_mx import wire
from sglang_mx.credentials import TlsMaterial, bearer_metadata, check_token_transport, normalize_url
from sglang_mx.config import MxConfig
from sglang_mx.errors import RequestRejectedError, ServerError, ServerUnavailableError
from sglang_mx.records import SourceIdentity, SourceRef, SourceStatus, StoredWorker, WorkerRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class MetadataClient:
    """Client of a P2pService. Close it (or use `with`) to release the channel.

    `auth_token`: sent as `authorization: Bearer <token>` on every call. Over
    plaintext it is only sent to a loopback address, unless
    `allow_plaintext_token=True`: anyone on the path could read it.
    `tls_ca_file`: a PEM CA bundle; the channel then uses TLS and checks the
    server's certificate against it (plaintext without it).
    `tls_cert_file` / `tls_key_file`: this client's certificate and key, for a
    server that requires them (mutual TLS; needs `tls_ca_file`). `tls`: the same,
    already read (`for_config` passes what `parse_config` read once).
    """

    @classmethod
    def for_config(cls, config: MxConfig) -> "MetadataClient":
        """A client of the configured server, with its deadline, token and TLS material as parsed."""
        return cls(config.url, timeout_s=config.timeout_s, auth_token=config.auth_token, tls=config.tls,
                   allow_plaintext_token=config.allow_plaintext_token)

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_message_mb: int = 256,
        auth_token: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        allow_plaintext_token: bool = False,
        tls: TlsMaterial | None = None,
    ) -> None:
        self.url = normalize_url(url)
        if tls is None:
            tls = TlsMaterial.read(tls_ca_file, tls_cert_file, tls_key_file)
        check_token_transport(self.url, token=auth_token is not None, tls=tls is not None,
                              allow_plaintext=allow_plaintext_token)
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._metadata = bearer_metadata(auth_token)
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        if tls is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                                       certificate_chain=tls.cert)
            self._channel = grpc.secure_channel(self.url, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.url, options=options)
        self._stub = wire.P2pServiceStub(self._channel)

    # --- RPCs -------------------------------------------------------------

    def publish(self, identity: SourceIdentity, worker: WorkerRecord, worker_id: str) -> str:
        """Publish one worker's record; return its mx_source_id."""
        request = wire.publish_request(identity, worker, worker_id)
        response = self._call("PublishMetadata", self._stub.PublishMetadata, request)
        if not response.success:
            raise RequestRejectedError(response.message, url=self.url, rpc="PublishMetadata")
        return response.mx_source_id

    def list_sources(
        self,
        identity: SourceIdentity | None = None,
        *,
        status: SourceStatus | None = None,
        worker_rank: int | None = None,
        model_name: str | None = None,
        limit: int | None = None,
    ) -> list[SourceRef]:
        """Workers matching the filters, newest first. READY means heartbeating now."""
        request = wire.list_request(identity, status=status, worker_rank=worker_rank, model_name=model_name,
                                    limit=limit)
        response = self._call("ListSources", self._stub.ListSources, request)
        return wire.refs_from_response(response, status or SourceStatus.UNKNOWN)

    def get_metadata(self, mx_source_id: str, worker_id: str) -> StoredWorker | None:
        """The worker's whole record, or None when the server does not know it."""
        response = self._call("GetMetadata", self._stub.GetMetadata, wire.get_request(mx_source_id, worker_id))
        return wire.stored_from_response(response, mx_source_id, worker_id)

    def update_status(self, mx_source_id: str, worker_id: str, worker_rank: int, status: SourceStatus,
                      *, source_load: float | None = None) -> None:
        """Set a worker's status (and, when given, the reads it is serving: `source_load`).

        Raises RequestRejectedError when the server refuses (it does not know the
        worker: restarted, or reaped it), ServerError when it cannot be reached.
        """
        request = wire.update_status_request(mx_source_id, worker_id, worker_rank, status, source_load)
        response = self._call("UpdateStatus", self._stub.UpdateStatus, request)
        if not response.success:
            raise RequestRejectedError(f"{status.name} refused: {response.message}", url=self.url, rpc="UpdateStatus")

    # --- plumbing ---------------------------------------------------------

    def _call(self, rpc: str, method: Callable[..., T], request) -> T:
        delay = self._backoff_s
        for attempt in range(self._retries + 1):
            try:
                return method(request, timeout=self._timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code()
                if code not in _RETRYABLE:
                    raise ServerError(e.details() or str(code), url=self.url, rpc=rpc, code=code.name) from e
                if attempt == self._retries:
                    raise ServerUnavailableError(
                        f"{e.details() or code.name} after {attempt + 1} attempt(s)",
                        url=self.url, rpc=rpc, code=code.name,
                    ) from e
                log.debug("%s to %s: %s, retrying in %.2f s", rpc, self.url, code.name, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def connect(self) -> bool:
        """Open the channel's connection now (within the deadline), so the first RPC need not;
        False when the server did not answer in time (the RPCs will then say why)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self._timeout_s)
            return True
        except grpc.FutureTimeoutError:
            return False

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MetadataClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
