"""The metadata server: a P2pService over a pluggable store."""

from sglang_mx.server.app import MetadataServer, ServerOptions, serve_forever
from sglang_mx.server.factory import STORE_KINDS, make_store
from sglang_mx.server.memory_store import MemoryStore
from sglang_mx.server.store import ReapStats, SourceStore
from sglang_mx.types import StoredWorker

__all__ = ["STORE_KINDS", "MemoryStore", "MetadataServer", "ReapStats", "ServerOptions", "SourceStore", "StoredWorker",
           "make_store", "serve_forever"]
