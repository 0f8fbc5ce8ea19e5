"""Plain records of the wire: identity, worker record, tensor descriptor, listing.

The P2pService's messages as frozen dataclasses that every module speaks;
`sglang_mx.wire` converts them to and from protobuf. No protobuf, no torch,
no SGLang here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Mapping


# Keys of WorkerRecord.topology a seed that targets of other layouts may reshard from publishes
# (sglang_mx.target.reshard): the layout-free model id, its TP and PP sizes, the instance its ranks share.
TOPOLOGY_MODEL_ID, TOPOLOGY_TP_SIZE, TOPOLOGY_PP_SIZE, TOPOLOGY_INSTANCE = (
    "mx_model_id", "mx_tp_size", "mx_pp_size", "mx_instance")
# Every sglang-mx seed's record: its manifest id (sglang_mx.manifest), what an operator pins.
TOPOLOGY_MANIFEST = "mx_manifest"
# A pulling target's record (pipelined cascade): the bytes it has verified so far (decimal), which the
# server keeps beside the status (UpdateStatus mx_verified_bytes) and shows in the topology of its
# listings and GetMetadata answers.
TOPOLOGY_VERIFIED_BYTES = "mx_verified_bytes"
# A partial seed's record (a target serving what it has verified while it pulls; sglang_mx.target.pipeline):
# "1", and its depth in the cascade tree (the first seeds are 0, a target one more than its deepest parent).
TOPOLOGY_PIPELINE, TOPOLOGY_DEPTH = "mx_pipeline", "mx_depth"
# A seed with a reader-lease cap publishes it: a target skips a seed whose listed load is at its cap
# without asking it (no GetMetadata, no lease call), which keeps a crowd of waiting targets off the server.
TOPOLOGY_MAX_READERS = "mx_max_readers"
# Where a seed grants reader leases (its record's worker_grpc_endpoint), also in the listing: a target asks
# for a lease before it fetches the record, and fetches it (GetMetadata) only from a seed that granted one.
TOPOLOGY_LEASES = "mx_lease_endpoint"


class SourceStatus(enum.IntEnum):
    """Lifecycle of a published worker (values equal the wire enum)."""

    UNKNOWN = 0
    INITIALIZING = 1
    READY = 2
    STALE = 3


class BackendFramework(enum.IntEnum):
    UNKNOWN = 0
    VLLM = 1
    SGLANG = 2
    TRT_LLM = 3


class SourceType(enum.IntEnum):
    """What a source holds; only WEIGHTS is served by sglang-mx."""

    WEIGHTS = 0
    LORA = 1
    CUDA_GRAPH = 2
    TORCH_COMPILE_CACHE = 3
    TRITON_CACHE = 4
    DEEP_GEMM_CACHE = 5
    TILELANG_CACHE = 6
    CUTE_DSL_CACHE = 7
    FLASHINFER_CACHE = 8
    TVM_FFI_CACHE = 9


# TensorDescriptor.digest_origin values: the digest was computed over bytes loaded from the checkpoint,
# is the digest the publisher's own pull checked these bytes against, or was computed over pulled
# bytes nobody checked (proof of nothing beyond "these are the bytes I hold").
DIGEST_FROM_CHECKPOINT, DIGEST_VERIFIED, DIGEST_UNVERIFIED = "checkpoint", "verified", "unverified"
DIGEST_ORIGINS = (DIGEST_FROM_CHECKPOINT, DIGEST_VERIFIED, DIGEST_UNVERIFIED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceIdentity:
    """Everything that changes the bytes or layout of a source's tensors.

    Two instances may exchange weights only when their identities are equal;
    `sglang_mx.identity.mx_source_id` hashes one into the id the server keys on.
    """

    model_name: str
    mx_version: str = ""
    mx_source_type: SourceType = SourceType.WEIGHTS
    backend_framework: BackendFramework = BackendFramework.UNKNOWN
    tensor_parallel_size: int = 0
    pipeline_parallel_size: int = 0
    expert_parallel_size: int = 0
    dtype: str = ""
    quantization: str = ""
    extra_parameters: Mapping[str, str] = dataclasses.field(default_factory=dict)
    revision: str = ""
    backend_framework_version: str = ""
    torch_version: str = ""
    cuda_version: str = ""
    triton_version: str = ""
    gpu_arch: str = ""
    compile_config_digest: str = ""


@dataclasses.dataclass(frozen=True)
class Span:
    """Local rows [local_start, +length) along a split dimension are whole rows [global_start, +length)."""

    local_start: int
    global_start: int
    length: int


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one rank's tensor is cut out of the model's whole tensor (sglang_mx.shards).

    `dim` -1: replicated, the rank holds the whole tensor. Otherwise the whole
    tensor is `parts` (fused pieces such as q, k, v) laid end to end along `dim`,
    and the rank holds `spans` of it; `shape` is the rank's own tensor shape.
    """

    dim: int
    shape: tuple[int, ...]
    parts: tuple[int, ...] = ()
    spans: tuple[Span, ...] = ()

    @property
    def replicated(self) -> bool:
        return self.dim < 0


