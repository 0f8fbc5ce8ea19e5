"""The shared bearer token and TLS files, read once and checked, for the server and its clients.

On the wire a token travels as the gRPC metadata `authorization: Bearer <token>`,
the header ModelExpress's own client sends when its token file is present
(`MX_AUTH_TOKEN_PATH`, default /var/run/secrets/tokens/modelexpress).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import pathlib
import stat

from sglang_mx.errors import ConfigError

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"  # gRPC metadata keys are lowercase
MX_TOKEN_PATH_ENV = "MX_AUTH_TOKEN_PATH"  # what ModelExpress's client reads


MAX_TOKEN_FILE_BYTES = 64 * 1024


def read_token_file(path: str, *, what: str = "auth token file") -> str:
    """The token in `path`, surrounding whitespace stripped; ConfigError if unreadable, empty or
    over MAX_TOKEN_FILE_BYTES. Warns when group or others may read it."""
    try:
        info = os.stat(path)
        if info.st_size > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(f"{what} {path!r} is {info.st_size} bytes; a token file holds at most "
                              f"{MAX_TOKEN_FILE_BYTES}")
        token = pathlib.Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path!r} cannot be read: {e}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("%s %r can be read by group or others (mode %o): chmod 600 it", what, path,
                    stat.S_IMODE(info.st_mode))
    if not token:
        raise ConfigError(f"{what} {path!r} is empty; put the shared token in it")
    return check_token(token, what=f"{what} {path!r}")


def check_token(token: str, *, what: str = "auth token") -> str:
    """`token` if a gRPC header can carry it (printable ASCII, no spaces inside); else ConfigError."""
    if not token or not all("!" <= c <= "~" for c in token):
        raise ConfigError(f"{what} holds characters a gRPC header cannot carry (spaces, line breaks, "
                          "control or non-ASCII characters); expected one token of printable ASCII")
    return token


def read_pem_file(path: str, *, what: str) -> bytes:
    """The bytes of a PEM file (certificate, key or CA bundle); ConfigError if unreadable or not PEM."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path!r} cannot be read: {e}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} {path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    return ((AUTH_METADATA_KEY, f"Bearer {check_token(token)}"),) if token is not None else ()


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, no port) names this machine only: localhost, 127/8, ::1."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    """The host part of 'host:port', '[v6]:port', 'unix:...' ('localhost' for unix sockets)."""
    if url.startswith(("unix:", "unix-abstract:")):
        return "localhost"
    if url.startswith("["):
        return url[1:].split("]", 1)[0]
    return url.rsplit(":", 1)[0] if url.count(":") == 1 else url


def normalize_url(url: str) -> str:
    """'grpc://host:port', 'http://host:port', 'dns:///host:port' or 'host:port' -> 'host:port'."""
    for scheme in ("grpc://", "http://", "dns:///"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


@dataclasses.dataclass(frozen=True)
class TlsMaterial:
    """A client's TLS files, read once: the CA bundle that checks the server, and (mutual TLS) its own
    certificate chain and key."""

    ca: bytes = dataclasses.field(repr=False)
    cert: bytes | None = dataclasses.field(default=None, repr=False)
    key: bytes | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def read(cls, ca_file: str | None, cert_file: str | None = None, key_file: str | None = None,
             ) -> "TlsMaterial | None":
        """The files' PEM bytes (None without a CA file); ConfigError for a bad combination or file."""
        check_tls_files(ca_file, cert_file, key_file)
        if ca_file is None:
            return None
        return cls(ca=read_pem_file(ca_file, what="tls_ca_file"),
                   cert=read_pem_file(cert_file, what="tls_cert_file") if cert_file else None,
                   key=read_pem_file(key_file, what="tls_key_file") if key_file else None)


def check_tls_files(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """The one rule for a client's TLS files: a certificate and its key go together, and with a CA."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("tls_cert_file and tls_key_file go together: give both (a client certificate) or neither")
    if cert_file is not None and ca_file is None:
        raise ConfigError("tls_cert_file (a client certificate) needs tls_ca_file: mutual TLS is TLS")


def check_token_transport(url: str, *, token: bool, tls: bool, allow_plaintext: bool) -> None:
    """The one rule for a client's token: it travels in plaintext only to a loopback address, unless
    `allow_plaintext` says so; ConfigError naming the way out otherwise."""
    if token and not tls and not allow_plaintext and not is_loopback(url_host(normalize_url(url))):
        raise ConfigError(
            f"refusing to send the auth token in plaintext to {normalize_url(url)}: the token would travel in "
            "plaintext; set tls_ca_file (TLS), or allow_plaintext_token: true on a network you trust")
