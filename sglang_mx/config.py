"""`--modelexpress-config`: one JSON object, parsed and validated once.

Unknown keys and bad values are rejected with a message that names the key and
what is allowed. Environment variables are read here only, as documented
defaults (MODEL_EXPRESS_URL, MX_AUTH_TOKEN_PATH).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any, Mapping

from sglang_mx.credentials import (
    MX_TOKEN_PATH_ENV, TlsMaterial, check_tls_files, check_token_transport, normalize_url, read_token_file,
)
from sglang_mx.errors import ConfigError
from sglang_mx.manifest import DIGEST_ALGORITHMS, is_manifest_id

DEFAULT_URL = "localhost:8001"
DEFAULT_CHUNK_BYTES = 64 << 20
"""A seed's chunk size (sglang_mx.chunks): a tensor larger than this publishes a digest per 64 MiB, so a pipelined
hop lags its parent by about 64 MiB's time on the link instead of its largest tensor's (an embedding is GBs)."""
CHUNK_ALIGN = 4096  # chunk_bytes is a multiple of this: chunks start on whole pages and digest blocks
MAX_LEASES = 4096  # the most live reader leases a seed holds, whatever max_readers says (0 included)
TRANSPORTS = ("transfer_engine",)
FALLBACKS = ("fail", "disk")


class VerifyMode(str, enum.Enum):
    """What a target checks its pulled bytes against (the rule: sglang_mx.target.verify)."""

    REQUIRE = "require"  # every byte against a published digest; a seed without one is not used
    IF_PRESENT = "if_present"  # against a digest where the seed published one
    OFF = "off"  # nothing is checked

    @property
    def checks(self) -> bool:
        return self is not VerifyMode.OFF


VERIFY_MODES = tuple(mode.value for mode in VerifyMode)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MxConfig:
    """The modelexpress backend's settings (README: "--modelexpress-config keys")."""

    url: str = DEFAULT_URL
    # Publish this instance's weights after loading. None: yes for an instance
    # that loaded through modelexpress, no for one that loaded from disk.
    source: bool | None = None
    model_name: str | None = None  # None: SGLang's --model-path
    revision: str = ""
    transport: str = "transfer_engine"
    wait_timeout_s: float = 60.0  # how long a target waits for a READY seed
    fallback: str = "fail"  # no usable seed: "fail" the start-up, or load from "disk"
    # After a pull, check every tensor against the seed's published digest: "require" (the default:
    # a seed without a digest for every byte, or with digests computed over bytes it never checked, is
    # not used), "if_present" (check what is published; for fleets whose metadata server drops our
    # fields), or "off".
    verify: VerifyMode = VerifyMode.REQUIRE  # parsed from its string value
    # Pinned weights: use only seeds whose manifest id (sglang_mx.manifest, `sglang-mx sources`) is
    # listed here. Their digests must be cryptographic (blake3) unless allow_weak_digests.
    expect: tuple[str, ...] = ()
    allow_weak_digests: bool = False
    # Seeds: the digest algorithm they publish ("" each device's default; "blake3" for pinning).
    digest: str = ""
    # Seeds: also publish a digest per chunk of this many bytes of every larger tensor (sglang_mx.chunks), so
    # pipelined targets serve it on chunk by chunk; 0: none. A cascading target republishes its seed's chunks.
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # What the checkpoint is by content, given by the operator ("" : computed, sglang_mx.checkpoint); for
    # targets that do not hold the checkpoint's files. Seeds and targets must name it alike.
    checkpoint: str = ""
    max_candidates: int = 5
    # Targets: read disjoint stripes from up to this many READY seeds at once.
    max_seeds: int = 1
    # Targets: when no seed of our own layout is READY, pull from a seed instance of the same model
    # in another TP layout (resharded, sglang_mx.target.reshard). Applies only where the planner can prove
    # the layouts (unquantized dense models, PP 1, EP 1); elsewhere it is off whatever it says.
    any_layout: bool = True
    # Seeds: serve at most this many reader leases at once (0: no cap); the count is reported as source_load.
    max_readers: int = 0
    # Targets: pipelined cascade (sglang_mx.target.pipeline). While pulling, publish ourselves as a partial
    # seed that serves each tensor once verified, and read from others that do; READY once complete.
    # Needs `source` (not false) and `verify` other than "off".
    pipeline: bool = False
    # Targets: wait for a seed on the metadata server's watch (told of each change that could give a seed)
    # rather than listing every second; a server without a watch (ModelExpress's) is polled either way.
    watch: bool = True
    reader_lease_s: float = 60.0  # a lease neither released nor renewed within this expires (target died)
    heartbeat_interval_s: float = 30.0
    timeout_s: float = 10.0  # per-RPC deadline
    # A file holding the metadata server's bearer token; `parse_config` reads (and checks) it, once.
    auth_token_file: str | None = None
    tls_ca_file: str | None = None  # PEM CA bundle: talk TLS to the server, checking its certificate
    # This client's PEM certificate and key, for a server that requires them (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Send the token over plaintext to a non-loopback server (anyone on the path can read it).
    allow_plaintext_token: bool = False
    # Not keys: what `parse_config` read from auth_token_file (kept out of repr and logs) and the TLS files.
    auth_token: str | None = dataclasses.field(default=None, repr=False, compare=False)
    tls: TlsMaterial | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("url is empty; expected host:port of the metadata server, e.g. localhost:8001")
        object.__setattr__(self, "url", normalize_url(self.url))
        if self.transport == "nixl":
            raise ConfigError(
                "transport 'nixl' is not supported by sglang-mx; allowed: 'transfer_engine' (Mooncake)"
            )
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport {self.transport!r} is not supported; allowed: 'transfer_engine'")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"fallback {self.fallback!r} is not allowed; allowed: 'fail', 'disk'")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"verify {self.verify!r} is not allowed; allowed: {', '.join(map(repr, VERIFY_MODES))}")
        object.__setattr__(self, "verify", VerifyMode(self.verify))
        object.__setattr__(self, "expect", tuple(self.expect))
        bad = [m for m in self.expect if not is_manifest_id(m)]
        if bad:
            raise ConfigError(f"expect holds {bad[0]!r}, which is not a manifest id; allowed: a list of 64 lowercase "
                              "hex digits as `sglang-mx sources --json` prints them (\"manifest\")")
        if self.expect and self.verify is not VerifyMode.REQUIRE:
            raise ConfigError(f"expect pins digests, so it needs verify 'require', not {self.verify.value!r}")
        if self.digest not in ("", *DIGEST_ALGORITHMS):
            raise ConfigError(f"digest {self.digest!r} is not an algorithm sglang-mx knows; allowed: "
                              f"{', '.join(DIGEST_ALGORITHMS)} (or leave it out: each device's default)")
        if self.chunk_bytes < 0 or self.chunk_bytes % CHUNK_ALIGN:
            raise ConfigError(f"chunk_bytes={self.chunk_bytes} is out of range; allowed: 0 (no chunk digests) or a "
                              f"positive multiple of {CHUNK_ALIGN}")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("model_name is empty; leave it out to use --model-path")
        for key in ("wait_timeout_s", "heartbeat_interval_s", "timeout_s", "reader_lease_s"):
            if getattr(self, key) < 0 or (key != "wait_timeout_s" and getattr(self, key) == 0):
                raise ConfigError(f"{key}={getattr(self, key)} is out of range; allowed: a positive number of seconds")
        if self.max_candidates < 1:
            raise ConfigError(f"max_candidates={self.max_candidates} is out of range; allowed: an integer >= 1")
        if self.max_seeds < 1:
            raise ConfigError(f"max_seeds={self.max_seeds} is out of range; allowed: an integer >= 1")
        if not 0 <= self.max_readers <= MAX_LEASES:
            raise ConfigError(f"max_readers={self.max_readers} is out of range; allowed: 0 (no cap of your own) "
                              f"to {MAX_LEASES}")
        if self.pipeline and self.source is False:
            raise ConfigError("pipeline serves this target's verified tensors while it pulls, so it needs source "
                              "true or left out, not false")
        if self.pipeline and self.verify is VerifyMode.OFF:
            raise ConfigError("pipeline serves only tensors this target verified, so it needs verify 'require' or "
                              "'if_present', not 'off'")
        check_tls_files(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        check_token_transport(self.url, token=self.auth_token_file is not None, tls=self.tls_ca_file is not None,
                              allow_plaintext=self.allow_plaintext_token)


_NUMBER = ((int, float), "a number")
_STRING = ((str,), "a string")
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "url": _STRING,
    "source": ((bool,), "true or false"),
    "model_name": _STRING,
    "revision": _STRING,
    "transport": _STRING,
    "wait_timeout_s": _NUMBER,
    "fallback": _STRING,
    "verify": _STRING,
    "expect": ((list,), "a list of manifest ids"),
    "allow_weak_digests": ((bool,), "true or false"),
    "digest": _STRING,
    "chunk_bytes": ((int,), "an integer"),
    "checkpoint": _STRING,
    "max_candidates": ((int,), "an integer"),
    "max_seeds": ((int,), "an integer"),
    "any_layout": ((bool,), "true or false"),
    "max_readers": ((int,), "an integer"),
    "pipeline": ((bool,), "true or false"),
    "watch": ((bool,), "true or false"),
    "reader_lease_s": _NUMBER,
    "heartbeat_interval_s": _NUMBER,
    "timeout_s": _NUMBER,
    "auth_token_file": _STRING,
    "tls_ca_file": _STRING,
    "tls_cert_file": _STRING,
    "tls_key_file": _STRING,
    "allow_plaintext_token": ((bool,), "true or false"),
}