@dataclasses.dataclass(frozen=True)
class PieceDigest:
    """The digest of whole rows [global_start, +length) along a split dimension, as a rank holds them."""

    global_start: int
    length: int
    digest: str


@dataclasses.dataclass(frozen=True)
class TensorDescriptor:
    """Where one tensor's bytes live in a worker's memory."""

    name: str
    addr: int
    size: int  # bytes
    dtype: str = ""
    device_id: int = 0
    digest: str = ""  # "<algorithm>:<hex>" of the bytes (sglang_mx.digest); "" when none was published
    shard: ShardSpec | None = None  # how it is split across ranks; None when no facts were published
    pieces: tuple[PieceDigest, ...] = ()  # digests of pieces of a dim-0 split (sglang_mx.shards)
    # Where `digest` came from (DIGEST_ORIGINS): "checkpoint", "verified", "unverified"; "" not said.
    digest_origin: str = ""
    # Digests of the bytes cut every `chunk_bytes` (sglang_mx.chunks), in order; () when not chunked.
    chunk_bytes: int = 0
    chunks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerRecord:
    """One published worker (one rank of one instance) as the server stores it."""

    worker_rank: int
    transfer_engine_session_id: str = ""
    nixl_metadata: bytes = b""
    tensors: tuple[TensorDescriptor, ...] = ()
    status: SourceStatus = SourceStatus.UNKNOWN
    updated_at_ms: int = 0
    metadata_endpoint: str = ""
    agent_name: str = ""
    worker_grpc_endpoint: str = ""
    accelerator: str = ""
    topology: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.size for t in self.tensors)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoredWorker:
    """A worker record with the keys and identity it was published under."""

    mx_source_id: str
    worker_id: str
    identity: SourceIdentity
    worker: WorkerRecord  # status and updated_at_ms are the current ones


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceRef:
    """One entry of a listing: enough to choose a worker and fetch its record."""

    mx_source_id: str
    worker_id: str
    model_name: str
    worker_rank: int
    status: SourceStatus
    updated_at_ms: int
    accelerator: str = ""
    topology: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source_load: float | None = None


@dataclasses.dataclass(frozen=True)
class SourceEvent:
    """One message of a source watch (MxWatchService.WatchSources).

    `ref`: the record as ListSources lists it (its status the current one), or its last state when
    `removed`; None for the one `snapshot_end` event that follows the records that matched when the
    watch (re)started.
    """

    ref: SourceRef | None
    removed: bool = False
    snapshot_end: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceQuery:
    """A listing request; None means "no filter"."""

    mx_source_id: str | None = None
    status: SourceStatus | None = None
    model_name: str | None = None
    worker_rank: int | None = None
    min_updated_at_ms: int | None = None
    limit: int | None = None

    def matches(self, ref: SourceRef) -> bool:
        """Whether `ref` passes every set filter but the source id and the limit (the store applies those)."""
        return (
            (self.status is None or ref.status == self.status)
            and (self.model_name is None or ref.model_name == self.model_name)
            and (self.worker_rank is None or ref.worker_rank == self.worker_rank)
            and (self.min_updated_at_ms is None or ref.updated_at_ms >= self.min_updated_at_ms)
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodedWorker:
    """One published worker as a store keeps it: the wire bytes it arrived as, plus the few
    fields the server indexes and updates.

    `worker_bytes` is a serialized WorkerMetadata WITHOUT status and updated_at (the store
    keeps those apart and `sglang_mx.wire` appends the current ones when answering), so a
    status change never rewrites the tensor list. `owner` is the principal that published it
    ("" when the server runs without tokens).
    """

    mx_source_id: str
    worker_id: str
    model_name: str
    worker_rank: int
    status: SourceStatus
    updated_at_ms: int
    identity_bytes: bytes
    worker_bytes: bytes
    accelerator: str = ""
    topology: Mapping[str, str] = dataclasses.field(default_factory=dict)
    owner: str = ""
    tensor_count: int = 0  # for logs


@dataclasses.dataclass(frozen=True)
class WorkerBytes:
    """What GetMetadata serves: the stored bytes and the current status and time."""

    identity_bytes: bytes
    worker_bytes: bytes
    status: SourceStatus
    updated_at_ms: int
    verified_bytes: int | None = None  # a pulling target's progress (UpdateStatus), None when never reported
