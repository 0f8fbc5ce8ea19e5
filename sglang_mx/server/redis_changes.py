"""Record changes of a Redis store, from every server replica: one subscriber thread per store.

The Redis store's write scripts PUBLISH the name of each record they change to `P changes`
(redis_store.py has the layout), in the same atomic step as the write: a message is never
published for a write that did not happen, nor left out for one that did. A `ChangeFeed`
subscribes to that channel and tells its listeners (the watch hub, server/watch.py) which
record to read again. Messages name a record, never its state: a listener reads the state
itself, so messages that arrive late, twice or out of order cannot make it see an old state.

Redis pub/sub delivers at most once: while the subscriber is disconnected, messages are lost.
Each time it has subscribed (the first time too: a watch may have read its records before),
the feed calls `listener.missed()`, and the listener reads everything it watches again.
"""

from __future__ import annotations

import logging
import threading

import redis

from sglang_mx.server.store import ChangeListener

log = logging.getLogger(__name__)

_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_POLL_S = 1.0  # how long one read of the subscription waits: the longest close() waits for the thread
_BACKOFF_S, _MAX_BACKOFF_S = 0.1, 5.0


def split_member(member: bytes) -> tuple[str, str]:
    """(source, worker) of a record's name, `<len(src)>:<src>:<worker_id>` (the model index member)."""
    length, rest = member.split(b":", 1)
    n = int(length)
    return rest[:n].decode(errors="replace"), rest[n + 1:].decode(errors="replace")


class ChangeFeed:
    """Subscribes to `channel` on the Redis of `client` and tells each listener of each record named.

    The thread starts with `start()` and ends with `close()`; it reconnects by itself (with
    backoff, logging each outage once) and calls `missed()` on every listener each time it has subscribed.
    """

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._listeners: tuple[ChangeListener, ...] = ()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._subscribed = threading.Event()  # set while subscribed (tests wait for it)
        self._thread = threading.Thread(target=self._run, name="mx-redis-changes", daemon=True)

    def start(self) -> "ChangeFeed":
        self._thread.start()
        return self

    def add(self, listener: ChangeListener) -> None:
        with self._lock:
            self._listeners += (listener,)

    def remove(self, listener: ChangeListener) -> None:
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Whether the feed is subscribed (waiting up to `timeout_s`): changes published from then on reach it."""
        return self._subscribed.wait(timeout_s)

    def _run(self) -> None:
        delay, lost = _BACKOFF_S, False
        while not self._closed.is_set():
            try:
                with self._client.pubsub() as pubsub:
                    pubsub.subscribe(self._channel)
                    if not self._confirmed(pubsub):
                        continue
                    self._subscribed.set()
                    if lost:
                        log.info("change feed %s: subscribed again; every watched source is read again",
                                 self._channel)
                    self._tell_missed()
                    delay, lost = _BACKOFF_S, False
                    self._read(pubsub)
            except _UNAVAILABLE as e:
                self._subscribed.clear()
                if not lost:
                    log.warning("change feed %s: Redis unreachable (%s); retrying, watches may lag meanwhile",
                                self._channel, e)
                lost = True
                self._closed.wait(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)

    def _confirmed(self, pubsub) -> bool:
        """Wait for Redis to confirm the subscription (False: closed meanwhile)."""
        while not self._closed.is_set():
            message = pubsub.get_message(timeout=_POLL_S)
            if message is not None and message.get("type") == "subscribe":
                return True
        return False

    def _read(self, pubsub) -> None:
        while not self._closed.is_set():
            message = pubsub.get_message(timeout=_POLL_S)
            if message is None:
                continue
            if message.get("type") == "subscribe":  # redis-py reconnected and subscribed again by itself
                log.info("change feed %s: subscribed again; every watched source is read again", self._channel)
                self._tell_missed()
                continue
            if message.get("type") != "message":
                continue
            try:
                source_id, worker_id = split_member(message["data"])
            except ValueError:  # published by something else on our prefix
                log.warning("change feed %s: ignoring message %r", self._channel, message["data"][:100])
                continue
            for listener in self._listeners:
                listener.changed(source_id, worker_id)

    def _tell_missed(self) -> None:
        for listener in self._listeners:
            listener.missed()

    def close(self) -> None:
        """Stop the thread (within about a second). Idempotent."""
        self._closed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=_POLL_S + 5)
