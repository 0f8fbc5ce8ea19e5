"""The Redis store: records shared by every server replica, surviving restarts.

Layout, under a configurable key prefix P (default "mx:"):

- `P rec:<len(src)>:<src>:<worker_id>`: HASH, one per worker. `identity` and
  `worker` hold the protobuf bytes the worker was published as (the tensor
  list: the only big field; status and updated_at are not in them), served as
  they are; `status`, `updated_at`, `rank`, `model`, `accelerator`, `topology`
  (JSON), `load`, `verified` (a pulling target's progress), `owner`, `version`
  (new at every publish) are small fields.
  The length prefix keeps ids containing ':' from colliding. Each server keeps
  the blobs it read in a bounded cache, keyed by `version`: GetMetadata reads
  the small fields and fetches the blobs only for a version it does not hold.
- `P src:<src>`: ZSET worker_id -> updated_at (ms): the per-source index;
  listing and reaping read it, never SCAN/KEYS.
- `P sources`: SET of source ids that have workers.
- `P model:<model_name>`: SET of `<len(src)>:<src>:<worker_id>` (the record key
  after `P rec:`): the model index; listing by model name reads it, never every
  source.
- `P meta:<src>`: HASH worker_id -> JSON {o: owner, b: bytes, m: model_name} of
  each record: what its owner's quota and the model index hold for it. It
  outlives a record that expired, so the next reap (or publish) of that worker
  can release both.
- `P usage:records`, `P usage:bytes`: HASHes owner -> the records / bytes
  (identity + worker blobs) its records hold: the per-principal quotas.
- `P layout`: "2" once the records of the previous layout (no model index, no
  quotas) have been adopted into it; each server adopts them when it starts.
- `P changes`: the pub/sub channel of record changes, for the watches of every
  server on this prefix (server/redis_changes.py): each message is one record's
  name in the model index. The write scripts PUBLISH it themselves, in the same
  atomic step as the write, for a publish, an update that changed the status,
  load or progress (not a plain heartbeat), and a record the reaper marked or
  deleted.

Publish writes a record and every index in one Lua script (after checking the
record's owner, the capacity limits and its owner's quota), so a reader never sees half a record. Heartbeats and the reaper run Lua scripts
that touch only the small fields and the index: atomic per record, O(1) in the
number of tensors, and harmless when several replicas run them at once.
Every write also (re)sets a TTL on the record when `record_ttl_s` is given, a
safety net for when no server runs the reaper; an index entry whose record
expired is skipped by readers and removed by the next reap.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import threading
import urllib.parse
from typing import Callable, Iterable, Sequence, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from sglang_mx.errors import ConfigError, StoreUnavailableError
from sglang_mx.records import (TOPOLOGY_VERIFIED_BYTES, EncodedWorker, SourceQuery, SourceRef, SourceStatus,
                               WorkerBytes)
from sglang_mx.server.options import DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_URL
from sglang_mx.server.redis_changes import ChangeFeed, split_member
from sglang_mx.server.store import (Capacity, CapacityError, ChangeListener, NotOwnerError, QuotaError, ReapStats,
                                    RecordState, SourceStore, record_bytes)

log = logging.getLogger(__name__)

DEFAULT_URL = DEFAULT_REDIS_URL
DEFAULT_PREFIX = DEFAULT_REDIS_PREFIX

T = TypeVar("T")

# Errors that mean "Redis is not there right now" (BusyLoadingError, a Redis
# still loading its AOF after a restart, is a ConnectionError; ReadOnlyError is
# a replica that was primary before a failover).
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError)

# What listing reads (`version` only for watches: it tells a republish from an update).
_SMALL_FIELDS = ("status", "updated_at", "rank", "model", "accelerator", "topology", "load", "verified", "version")
_STALE = str(int(SourceStatus.STALE))

# Lua shared by the scripts that add or remove a record's accounting (its `P meta:<src>` entry, its
# model index entry, its owner's use). `account(... , sign)` adds (1) or releases (-1) one record.
_ACCOUNTING = """
local function account(usage_records, usage_bytes, model_prefix, member, owner, size, model, sign)
  if sign > 0 then redis.call('SADD', model_prefix .. model, member)
  else redis.call('SREM', model_prefix .. model, member) end
  if redis.call('HINCRBY', usage_records, owner, sign) <= 0 then
    redis.call('HDEL', usage_records, owner)
    redis.call('HDEL', usage_bytes, owner)
  else
    redis.call('HINCRBY', usage_bytes, owner, string.format('%d', sign * size))
  end
