"""The metadata server: a P2pService over a pluggable store."""

from sglang_mx.server.app import MetadataServer, serve_forever
from sglang_mx.server.factory import make_store
from sglang_mx.server.memory_store import MemoryStore
from sglang_mx.server.options import STORE_KINDS, ServerOptions
from sglang_mx.server.store import ReapStats, SourceStore
from sglang_mx.records import StoredWorker

__all__ = ["STORE_KINDS", "MemoryStore", "MetadataServer", "ReapStats", "ServerOptions", "SourceStore", "StoredWorker",
           "make_store", "serve_forever"]
