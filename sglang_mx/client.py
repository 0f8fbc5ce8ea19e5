"""A typed client for the metadata server's four RPCs, and its source watch.

Every call has a deadline; UNAVAILABLE and DEADLINE_EXCEEDED are retried a
bounded number of times with exponential backoff, every other failure is raised
at once. Errors name the server and the RPC. A watch (`watch_sources`) is a
stream without a deadline, read by a thread of its own (`SourceWatch`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, TypeVar

import grpc

from sglang_mx import wire
from sglang_mx.credentials import TlsMaterial, bearer_metadata, check_token_transport, normalize_url
from sglang_mx.config import MxConfig
from sglang_mx.errors import RequestRejectedError, ServerError, ServerUnavailableError, WatchUnsupportedError
from sglang_mx.records import SourceEvent, SourceIdentity, SourceRef, SourceStatus, StoredWorker, WorkerRecord
from sglang_mx.tree import Waiting

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A watch that has started and breaks off with one of these is opened again (with backoff); any other
# code ends it. Before it started, only _WATCH_START_RETRYABLE codes are, and only the client's `retries`
# times: a burst of watches may find the server's call slots (or gRPC's queue: CANCELLED) full for a moment.
_WATCH_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
_WATCH_START_RETRYABLE = (*_RETRYABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)


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
        self._watch_stub = wire.MxWatchServiceStub(self._channel)

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
                      *, source_load: float | None = None, verified_bytes: int | None = None) -> None:
        """Set a worker's status (and, when given, the reads it is serving: `source_load`, and a
        pulling target's bytes verified so far: `verified_bytes`, shown as topology key
        `mx_verified_bytes` until the worker publishes again).

        Raises RequestRejectedError when the server refuses (it does not know the
        worker: restarted, or reaped it), ServerError when it cannot be reached.
        """
        request = wire.update_status_request(mx_source_id, worker_id, worker_rank, status, source_load,
                                             verified_bytes)
        response = self._call("UpdateStatus", self._stub.UpdateStatus, request)
        if not response.success:
            raise RequestRejectedError(f"{status.name} refused: {response.message}", url=self.url, rpc="UpdateStatus")

    def watch_sources(self, mx_source_id: str, *, worker_rank: int | None = None,
                      progress: bool = False, waiting: Waiting | None = None) -> "SourceWatch":
        """Watch the records of a source (of one rank, when given): every match now, then each change.

        Returns once the server accepted the watch (its first event arrived). With `progress`,
        changes of a pulling target's verified bytes alone are sent too. With `waiting` (a target
        waiting for a seed, sglang_mx.tree), our server sends after the snapshot only the changes
        that could give it a seed. Raises
        WatchUnsupportedError when the server has no watch (a ModelExpress server: poll
        ListSources instead), ServerError when it refuses or cannot be reached (after the
        client's retries). Close the watch (or use `with`).
        """
        request = wire.watch_request(mx_source_id, worker_rank=worker_rank, progress=progress, waiting=waiting)
        watch = SourceWatch(lambda: self._watch_stub.WatchSources(request, metadata=self._metadata),
                            url=self.url, backoff_s=self._backoff_s)
        try:
            watch.wait_started(self._timeout_s, retries=self._retries)
        except BaseException:
            watch.close()
            raise
        return watch

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


class SourceWatch:
    """An open WatchSources stream, read by a daemon thread; `wait` hands over what arrived.

    A stream the server breaks off (it restarts, fails over, ends it) is opened again with
    exponential backoff (up to `max_backoff_s`); every (re)opened stream first sends every
    matching record again, then an event with `snapshot_end`. A failure that retrying cannot
    mend (the server has no watch, refuses the token or the request) ends the watch: `wait`
    raises it. A context manager; `close()` ends the stream and the thread.
    """

    def __init__(self, open_stream: Callable[[], object], *, url: str, backoff_s: float = 0.2,
                 max_backoff_s: float = 5.0) -> None:
        self.url = url
        self._open_stream = open_stream
        self._backoff_s, self._max_backoff_s = backoff_s, max_backoff_s
        self._cond = threading.Condition()
        self._events: collections.deque[SourceEvent] = collections.deque()
        self._error: ServerError | None = None
        self._started = False  # a stream delivered its first event
        self._attempts = 0  # streams opened that failed before their first event
        self._last_failure = ("UNAVAILABLE", "")  # code name, details of the last one
        self._closed = threading.Event()
        self._call = None
        self.reconnects = 0  # streams opened again after one broke off
        self._thread = threading.Thread(target=self._run, name="mx-source-watch", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float) -> list[SourceEvent]:
        """Every event that arrived since the last call, waiting up to `timeout_s` for one; [] on
        timeout. Raises the error that ended the watch (after handing over what came before it)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._events and self._error is None and not self._closed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            if self._events:
                events = list(self._events)
                self._events.clear()
                return events
            if self._error is not None:
                raise self._error
            return []

    def wait_started(self, timeout_s: float, *, retries: int) -> None:
        """Wait until a stream delivered its first event (within `timeout_s` per attempt, at most
        `retries` more attempts); raise why not."""
        with self._cond:
            while not self._started and self._error is None:
                if self._attempts > retries:
                    code, details = self._last_failure
                    raise ServerUnavailableError(f"{details or code} after {self._attempts} attempt(s)", url=self.url,
                                                 rpc="WatchSources", code=code)
                if not self._cond.wait(timeout_s) and not self._started and self._error is None:
                    raise ServerUnavailableError(f"no answer within {timeout_s:g} s", url=self.url,
                                                 rpc="WatchSources", code="DEADLINE_EXCEEDED")
            if self._error is not None:
                raise self._error

    def _run(self) -> None:
        delay = self._backoff_s
        while not self._closed.is_set():
            call = self._open_stream()
            with self._cond:
                self._call = call
            if self._closed.is_set():  # close() came in between: it may have missed this call
                call.cancel()
                return
            delivered = False
            try:
                for message in call:
                    event = wire.source_event_from_pb(message)
                    with self._cond:
                        self._events.append(event)
                        self._started = delivered = True
                        self._cond.notify_all()
                failure = ("UNAVAILABLE", "the server ended the stream")
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                if e.code() not in (_WATCH_RETRYABLE if self._started else _WATCH_START_RETRYABLE):
                    self._fail(e)
                    return
                failure = (e.code().name, e.details() or "")
            if delivered:
                delay = self._backoff_s
            with self._cond:
                self._attempts += not self._started
                self._last_failure = failure
                self._cond.notify_all()
            log.debug("watch of %s broke off (%s: %s); opening it again in %.2f s", self.url, *failure, delay)
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, self._max_backoff_s)
            self.reconnects += self._started

    def _fail(self, e: grpc.RpcError) -> None:
        code = e.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            error: ServerError = WatchUnsupportedError(
                "the server has no MxWatchService (a ModelExpress server?); poll ListSources instead",
                url=self.url, rpc="WatchSources", code=code.name)
        else:
            error = ServerError(e.details() or str(code), url=self.url, rpc="WatchSources", code=code.name)
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        """End the stream and its thread. Idempotent."""
        self._closed.set()
        with self._cond:
            call = self._call
            self._cond.notify_all()
        if call is not None:
            call.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "SourceWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
