"""sglang-mx: load SGLang weights from a running peer over Mooncake, coordinated
through a ModelExpress-compatible metadata server."""

from sglang_mx.errors import (
    ConfigError,
    LayoutMismatchError,
    MxError,
    NoSourceError,
    ServerError,
    ServerUnavailableError,
    TransferError,
)
from sglang_mx.identity import mx_source_id
from sglang_mx.layout import global_rank
from sglang_mx.records import BackendFramework, SourceIdentity, SourceStatus, TensorDescriptor

__version__ = "0.1.0"

__all__ = [
    "BackendFramework",
    "ConfigError",
    "LayoutMismatchError",
    "MxError",
    "NoSourceError",
    "ServerError",
    "ServerUnavailableError",
    "SourceIdentity",
    "SourceStatus",
    "TensorDescriptor",
    "TransferError",
    "global_rank",
    "mx_source_id",
]