end
local function release(meta_key, worker_id, usage_records, usage_bytes, model_prefix, member)
  local meta = redis.call('HGET', meta_key, worker_id)
  if not meta then return nil end
  redis.call('HDEL', meta_key, worker_id)
  meta = cjson.decode(meta)
  account(usage_records, usage_bytes, model_prefix, member, meta.o, meta.b, meta.m, -1)
  return meta
end
"""

# KEYS: record, index, sources, meta, usage records, usage bytes. ARGV: owner, max_workers, max_sources,
# max_records, max_bytes ('0' = no limit), worker_id, source_id, updated_at, ttl_ms ('0' = none), size,
# model, model key prefix, member, changes channel, then the hash's field/value pairs. Returns {1} when
# stored (and published), {-1}: owned by another principal, {-2}: too many workers, {-3}: too many sources,
# {-4, records held}: past the owner's records quota, {-5, bytes held, growth}: past its bytes quota (the
# rule of store.check_quota).
_PUT = _ACCOUNTING + """
local owner, size = ARGV[1], tonumber(ARGV[10])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local current = redis.call('HGET', KEYS[1], 'owner')
  if current and current ~= '' and current ~= owner then return {-1} end
else
  if ARGV[2] ~= '0' and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return {-2} end
  if ARGV[3] ~= '0' and redis.call('SISMEMBER', KEYS[3], ARGV[7]) == 0
     and redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then return {-3} end
end
local old = redis.call('HGET', KEYS[4], ARGV[6])
old = old and cjson.decode(old)
local mine = old and old.o == owner
local held = tonumber(redis.call('HGET', KEYS[5], owner) or '0')
if not mine and ARGV[4] ~= '0' and held >= tonumber(ARGV[4]) then return {-4, held} end
local held_bytes = tonumber(redis.call('HGET', KEYS[6], owner) or '0')
local growth = size - (mine and old.b or 0)
if ARGV[5] ~= '0' and growth > 0 and held_bytes + growth > tonumber(ARGV[5]) then
  return {-5, held_bytes, growth}
end
release(KEYS[4], ARGV[6], KEYS[5], KEYS[6], ARGV[12], ARGV[13])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 15))
if ARGV[9] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[9]) end
redis.call('ZADD', KEYS[2], ARGV[8], ARGV[6])
redis.call('SADD', KEYS[3], ARGV[7])
redis.call('HSET', KEYS[4], ARGV[6], cjson.encode({o = owner, b = size, m = ARGV[11]}))
account(KEYS[5], KEYS[6], ARGV[12], ARGV[13], owner, size, ARGV[11], 1)
redis.call('PUBLISH', ARGV[14], ARGV[13])
return {1}
"""

# KEYS: record, index. ARGV: worker_id, rank, status, now_ms, load ('' = keep), ttl_ms ('0' = none),
# owner ('' = no check), verified bytes ('' = keep), changes channel, member. Returns 1 when changed, 0: no
# such record of that rank, -1: owned by another. Publishes the member when the status, load or progress
# changed (a plain heartbeat: nothing).
_UPDATE_ONE = """
local f = redis.call('HMGET', KEYS[1], 'rank', 'owner', 'status', 'load', 'verified')
if f[1] ~= ARGV[2] then return 0 end
if ARGV[7] ~= '' and f[2] and f[2] ~= '' and f[2] ~= ARGV[7] then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'updated_at', ARGV[4])
local changed = f[3] ~= ARGV[3]
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'load', ARGV[5])
  changed = changed or f[4] ~= ARGV[5]
