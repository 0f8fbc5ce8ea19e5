"""Server-side authentication and roles: a gRPC interceptor in front of every service but health.

Tokens come from files, one token per line (`TOKEN`, or `NAME TOKEN` to name the
principal; blank lines and lines starting with '#' are skipped), each file with a
role: a reader token may call ListSources and GetMetadata (and watch sources:
MxWatchService.WatchSources), a writer token every RPC. A record is bound to the
principal that published it (see SourceStore.put); without a NAME the principal
is a fingerprint of the token, so rotating a named writer's token keeps its
records its own. The files are re-read when they change
(checked at most once a second) and on `reload()` (SIGHUP): a file that turns
bad keeps the tokens read before, with an error in the log.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import hashlib
import hmac
import logging
import os
import pathlib
import stat
import threading
import time
from typing import Callable, Sequence

import grpc

from sglang_mx.credentials import AUTH_METADATA_KEY, MAX_TOKEN_FILE_BYTES, check_token
from sglang_mx.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE = "/model_express.p2p.P2pService/"
WATCH_METHOD = "/model_express.p2p.MxWatchService/WatchSources"  # sglang-mx's own: reads, as ListSources
READ_METHODS = frozenset(SERVICE + m for m in ("ListSources", "GetMetadata")) | {WATCH_METHOD}
WRITE_METHODS = frozenset(SERVICE + m for m in ("PublishMetadata", "UpdateStatus"))
KNOWN_METHODS = READ_METHODS | WRITE_METHODS
# Load balancers and orchestrators probe health without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

_PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar("sglang_mx_principal", default="")


def current_principal() -> str:
    """Who makes the call being handled ("" when the server takes no tokens)."""
    return _PRINCIPAL.get()


class Access(enum.Enum):
    READER = "reader"  # ListSources, GetMetadata, WatchSources
    WRITER = "writer"  # every RPC


@dataclasses.dataclass(frozen=True)
class Credential:
    principal: str
    role: Access


@dataclasses.dataclass(frozen=True)
class TokenFile:
    path: str
    role: Access
    label: str = "auth token file"  # how messages name it


def read_token_lines(file: TokenFile) -> list[tuple[bytes, Credential]]:
    """The tokens of one file; ConfigError naming the file and line when it is unusable."""
    path, role, what = file.path, file.role, f"{file.label} {file.path!r}"
    try:
        info = os.stat(path)
        if info.st_size > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(f"{what} is {info.st_size} bytes; a token file holds at most {MAX_TOKEN_FILE_BYTES}")
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} cannot be read: {e}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("%s can be read by group or others (mode %o): chmod 600 it", what, stat.S_IMODE(info.st_mode))
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise ConfigError(f"{what} line {number}: expected 'TOKEN' or 'NAME TOKEN', found {len(words)} words "
                              "(spaces inside a token are not allowed)")
        token = check_token(words[-1], what=f"{what} line {number}")
        principal = words[0] if len(words) == 2 else "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]
        entries.append((token.encode(), Credential(principal, role)))
    if not entries:
        raise ConfigError(f"{what} is empty; put the token in it (one per line)")
    return entries


class TokenRegistry:
    """The tokens of several files, each with a role; re-read when a file changes.

    A token listed as both reader and writer is a writer.
    """

    def __init__(self, files: Sequence[TokenFile], *, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not files:
            raise ValueError("no token files")
        self._files = tuple(files)
        self._interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries = self._read()  # ConfigError at start-up
        self._signature = self._stat()
        self._checked = clock()

    def _read(self) -> tuple[tuple[bytes, Credential], ...]:
        entries = [e for file in self._files for e in read_token_lines(file)]
        entries.sort(key=lambda e: e[1].role is not Access.WRITER)  # writers first: they win a tie
        return tuple(entries)

    def _stat(self) -> tuple:
        out = []
        for file in self._files:
            try:
                s = os.stat(file.path)
                out.append((s.st_ino, s.st_size, s.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def reload(self) -> bool:
        """Read the files again now; keep the old tokens (and log why) if one is unusable."""
        with self._lock:
            self._signature = self._stat()
            self._checked = self._clock()
            try:
                entries = self._read()
            except ConfigError as e:
                log.error("token files not reloaded, the previous tokens stay in force: %s", e)
                return False
            self._entries = entries
        log.info("token files reloaded: %d reader, %d writer token(s)",
                 sum(c.role is Access.READER for _, c in entries), sum(c.role is Access.WRITER for _, c in entries))
        return True

    def maybe_reload(self) -> None:
        """Reload if a file changed since the last look (looking at most once per interval)."""
        if self._clock() - self._checked < self._interval_s:
            return
        self._checked = self._clock()
        if self._stat() != self._signature:
            self.reload()

    def lookup(self, token: bytes) -> Credential | None:
        """The credential of `token`; every token is compared, in constant time each."""
        found = None
        for expected, credential in self._entries:
            if hmac.compare_digest(token, expected) and found is None:
                found = credential
        return found


def token_problem(metadata: Sequence[tuple[str, str | bytes]] | None, expected: bytes) -> str | None:
    """Why `metadata` does not carry the token `expected`, or None when it does (one token, for tests)."""
    token = bearer_token(metadata)
    if isinstance(token, str):
        return token
    return None if hmac.compare_digest(token, expected) else "wrong bearer token"


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | str:
    """The token of `authorization: Bearer <token>` (the scheme in any case), or a str saying what is wrong."""
    values = [v for k, v in (metadata or ()) if k == AUTH_METADATA_KEY]
    if not values:
        return f"missing bearer token: send the metadata '{AUTH_METADATA_KEY}: Bearer <token>'"
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return f"malformed '{AUTH_METADATA_KEY}' metadata: expected 'Bearer <token>'"
    return token.encode("utf-8", "surrogateescape")


class AuthInterceptor(grpc.ServerInterceptor):
    """Runs before everything else: answers UNAUTHENTICATED to calls without a known token and
    PERMISSION_DENIED to a reader's write, before any handler is looked up; then runs the
    handler with `current_principal()` set. Methods under OPEN_METHOD_PREFIXES stay open.

    `on_refused(method, code, seconds)` is told of every refused call (metrics).
    """

    def __init__(self, registry: TokenRegistry,
                 on_refused: Callable[[str, grpc.StatusCode, float], None] | None = None) -> None:
        self._registry = registry
        self._on_refused = on_refused

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        start = time.perf_counter()
        self._registry.maybe_reload()
        token = bearer_token(handler_call_details.invocation_metadata)
        credential = None if isinstance(token, str) else self._registry.lookup(token)
        rpc = method.rsplit("/", 1)[-1]
        if credential is None:
            return self._deny(method, start, grpc.StatusCode.UNAUTHENTICATED,
                              f"{rpc}: unauthenticated: {token if isinstance(token, str) else 'wrong bearer token'}")
        if credential.role is Access.READER and method not in READ_METHODS:
            return self._deny(method, start, grpc.StatusCode.PERMISSION_DENIED,
                              f"{rpc}: permission denied: a reader token may call ListSources and GetMetadata "
                              "only (and WatchSources); use a writer token")
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior, principal = handler.unary_unary, credential.principal

        def as_principal(request, context):
            reset = _PRINCIPAL.set(principal)
            try:
                return behavior(request, context)
            finally:
                _PRINCIPAL.reset(reset)

        return handler._replace(unary_unary=as_principal)

    def _deny(self, method: str, start: float, code: grpc.StatusCode, message: str):
        on_refused = self._on_refused

        def deny(_request, context):
            if on_refused is not None:
                on_refused(method, code, time.perf_counter() - start)
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(deny)
