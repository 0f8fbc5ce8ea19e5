"""What the SGLang plugin does, in plain terms: no SGLang imports here.

The plugin (sglang_mx/sglang_plugin.py) translates SGLang objects into a
`RankInfo` and calls these functions; everything here tests without SGLang.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Mapping

import torch

from sglang_mx.client import MetadataClient
from sglang_mx.config import MxConfig
from sglang_mx.identity import global_rank
from sglang_mx.seed import SeedPublisher, close_on_exit
from sglang_mx.target import PullOptions, PullReport, pull_weights
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.tensors import describe
from sglang_mx.types import BackendFramework, SourceIdentity

log = logging.getLogger("sglang_mx")

MX_VERSION = "0.7.0"  # the ModelExpress wire revision we speak


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankInfo:
    """The facts about one SGLang rank that decide which seeds it may pair with."""

    model_path: str
    tp_size: int
    tp_rank: int
    pp_size: int = 1
    pp_rank: int = 0
    ep_size: int = 1
    dtype: str  # resolved, e.g. "bfloat16"
    quantization: str = ""
    revision: str = ""
    device: str = "cuda"  # "cuda", "cpu", ...
    framework_version: str = ""  # SGLang's version: model code decides layouts
    # Other settings that change tensor layout (attention/MoE splits, ...).
    layout: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def worker_rank(self) -> int:
        return global_rank(tp_rank=self.tp_rank, tp_size=self.tp_size, pp_rank=self.pp_rank)


def identity_for(info: RankInfo, config: MxConfig) -> SourceIdentity:
    """The SourceIdentity of an SGLang instance; anything that changes bytes is in it."""
    return SourceIdentity(
        mx_version=MX_VERSION,
        model_name=config.model_name or info.model_path,
        backend_framework=BackendFramework.SGLANG,
        tensor_parallel_size=info.tp_size,
        pipeline_parallel_size=info.pp_size,
        expert_parallel_size=info.ep_size,
        dtype=info.dtype,
        quantization=info.quantization,
        revision=config.revision or info.revision,
        backend_framework_version=info.framework_version,
        extra_parameters={"device": info.device, **info.layout},
    )


def metadata_client(config: MxConfig) -> MetadataClient:
    """A client of the configured server, with its deadline, token and TLS CA."""
    return MetadataClient(config.url, timeout_s=config.timeout_s, auth_token=config.auth_token,
                          tls_ca_file=config.tls_ca_file)


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def pull_into(
    tensors: Mapping[str, torch.Tensor], engine: MooncakeEngine, info: RankInfo, config: MxConfig
) -> PullReport:
    """Fill `tensors` from a READY seed of our identity and rank, or raise."""
    identity = identity_for(info, config)
    log.info(
        "modelexpress: loading %d tensors of %r (rank %d) from a peer via %s",
        len(tensors), identity.model_name, info.worker_rank, config.url,
    )
    with metadata_client(config) as client:
        report = pull_weights(
            client,
            engine,
            identity,
            worker_rank=info.worker_rank,
            tensors=describe(tensors),
            options=PullOptions(wait_timeout_s=config.wait_timeout_s, max_candidates=config.max_candidates),
        )
    log.info(
        "modelexpress: pulled %d tensors, %.3f GB in %.3f s (%.2f GB/s) from %s (worker %s)",
        report.tensors, report.bytes / 1e9, report.seconds, report.gb_per_s,
        report.seed_session_id, report.seed_worker_id,
    )
    return report


def start_seed(
    tensors: Mapping[str, torch.Tensor],
    engine: MooncakeEngine,
    info: RankInfo,
    config: MxConfig,
    *,
    instance_id: str = "",
) -> SeedPublisher:
    """Register and publish one rank's tensors as INITIALIZING; `mark_ready()` later.

    The publisher closes (STALE, memory unregistered) at exit and on SIGTERM.
    """
    identity = identity_for(info, config)
    worker_id = f"{instance_id or uuid.uuid4()}-rank{info.worker_rank}"
    client = metadata_client(config)
    publisher = SeedPublisher(
        client, engine, identity, worker_rank=info.worker_rank, tensors=describe(tensors),
        worker_id=worker_id, heartbeat_interval_s=config.heartbeat_interval_s, accelerator=info.device,
    )
    close_on_exit(publisher)
    publisher.start()
    return publisher
