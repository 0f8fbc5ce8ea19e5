"""The loader glue shared by the plugin (SGLang 0.5.15+) and the 0.5.10 adapter.

Both reach SGLang their own way (hooks, or calls the patch adds), gather the
same plain facts (`LaunchSettings`, `RankInfo`) and then call these functions,
so roles, identities, the target's load and the seed's publication happen one
way. SGLang's loaders, and our own modules that bring grpc and Mooncake, are
imported inside the functions that use them: every SGLang process loads the
plugin, most never load or publish through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Callable

from sglang_mx.errors import MxError
from sglang_mx.identity import RankInfo, identity_for
from sglang_mx.roles import LaunchSettings, Role, falls_back_to_disk, role_of

log = logging.getLogger("sglang_mx")

# Parallel widths besides TP/PP that change a rank's tensor layout.
LAYOUT_KEYS = ("attn_tp_size", "attn_cp_size", "attn_dp_size", "moe_ep_size", "moe_tp_size", "moe_dp_size")

_NO_ENGINE = ("SGLang created no Mooncake TransferEngine for the modelexpress backend: install "
              "mooncake-transfer-engine (or -non-cuda) in SGLang's environment")


@dataclasses.dataclass
class ProcessState:
    """What one SGLang process carries from its start to its event loop.

    Hooks and patch calls are free functions, so each entry module keeps one.
    The role (and so the config) is parsed once per process and kept here.
    """

    instance_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    roles: dict = dataclasses.field(default_factory=dict)  # LaunchSettings -> Role
    rank_infos: dict = dataclasses.field(default_factory=dict)  # id(model) -> RankInfo (plugin)
    publishers: list = dataclasses.field(default_factory=list)

    def role(self, server_args) -> Role:
        """This process's role, parsed from SGLang's ServerArgs on first use."""
        settings = settings_of(server_args)
        if settings not in self.roles:
            self.roles[settings] = role_of(settings)
        return self.roles[settings]


def settings_of(server_args) -> LaunchSettings:
    """The three ServerArgs settings that decide our role, as plain strings."""
    backend = server_args.remote_instance_weight_loader_backend
    load_format = server_args.load_format
    return LaunchSettings(
        load_format=str(getattr(load_format, "value", load_format)),
        backend=str(getattr(backend, "value", backend)),
        modelexpress_config=getattr(server_args, "modelexpress_config", None) or None,
    )


def log_at_info() -> None:
    """Show our INFO lines in SGLang's log unless someone set a level already."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


# --- rank facts -------------------------------------------------------------------

def rank_info(model_config, device, *, tp_size: int, tp_rank: int, pp_size: int, pp_rank: int,
              width: Callable[[str], object]) -> RankInfo:
    """The RankInfo of one rank; `width(key)` gives a LAYOUT_KEYS width, raising
    AttributeError when this SGLang build does not define it."""
    import sglang
    import torch

    layout = {}
    for key in LAYOUT_KEYS:
        try:
            layout[key] = str(width(key))
        except AttributeError:
            log.debug("modelexpress: SGLang %s has no %s; left out of the identity", sglang.__version__, key)
    return RankInfo(
        model_path=model_config.model_path,
        tp_size=tp_size,
        tp_rank=tp_rank,
        pp_size=pp_size,
        pp_rank=pp_rank,
        ep_size=int(layout.get("moe_ep_size", 1)),
        dtype=str(model_config.dtype).removeprefix("torch."),
        quantization=model_config.quantization or "",
        revision=model_config.revision or "",
        device=torch.device(device).type,
        framework_version=sglang.__version__,
        layout=layout,
    )


# --- the target's load ------------------------------------------------------------

def load_from_peer(load_config, model_config, device_config, *, role: Role, info: RankInfo, transfer_engine,
                   session_id: str):
    """Build the model with dummy weights, post-process it, and pull every tensor
    from a READY seed; with fallback=disk, load from disk when no seed serves."""
    from sglang.srt.configs.load_config import LoadFormat
    from sglang.srt.model_loader.loader import DefaultModelLoader, DummyModelLoader

    from sglang_mx.model_tensors import collect_tensors
    from sglang_mx.target import pull_into
    from sglang_mx.transfer.engine import MooncakeEngine

    if transfer_engine is None:
        raise MxError(_NO_ENGINE)
    engine = MooncakeEngine.wrap(transfer_engine, session_id)
    start = time.perf_counter()
    # SGLang's own dummy load, post-processing included: the same tensor layout
    # the seed published (quantized models rename and repack here).
    with _constant_dummy_fill():
        model = DummyModelLoader(dataclasses.replace(load_config, load_format=LoadFormat.DUMMY)).load_model(
            model_config=model_config, device_config=device_config)
    built = time.perf_counter() - start
    try:
        pull_into(collect_tensors(model), engine, info, role.config)
    except MxError as e:
        if not falls_back_to_disk(role.config):
            raise
        log.warning("modelexpress: no usable seed, loading %s from disk instead (fallback=disk): %s",
                    model_config.model_path, e)
        del model
        disk = dataclasses.replace(load_config, load_format=LoadFormat.AUTO, model_loader_extra_config={})
        return DefaultModelLoader(disk).load_model(model_config=model_config, device_config=device_config)
    log.info("modelexpress: model built and post-processed in %.2f s before the pull", built)
    return model.eval()


@contextlib.contextmanager
def _constant_dummy_fill():
    """Make SGLang's dummy loader fill weights with a constant, not random numbers.

    Every byte is overwritten by the pull, so random init (seconds per GB on a
    CPU: 4.9 s of a 5.7 s peer load of a 1 GB model here) is wasted; a constant
    fill is a memset, still touches every page (so the transfer does not stall
    on page faults), and gives post-processing harmless values. SGLang's loader
    calls `initialize_dummy_weights` through its module globals (0.5.10 and
    0.5.23 alike); the swap lasts for this one load, in the loading thread.
    """
    from sglang.srt.model_loader import loader

    original = getattr(loader, "initialize_dummy_weights", None)
    if original is None:  # a release that does not fill this way: leave it alone
        yield
        return
    loader.initialize_dummy_weights = _fill_constant
    try:
        yield
    finally:
        loader.initialize_dummy_weights = original


def _fill_constant(model, *args, **kwargs) -> None:
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.element_size() >= 2:
                tensor.fill_(1.0 if "scale" in name else 1e-3)
            elif tensor.numel():
                tensor.zero_()


# --- the seed's publication ---------------------------------------------------------

def publish(model, transfer_engine, session_id: str, info: RankInfo, role: Role, *, instance_id: str):
    """Register and publish one rank's tensors (INITIALIZING); returns the SeedPublisher."""
    from sglang_mx.client import MetadataClient
    from sglang_mx.model_tensors import collect_tensors
    from sglang_mx.seed import start_seed
    from sglang_mx.transfer.engine import MooncakeEngine

    if transfer_engine is None:
        raise MxError(_NO_ENGINE)
    config = role.config
    return start_seed(
        collect_tensors(model), MooncakeEngine.wrap(transfer_engine, session_id), identity_for(info, config),
        MetadataClient.for_config(config), worker_rank=info.worker_rank,
        worker_id=f"{instance_id}-rank{info.worker_rank}", heartbeat_interval_s=config.heartbeat_interval_s,
        accelerator=info.device,
    )


def mark_ready(publishers) -> None:
    """Once the rank serves: every publisher of this process goes READY."""
    for publisher in publishers:
        publisher.mark_ready()
        log.info("modelexpress: worker %s (rank %d) is READY on %s", publisher.worker_id,
                 publisher.worker_rank, publisher.mx_source_id)