def parse_config(raw: str | Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> MxConfig:
    """Parse `--modelexpress-config` (a JSON object string, a dict, or None).

    The one place that reads files for the config: the token file (its token is
    kept in `auth_token`) and the TLS files (checked to be PEM, kept in `tls`).
    """
    env = os.environ if env is None else env
    if raw is None or raw == "":
        values: dict[str, Any] = {}
    elif isinstance(raw, Mapping):
        values = dict(raw)
    else:
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--modelexpress-config is not valid JSON ({e.msg} at character {e.pos}): {raw!r}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--modelexpress-config must be a JSON object, got {type(values).__name__}: {raw!r}")
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise ConfigError(
            f"unknown --modelexpress-config key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_TYPES)}"
        )
    for key, value in values.items():
        allowed, label = _TYPES[key]
        # bool is an int in Python: reject true/false where a number is expected.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(f"--modelexpress-config key {key!r} must be {label}, got {json.dumps(value)}")
    if "url" not in values and env.get("MODEL_EXPRESS_URL"):
        values["url"] = env["MODEL_EXPRESS_URL"]
    # ModelExpress's own clients find their token file here: one setting for both.
    if "auth_token_file" not in values and env.get(MX_TOKEN_PATH_ENV):
        values["auth_token_file"] = env[MX_TOKEN_PATH_ENV]
    config = MxConfig(**values)  # checks the values before any file is touched
    tls = TlsMaterial.read(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
    token = read_token_file(config.auth_token_file, what="auth_token_file") if config.auth_token_file else None
    return dataclasses.replace(config, tls=tls, auth_token=token)


DEFAULTS = MxConfig()  # every default in one place: the options objects (PullOptions, SeedOptions) start from it