end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'verified', ARGV[8])
  changed = changed or f[5] ~= ARGV[8]
end
if ARGV[6] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
if changed then redis.call('PUBLISH', ARGV[9], ARGV[10]) end
return 1
"""

# Lua shared by the listing scripts: append `name` and the _SMALL_FIELDS of the record at `key` to
# `out` when it matches rank, status and model ('' = any). Never reads the blobs.
_LIST_ROW = """
local function add_row(out, name, key, rank, status, model)
  local f = redis.call('HMGET', key, 'status', 'updated_at', 'rank', 'model', 'accelerator', 'topology', 'load',
                      'verified', 'version')
  if f[1] and (rank == '' or f[3] == rank) and (status == '' or f[1] == status) and (model == '' or f[4] == model) then
    out[#out + 1] = name
    for i = 1, 9 do out[#out + 1] = f[i] or false end
  end
end
"""

# KEYS: index. ARGV: record key prefix, min updated_at ('-inf' = any), rank, status, model ('' = any).
# Returns worker_id followed by the _SMALL_FIELDS of each match, flat.
_LIST = _LIST_ROW + """
local out = {}
for _, wid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')) do
  add_row(out, wid, ARGV[1] .. wid, ARGV[3], ARGV[4], ARGV[5])
end
return out
"""

# KEYS: model index. ARGV: `P rec:`, rank, status, model. Returns each match's member (see the layout)
# followed by its _SMALL_FIELDS, flat; the caller filters on updated_at.
_LIST_MODEL = _LIST_ROW + """
local out = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  add_row(out, member, ARGV[1] .. member, ARGV[2], ARGV[3], ARGV[4])
end
return out
"""

# KEYS: record, index, sources, meta, usage records, usage bytes. ARGV: worker_id, source_id, stale_before,
# delete_before, STALE value, model key prefix, member, changes channel. Decides from the record as it is
# now, so a second reaper finds nothing left to do; publishes the member when it changed something.
_REAP_ONE = _ACCOUNTING + """
local f = redis.call('HMGET', KEYS[1], 'status', 'updated_at')
local marked, deleted = 0, 0
if not f[1] then  -- expired (the TTL safety net): its index entries and accounting go now
  if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then redis.call('PUBLISH', ARGV[8], ARGV[7]) end
  release(KEYS[4], ARGV[1], KEYS[5], KEYS[6], ARGV[6], ARGV[7])
else
  local status, at = f[1], tonumber(f[2]) or 0  -- unreadable time: expire it
  if status ~= ARGV[5] and at < tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'status', ARGV[5])
    status = ARGV[5]
    marked = 1
  end
  if status == ARGV[5] and at < tonumber(ARGV[4]) then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
    release(KEYS[4], ARGV[1], KEYS[5], KEYS[6], ARGV[6], ARGV[7])
    deleted = 1
  end
  if marked + deleted > 0 then redis.call('PUBLISH', ARGV[8], ARGV[7]) end
end
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return {marked, deleted}
"""

# KEYS: index, meta, usage records, usage bytes. ARGV: record key prefix, model key prefix, member prefix.
# Accounts the records of one source that have no meta entry (written by the previous layout).
_ADOPT = _ACCOUNTING + """
for _, wid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. wid
  if redis.call('HEXISTS', KEYS[2], wid) == 0 and redis.call('EXISTS', key) == 1 then
    local f = redis.call('HMGET', key, 'owner', 'model')
    local owner, model = f[1] or '', f[2] or ''
    local size = redis.call('HSTRLEN', key, 'identity') + redis.call('HSTRLEN', key, 'worker')
    redis.call('HSET', KEYS[2], wid, cjson.encode({o = owner, b = size, m = model}))
    account(KEYS[3], KEYS[4], ARGV[2], ARGV[3] .. wid, owner, size, model, 1)
  end
end
"""
_LAYOUT = "2"


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by '***', for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """Turn "Redis is unreachable" into StoreUnavailableError naming the URL."""

    @functools.wraps(method)
    def wrapper(self: "RedisStore", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _UNAVAILABLE as e:
            raise StoreUnavailableError(f"Redis: {e}", url=self.url) from e

    return wrapper


class RedisStore(SourceStore):
    """A SourceStore in one Redis (standalone, or the primary of a replicated set).

    Connects and PINGs in the constructor: an unreachable Redis raises
    StoreUnavailableError naming the URL (password redacted). Later outages
    raise StoreUnavailableError from the failing call; the connection pool
    reconnects by itself once Redis is back. Redis must not evict keys
    (`maxmemory-policy noeviction`), or records vanish early.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str = DEFAULT_PREFIX,
        record_ttl_s: float | None = None,
        cache_bytes: int = 256 * 1024 * 1024,
        connect_timeout_s: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = redact_url(url)
        self._cache = _BlobCache(cache_bytes)
        if record_ttl_s is not None and record_ttl_s <= 0:
            raise ConfigError(f"record_ttl_s={record_ttl_s} must be > 0 seconds (or None for no TTL)")
        self.prefix = prefix
        self._ttl_ms = "0" if record_ttl_s is None else str(int(record_ttl_s * 1000))
        try:
            self._r = redis.Redis.from_url(
                url,
                socket_connect_timeout=connect_timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
                health_check_interval=30,
            )
        except ValueError as e:
            raise ConfigError(f"redis_url={self.url!r} is not a Redis URL ({e}); "
                              "expected redis://[:password@]host:port/db, rediss://... or unix://...") from e
        self._put = self._r.register_script(_PUT)
        self._update_one = self._r.register_script(_UPDATE_ONE)
        self._list = self._r.register_script(_LIST)
        self._list_model = self._r.register_script(_LIST_MODEL)
        self._reap_one = self._r.register_script(_REAP_ONE)
        self._adopt = self._r.register_script(_ADOPT)
        self._closed = threading.Event()
        self._feed: ChangeFeed | None = None  # started by the first subscribe
        self._subscribe_timeout_s = connect_timeout_s + timeout_s
        self._feed_lock = threading.Lock()
        try:
            self._r.ping()
            self._adopt_previous_layout()
        except _UNAVAILABLE as e:
            self._r.close()
            raise StoreUnavailableError(f"cannot reach Redis ({e})", url=self.url) from e

    def _adopt_previous_layout(self) -> None:
        """Put records written before the model index and the quotas into both (once per prefix)."""
        if self._r.get(self._layout_key()) == _LAYOUT.encode():
            return
        for source_id in (s.decode() for s in self._r.smembers(self._sources_key())):
            self._adopt(keys=[self._index_key(source_id), self._meta_key(source_id), *self._usage_keys()],
                        args=[self._record_prefix(source_id), self._model_prefix(), self._member(source_id, "")])
        self._r.set(self._layout_key(), _LAYOUT)

    # --- keys ---------------------------------------------------------------------------------------

    def _sources_key(self) -> str:
        return f"{self.prefix}sources"

    def _index_key(self, mx_source_id: str) -> str:
        return f"{self.prefix}src:{mx_source_id}"

    def _meta_key(self, mx_source_id: str) -> str:
        return f"{self.prefix}meta:{mx_source_id}"

    def _model_prefix(self) -> str:
        return f"{self.prefix}model:"

    def _usage_keys(self) -> tuple[str, str]:
        return f"{self.prefix}usage:records", f"{self.prefix}usage:bytes"

    def _layout_key(self) -> str:
        return f"{self.prefix}layout"

    def _changes_channel(self) -> str:
        return f"{self.prefix}changes"

    @staticmethod
    def _member(mx_source_id: str, worker_id: str) -> str:
        """A record's name in the model index: its key after `P rec:`."""
        return f"{len(mx_source_id.encode())}:{mx_source_id}:{worker_id}"

    def _record_prefix(self, mx_source_id: str) -> str:
        return f"{self.prefix}rec:{self._member(mx_source_id, '')}"

    def _record_key(self, mx_source_id: str, worker_id: str) -> str:
        return self._record_prefix(mx_source_id) + worker_id

    # --- SourceStore --------------------------------------------------------------------------------

    @_guarded
    def put(self, record: EncodedWorker, capacity: Capacity = Capacity()) -> None:
        fields = {
            "identity": record.identity_bytes,
            "worker": record.worker_bytes,
            "status": int(record.status),
            "updated_at": record.updated_at_ms,
            "rank": record.worker_rank,
            "model": record.model_name,
            "accelerator": record.accelerator,
            "topology": json.dumps(dict(record.topology), sort_keys=True),
            "owner": record.owner,
            "version": (version := os.urandom(8).hex()),
        }
        pairs = [item for pair in fields.items() for item in pair]
        source_id, worker_id, size = record.mx_source_id, record.worker_id, record_bytes(record)
        # One script: the owner, capacity and quota checks and the write happen at once (a fresh record:
        # no stale `load` from the previous one), so readers never see half a record.
        result, *numbers = (int(n) for n in self._put(
            keys=[self._record_key(source_id, worker_id), self._index_key(source_id), self._sources_key(),
                  self._meta_key(source_id), *self._usage_keys()],
            args=[record.owner, capacity.max_workers_per_source, capacity.max_sources,
                  capacity.max_records_per_principal, capacity.max_bytes_per_principal, worker_id, source_id,
                  record.updated_at_ms, self._ttl_ms, size, record.model_name, self._model_prefix(),
                  self._member(source_id, worker_id), self._changes_channel(), *pairs],
        ))
        if result == -1:
            raise NotOwnerError(source_id, worker_id)
        if result == -2:
            raise CapacityError.too_many_workers(source_id, capacity.max_workers_per_source,
                                                 capacity.max_workers_per_source)
        if result == -3:
            raise CapacityError.too_many_sources(capacity.max_sources, capacity.max_sources)
        if result == -4:
            raise QuotaError.for_records(record.owner, numbers[0], capacity.max_records_per_principal)
        if result == -5:
            raise QuotaError.for_bytes(record.owner, numbers[0], numbers[1], capacity.max_bytes_per_principal)
        self._cache.put((record.mx_source_id, record.worker_id), version.encode(), record.identity_bytes,
                        record.worker_bytes)

    @_guarded
    def update_status(
        self,
        mx_source_id: str,
        worker_id: str,
        worker_rank: int,
        status: SourceStatus,
        now_ms: int,
        source_load: float | None = None,
        owner: str | None = None,
        verified_bytes: int | None = None,
    ) -> int:
        load = "" if source_load is None else repr(float(source_load))
        verified = "" if verified_bytes is None else str(int(verified_bytes))
        key = self._record_key(mx_source_id, worker_id)
        result = int(self._update_one(keys=[key, self._index_key(mx_source_id)], args=[
            worker_id, str(worker_rank), str(int(status)), str(now_ms), load, self._ttl_ms, owner or "", verified,
            self._changes_channel(), self._member(mx_source_id, worker_id)]))
        if result < 0:
            raise NotOwnerError(mx_source_id, worker_id)
        return result

    @_guarded
    def get_bytes(self, mx_source_id: str, worker_id: str) -> WorkerBytes | None:
        key = self._record_key(mx_source_id, worker_id)
        # The blobs change only with a publish, which gives the record a new `version`: read the
        # small fields first and the blobs only when this process does not hold that version.
        # Redis answers small replies quickly, instead of every call queueing it behind megabytes.
        version, status, updated_at, verified = self._r.hmget(key, ["version", "status", "updated_at", "verified"])
        if status is None:
            return None
        cached = self._cache.get((mx_source_id, worker_id), version)
        if cached is not None:
            return WorkerBytes(cached[0], cached[1], SourceStatus(int(status)), int(updated_at), _int_or_none(verified))
        identity, worker, version, status, updated_at, verified = self._r.hmget(
            key, ["identity", "worker", "version", "status", "updated_at", "verified"])  # one read: one version
        if worker is None or identity is None or status is None:
            return None
        if version is not None:  # records of the previous version have none: never cached
            self._cache.put((mx_source_id, worker_id), version, identity, worker)
        return WorkerBytes(identity, worker, SourceStatus(int(status)), int(updated_at), _int_or_none(verified))

    @_guarded
    def states(self, mx_source_id: str, worker_ids: Sequence[str] | None = None) -> dict[str, RecordState]:
        if worker_ids is None:  # the listing script: the index and the small fields, in one call
            flat = self._list(keys=[self._index_key(mx_source_id)],
                              args=[self._record_prefix(mx_source_id), "-inf", "", "", ""])
            rows = [(name.decode(errors="replace"), fields) for name, fields in _rows(flat)]
        else:
            names = list(dict.fromkeys(worker_ids))
            pipe = self._r.pipeline(transaction=False)
            for worker_id in names:
                pipe.hmget(self._record_key(mx_source_id, worker_id), list(_SMALL_FIELDS))
            rows = list(zip(names, pipe.execute()))
        out = {}
        for worker_id, fields in rows:
            ref = _ref(mx_source_id, worker_id, fields)
            if ref is not None:
                out[worker_id] = RecordState(ref, (fields[-1] or b"").decode())
        return out

    def subscribe(self, listener: ChangeListener) -> None:
        with self._feed_lock:
            if self._closed.is_set():
                raise StoreUnavailableError("the store is closed", url=self.url)
            if self._feed is None:
                self._feed = ChangeFeed(self._r, self._changes_channel()).start()
            self._feed.add(listener)
            feed = self._feed
        # Writes after this return are told; if Redis is down now, `missed()` follows once it is back.
        if not feed.wait_subscribed(self._subscribe_timeout_s):
            log.warning("change feed %s: not subscribed yet; watches start once Redis answers",
                        self._changes_channel())

    def unsubscribe(self, listener: ChangeListener) -> None:
        with self._feed_lock:
            if self._feed is not None:
                self._feed.remove(listener)

    @_guarded
    def list(self, query: SourceQuery) -> list[SourceRef]:
        if query.limit is not None and query.limit <= 0:
            return []
        filters = ["" if query.worker_rank is None else str(query.worker_rank),
                   "" if query.status is None else str(int(query.status)),
                   "" if query.model_name is None else query.model_name]
        rows: list[tuple[str, str, list[bytes | None]]] = []  # (source, worker, small fields)
        if query.mx_source_id is None and query.model_name is not None:  # the model index: one script
            flat = self._list_model(keys=[self._model_prefix() + query.model_name],
                                    args=[f"{self.prefix}rec:", *filters])
            rows = [(*split_member(name), fields) for name, fields in _rows(flat)]
        else:
            if query.mx_source_id is not None:
                sources = [query.mx_source_id]
            else:
                sources = sorted(s.decode() for s in self._r.smembers(self._sources_key()))
            since = "-inf" if query.min_updated_at_ms is None else str(query.min_updated_at_ms)
            pipe = self._r.pipeline(transaction=False)
            for source_id in sources:  # one script per source: it reads the index and the small fields
                self._list(keys=[self._index_key(source_id)], args=[self._record_prefix(source_id), since, *filters],
                           client=pipe)
            for source_id, flat in zip(sources, pipe.execute()):
                rows += [(source_id, name.decode(errors="replace"), fields) for name, fields in _rows(flat)]
        refs = []
        for source_id, worker_id, fields in rows:
            ref = _ref(source_id, worker_id, fields)
            if ref is not None and query.matches(ref):
                refs.append(ref)
        refs.sort(key=lambda r: (r.updated_at_ms, r.mx_source_id, r.worker_id), reverse=True)
        return refs[: query.limit] if query.limit is not None else refs

    @_guarded
    def reap(self, now_ms: int, heartbeat_timeout_ms: int, gc_timeout_ms: int) -> ReapStats:
        stale_before = now_ms - heartbeat_timeout_ms
        delete_before = now_ms - gc_timeout_ms
        sources = [s.decode() for s in self._r.smembers(self._sources_key())]
        pipe = self._r.pipeline(transaction=False)
        for source_id in sources:  # only records old enough to need work: the index is sorted by time
            pipe.zrangebyscore(self._index_key(source_id), "-inf", f"({max(stale_before, delete_before)}")
        marked = deleted = 0
        for source_id, members in zip(sources, pipe.execute()):
            for chunk in _chunks([m.decode() for m in members], 500):
                pipe = self._r.pipeline(transaction=False)
                for worker_id in chunk:
                    self._reap_one(
                        keys=[self._record_key(source_id, worker_id), self._index_key(source_id),
                              self._sources_key(), self._meta_key(source_id), *self._usage_keys()],
                        args=[worker_id, source_id, stale_before, delete_before, _STALE, self._model_prefix(),
                              self._member(source_id, worker_id), self._changes_channel()],
                        client=pipe,
                    )
                for m, d in pipe.execute():
                    marked += int(m)
                    deleted += int(d)
        return ReapStats(marked_stale=marked, deleted=deleted)

    def close(self) -> None:
        with self._feed_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()
        self._r.close()


def _rows(flat: list) -> Iterable[tuple[bytes, list[bytes | None]]]:
    """(name, small fields) of a listing script's flat answer."""
    width = 1 + len(_SMALL_FIELDS)
    for i in range(0, len(flat), width):
        yield flat[i], flat[i + 1: i + width]


def _int_or_none(value: bytes | None) -> int | None:
    return None if value is None else int(value)


def _ref(source_id: str, worker_id: str, row: list[bytes | None]) -> SourceRef | None:
    """The ref of a record's small fields; None when it is gone or cannot be read (logged)."""
    status, updated_at, rank, model, accelerator, topology, load, verified, _version = row
    if status is None:  # the record expired or was reaped since the index was read
        return None
    try:
        return _decode_ref(source_id, worker_id, status, updated_at, rank, model, accelerator, topology, load,
                           verified)
    except (ValueError, TypeError, AttributeError) as e:  # written by something else: skip it, list the rest
        log.warning("skipping unreadable record %s/%s: %s", source_id, worker_id, e)
        return None


def _decode_ref(source_id, worker_id, status, updated_at, rank, model, accelerator, topology, load,
                verified) -> SourceRef:
    topology = json.loads(topology)
    if not isinstance(topology, dict) or not all(isinstance(v, str) for v in topology.values()):
        raise ValueError(f"topology {topology!r} is not a map of strings")
    if verified is not None:
        topology[TOPOLOGY_VERIFIED_BYTES] = str(int(verified))
    return SourceRef(
        mx_source_id=source_id,
        worker_id=worker_id,
        model_name=model.decode(),
        worker_rank=int(rank),
        status=SourceStatus(int(status)),
        updated_at_ms=int(updated_at),
        accelerator=accelerator.decode(),
        topology=topology,
        source_load=None if load is None else float(load),
    )


class _BlobCache:
    """(source, worker) -> (version, identity bytes, worker bytes), least recently used first out,
    at most `max_bytes` of blobs. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[tuple[str, str], tuple[bytes, bytes, bytes]] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[str, str], version: bytes | None) -> tuple[bytes, bytes] | None:
        if version is None:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != version:
                return None
            self._items.move_to_end(key)
            return item[1], item[2]

    def put(self, key: tuple[str, str], version: bytes, identity: bytes, worker: bytes) -> None:
        size = len(identity) + len(worker)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1]) + len(old[2])
            if size > self._max:
                return
            self._items[key] = (version, identity, worker)
            self._bytes += size
            while self._bytes > self._max:
                _, (_, i, w) = self._items.popitem(last=False)
                self._bytes -= len(i) + len(w)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
