"""Limits on everything a client sends, checked before anything is stored.

A request over a limit is answered gRPC INVALID_ARGUMENT with a message naming
the field and the limit. These are far above any real deployment and low
enough that a buggy or hostile client cannot make the server keep absurd
records (or make another model's listing too big to answer).
"""

from __future__ import annotations

import dataclasses

MAX_ID_CHARS = 1024  # model_name, worker_id, mx_source_id, tensor names
MAX_TEXT_CHARS = 256  # every other string: dtype, versions, session id, endpoints, pod fields, filters
MAX_MAP_ENTRIES = 64  # identity.extra_parameters, worker.topology
MAX_MAP_KEY_CHARS = 256
MAX_MAP_VALUE_CHARS = 1024
MAX_BLOB_BYTES = 1024 * 1024  # worker.nixl_metadata
MAX_WORKER_RANK = 1_000_000

_IDENTITY_TEXT = ("mx_version", "dtype", "quantization", "revision", "backend_framework_version", "torch_version",
                  "cuda_version", "triton_version", "gpu_arch", "compile_config_digest")
_WORKER_TEXT = ("transfer_engine_session_id", "metadata_endpoint", "agent_name", "worker_grpc_endpoint",
                "accelerator")
_REQUEST_TEXT = ("pod_name", "pod_uid", "pod_namespace")


class LimitExceeded(ValueError):
    """A request over a limit; the message names the field and the limit."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordLimits:
    """The configurable limits (ServerOptions holds them; the rest are the constants above)."""

    max_tensors: int  # per worker
    max_record_bytes: int  # identity + worker, serialized


def check_text(field: str, value: str, limit: int = MAX_TEXT_CHARS) -> None:
    if len(value) > limit:
        raise LimitExceeded(f"{field} is {len(value)} characters long; the limit is {limit}")


def _check_map(field: str, entries) -> None:
    if len(entries) > MAX_MAP_ENTRIES:
        raise LimitExceeded(f"{field} has {len(entries)} entries; the limit is {MAX_MAP_ENTRIES}")
    for key, value in entries.items():
        check_text(f"{field} key", key, MAX_MAP_KEY_CHARS)
        check_text(f"{field}[{key!r}]", value, MAX_MAP_VALUE_CHARS)


def check_identity(identity, field: str = "identity") -> None:
    check_text(f"{field}.model_name", identity.model_name, MAX_ID_CHARS)
    for name in _IDENTITY_TEXT:
        check_text(f"{field}.{name}", getattr(identity, name))
    _check_map(f"{field}.extra_parameters", identity.extra_parameters)


def check_publish(request, limits: RecordLimits) -> None:
    """Everything in a PublishMetadataRequest but the tensor descriptors' strings (see `check_tensor_text`)."""
    check_text("worker_id", request.worker_id, MAX_ID_CHARS)
    for name in _REQUEST_TEXT:
        check_text(name, getattr(request, name))
    check_identity(request.identity)
    worker = request.worker
    if worker.worker_rank > MAX_WORKER_RANK:
        raise LimitExceeded(f"worker.worker_rank is {worker.worker_rank}; the limit is {MAX_WORKER_RANK}")
    for name in _WORKER_TEXT:
        check_text(f"worker.{name}", getattr(worker, name))
    if len(worker.nixl_metadata) > MAX_BLOB_BYTES:
        raise LimitExceeded(f"worker.nixl_metadata is {len(worker.nixl_metadata)} bytes; the limit is "
                            f"{MAX_BLOB_BYTES}")
    _check_map("worker.topology", worker.topology)
    count = len(worker.tensor_source.tensors) + len(worker.tensors)
    if count > limits.max_tensors:
        raise LimitExceeded(f"worker has {count} tensor descriptors; the limit is {limits.max_tensors} per worker "
                            "(--max-tensors)")
    size = request.identity.ByteSize() + worker.ByteSize()
    if size > limits.max_record_bytes:
        raise LimitExceeded(f"the record is {size} bytes; the limit is {limits.max_record_bytes} "
                            "(--max-record-mb)")


def check_tensor_text(name: str, dtype: str) -> None:
    if len(name) > MAX_ID_CHARS:
        raise LimitExceeded(f"tensor name {name[:64]!r}... is {len(name)} characters long; the limit is "
                            f"{MAX_ID_CHARS}")
    if len(dtype) > MAX_TEXT_CHARS:
        raise LimitExceeded(f"dtype of tensor {name!r} is {len(dtype)} characters long; the limit is "
                            f"{MAX_TEXT_CHARS}")


def check_list(request) -> None:
    if request.HasField("identity"):
        check_identity(request.identity)
    if request.HasField("model_name_filter"):
        check_text("model_name_filter", request.model_name_filter, MAX_ID_CHARS)


def check_ids(request) -> None:
    """GetMetadataRequest / UpdateStatusRequest."""
    check_text("mx_source_id", request.mx_source_id, MAX_ID_CHARS)
    check_text("worker_id", request.worker_id, MAX_ID_CHARS)
