"""The MxWatchService servicer: check a WatchSources request, open its watch, tie it to the stream.

Registered beside the P2pService on the same gRPC server (server/app.py), with grpc's
non-blocking streaming: `watch_sources` returns at once, and the hub's sender threads write
the stream's events (server/watch.py says why). A watch needs the access ListSources needs
(server/auth.py: a reader token is enough); its mx_source_id is checked against the same
limits as the other RPCs' ids.
"""

from __future__ import annotations

import functools

import grpc

import sglang_mx.server.limits as limits
from sglang_mx import wire
from sglang_mx.server.watch import HubClosed, TooManyWatchers, WatchHub


class WatchServicer:
    def __init__(self, hub: WatchHub) -> None:
        self._hub = hub

    def watch_sources(self, request, context, send) -> None:
        """Open the watch `request` asks for; its events go out through `send` from the hub's threads."""
        try:
            limits.check_text("mx_source_id", request.mx_source_id, limits.MAX_ID_CHARS)
            limits.check_text("worker_id", request.worker_id, limits.MAX_ID_CHARS)
            if request.HasField("worker_rank") and request.worker_rank > limits.MAX_WORKER_RANK:
                raise limits.LimitExceeded(f"worker_rank is {request.worker_rank}; the limit is "
                                           f"{limits.MAX_WORKER_RANK}")
        except limits.LimitExceeded as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"WatchSources: {e}")
        if not request.mx_source_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "WatchSources: mx_source_id is empty; name the source to watch (the id PublishMetadata "
                          "answers and ListSources lists)")
        rank = request.worker_rank if request.HasField("worker_rank") else None
        try:
            watcher = self._hub.open(request.mx_source_id, rank, request.progress, send=send,
                                     end_stream=functools.partial(_end_stream, context, send),
                                     waiting=wire.waiting_from_request(request))
        except TooManyWatchers as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"WatchSources: {e}")
        except HubClosed as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"WatchSources: {e}")
        # gRPC calls it when the stream ends for any reason (the client cancelled, went away, or the
        # hub ended it); False: the stream is over already.
        if not context.add_callback(watcher.release):
            watcher.release()


def _end_stream(context, send, code: grpc.StatusCode, details: str) -> None:
    context.set_code(code)
    context.set_details(details)
    send(None)
