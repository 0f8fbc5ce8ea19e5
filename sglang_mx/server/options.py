"""The metadata server's settings: one frozen object, validated once; its defaults are the CLI's."""

from __future__ import annotations

import dataclasses

from sglang_mx.credentials import is_loopback
from sglang_mx.errors import ConfigError

DEFAULT_PORT = 8001
STORE_KINDS = ("memory", "redis")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REDIS_PREFIX = "mx:"
DEFAULT_MAX_TENSORS = 1_000_000  # per published worker
DEFAULT_MAX_RECORD_MB = 64  # a 100,000-tensor worker is about 9 MB
# Per principal (a writer token, or its NAME; without tokens, every writer together). One token
# often stands for a whole fleet of seeds: 65,536 records is 8,192 nodes of 8 GPUs, and 16 GiB
# holds 1,800 workers of 100,000 tensors (9 MB each) or about 150,000 of 1,000 tensors (110 KB).
# Far below what --max-sources x --max-workers-per-source would let one writer fill.
DEFAULT_MAX_RECORDS_PER_PRINCIPAL = 65_536
DEFAULT_MAX_MB_PER_PRINCIPAL = 16_384
# `sglang-mx server`'s --bulk-nice: only a saturated CPU sees a difference (README, "The metadata
# server", has the measurements).
SERVING_BULK_NICE = 19


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0 picks a free port
    heartbeat_timeout_s: float = 90.0
    reaper_interval_s: float = 30.0
    gc_timeout_s: float = 3600.0
    max_message_mb: int = 256
    # Threads answering GetMetadata and PublishMetadata; None: 2 for the memory store, 4 for
    # Redis. Few: they share one GIL, and every thread more takes turns from the listing
    # threads (README, "The metadata server", has the measurements).
    workers: int | None = None
    # How much lower these threads' CPU priority is than the process's (Linux: each thread has
    # its own nice value; elsewhere ignored). When the server's CPU is saturated, the kernel
    # then runs the threads that accept calls, list and heartbeat first, so a listing does not
    # wait for the CPU behind big answers. 0 here, for a server embedded next to the model's
    # own processes (the demo's, the benchmarks'): lowered, a target's GetMetadata would yield
    # to every busy process on the machine, the target's own model build among them.
    # `sglang-mx server`, a process of its own, uses SERVING_BULK_NICE.
    bulk_nice: int = 0
    fast_workers: int = 8  # threads answering ListSources, UpdateStatus and health: they never wait behind the above
    max_concurrent_rpcs: int = 1024  # calls past this are answered RESOURCE_EXHAUSTED at once
    # Open WatchSources streams (server/watch.py); past it a new watch is answered RESOURCE_EXHAUSTED.
    # An open watch holds no thread and no call slot of max_concurrent_rpcs: about 25 KB of memory.
    max_watchers: int = 10_000
    store: str = "memory"  # one of STORE_KINDS
    redis_url: str = DEFAULT_REDIS_URL
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    redis_cache_mb: int = 256  # record blobs this server keeps from Redis (0: none)
    max_tensors: int = DEFAULT_MAX_TENSORS  # per published worker
    max_record_mb: int = DEFAULT_MAX_RECORD_MB  # identity + worker of one published worker, serialized
    max_workers_per_source: int = 4096
    max_sources: int = 10_000
    # Quotas of each principal (DEFAULT_MAX_RECORDS_PER_PRINCIPAL has the reasoning): the records
    # it owns and their serialized bytes (identity + worker). A publish past either is refused
    # RESOURCE_EXHAUSTED; republishing a record without growing it always passes.
    max_records_per_principal: int = DEFAULT_MAX_RECORDS_PER_PRINCIPAL
    max_mb_per_principal: int = DEFAULT_MAX_MB_PER_PRINCIPAL
    # Token files, one token per line ('TOKEN' or 'NAME TOKEN'); re-read when they change.
    # auth_token_file: tokens that may call everything (the one shared token of earlier versions);
    # writer_token_file: the same role; reader_token_file: ListSources and GetMetadata only.
    auth_token_file: str | None = None
    writer_token_file: str | None = None
    reader_token_file: str | None = None
    # Serve a non-loopback address without any token: an explicit choice.
    allow_unauthenticated: bool = False
    # Take tokens over plaintext on a non-loopback address (without tls_cert_file): an explicit
    # choice, for a network where something else encrypts (a TLS-terminating proxy, a mesh).
    allow_plaintext_tokens: bool = False
    # PEM certificate chain and private key: serve TLS instead of plaintext.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # PEM CA bundle: require client certificates signed by it (mutual TLS; needs tls_cert_file).
    tls_client_ca_file: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics on this port of `host` (0: a free one)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} is out of range; allowed: 0-65535 (0 picks a free port)")
        for name in ("heartbeat_timeout_s", "reaper_interval_s", "gc_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0 seconds")
        if self.max_message_mb < 1:
            raise ConfigError(f"max_message_mb={self.max_message_mb} must be >= 1")
        for name in ("max_tensors", "max_record_mb", "max_workers_per_source", "max_sources",
                     "max_records_per_principal", "max_mb_per_principal", "bulk_workers", "fast_workers",
                     "max_concurrent_rpcs", "max_watchers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.bulk_nice <= 19:
            raise ConfigError(f"bulk_nice={self.bulk_nice} is out of range; allowed: 0-19 (0: the process's own "
                              "priority)")
        if self.redis_cache_mb < 0:
            raise ConfigError(f"redis_cache_mb={self.redis_cache_mb} must be >= 0")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file go together: give both (TLS) or neither (plaintext)")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port={self.metrics_port} is out of range; allowed: 0-65535 "
                              "(0 picks a free port)")
        if self.token_files and self.tls_cert_file is None and not is_loopback(self.host) \
                and not self.allow_plaintext_tokens:
            raise ConfigError(
                f"serving {self.host} with tokens but without TLS lets anyone on the network read the tokens "
                "callers send: give --tls-cert and --tls-key, listen on 127.0.0.1, or pass "
                "--allow-plaintext-tokens to choose it (for a network that is encrypted otherwise)")
        if self.store not in STORE_KINDS:
            raise ConfigError(f"store={self.store!r} is not a store; allowed: {', '.join(STORE_KINDS)}")

    @property
    def record_ttl_s(self) -> float:
        """Redis TTL safety net: twice the time the reaper needs to delete a silent record."""
        return 2 * (self.heartbeat_timeout_s + self.gc_timeout_s + self.reaper_interval_s)

    @property
    def bulk_workers(self) -> int:
        """`workers`, or its default for the store."""
        if self.workers is not None:
            return self.workers
        return 4 if self.store == "redis" else 2

    @property
    def token_files(self) -> bool:
        return any(f is not None for f in (self.auth_token_file, self.writer_token_file, self.reader_token_file))
