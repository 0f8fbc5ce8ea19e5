"""Build a store backend by name: "memory" (the default) or "redis"."""

from __future__ import annotations

from sglang_mx.errors import ConfigError
from sglang_mx.server.memory_store import MemoryStore
from sglang_mx.server.options import DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_URL, STORE_KINDS
from sglang_mx.server.store import SourceStore


def make_store(
    kind: str = "memory",
    *,
    redis_url: str = DEFAULT_REDIS_URL,
    redis_prefix: str = DEFAULT_REDIS_PREFIX,
    record_ttl_s: float | None = None,
    redis_cache_mb: int = 256,
) -> SourceStore:
    """A fresh store of `kind`.

    "memory": one process's records, gone when it exits (redis_* are ignored).
    "redis": records in the Redis at `redis_url` under keys starting with
    `redis_prefix`, shared by every server that uses the same two; each record
    expires after `record_ttl_s` without a write (None: only the reaper deletes).
    Raises ConfigError for an unknown kind or URL, StoreUnavailableError naming
    the URL when Redis cannot be reached.
    """
    if kind == "memory":
        return MemoryStore()
    if kind == "redis":
        if not redis_prefix:
            raise ConfigError("redis_prefix is empty; give every deployment a prefix such as 'mx:'")
        try:
            from sglang_mx.server.redis_store import RedisStore
        except ImportError as e:
            raise ConfigError(f"store 'redis' needs the redis package ({e}); "
                              "install it with: pip install 'sglang-mx[redis]'") from e
        return RedisStore(redis_url, prefix=redis_prefix, record_ttl_s=record_ttl_s,
                          cache_bytes=redis_cache_mb * 1024 * 1024)
    raise ConfigError(f"store={kind!r} is not a store; allowed: {', '.join(STORE_KINDS)}")
