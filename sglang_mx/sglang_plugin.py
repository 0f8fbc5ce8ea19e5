"""SGLang plugin: the `modelexpress` remote-instance backend, via SGLang's hooks.

Registered as the entry point `sglang.srt.plugins: modelexpress`; SGLang calls
`register()` in every process (launcher, schedulers, detokenizer). The hooks
translate SGLang objects into `sglang_mx.integration` calls and back; the logic
lives there. Hooks:

- `ServerArgs.__post_init__` (launcher): parse and validate `--modelexpress-config`.
- `overrides.remote_instance_transfer_engine_of`: make SGLang create its
  Mooncake TransferEngine whenever this backend loads or publishes.
- `RemoteInstanceModelLoader.load_model` (target): build the model with dummy
  weights and post-process it, pull every tensor from a seed, or fall back.
- `ModelRunner.load_model` (after): note this rank's identity facts.
- `RemoteInstanceWeightTransporter.maybe_register_and_publish_weight_info`:
  publish with our own registration instead of SGLang's (which walks the CUDA
  allocator and would register the weights a second time).
- `Scheduler.run_event_loop` (before): mark READY once the rank serves.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

from sglang_mx.config import MxConfig, parse_config
from sglang_mx.errors import MxError

log = logging.getLogger("sglang_mx")

_LOADER = "sglang.srt.model_loader.loader.RemoteInstanceModelLoader.load_model"
_TE_GATE = "sglang.srt.arg_groups.overrides.remote_instance_transfer_engine_of"
_RUNNER_LOAD = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
_PUBLISH = (
    "sglang.srt.model_executor.model_runner_components.remote_instance_weight_transporter."
    "RemoteInstanceWeightTransporter.maybe_register_and_publish_weight_info"
)
_EVENT_LOOP = "sglang.srt.managers.scheduler.Scheduler.run_event_loop"
_SERVER_ARGS = "sglang.srt.server_args.ServerArgs.__post_init__"


@dataclasses.dataclass
class _ProcessState:
    """What one SGLang process carries between hooks (hooks are free functions)."""

    instance_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    rank_infos: dict = dataclasses.field(default_factory=dict)  # id(model) -> RankInfo
    publishers: list = dataclasses.field(default_factory=list)


_state = _ProcessState()


def register() -> None:
    """Entry point: install the hooks (SGLang applies them right after)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if logging.getLogger("sglang_mx").level == logging.NOTSET:
        logging.getLogger("sglang_mx").setLevel(logging.INFO)
    HookRegistry.register(_SERVER_ARGS, _after_server_args, HookType.AFTER)
    HookRegistry.register(_TE_GATE, _around_te_gate, HookType.AROUND)
    HookRegistry.register(_LOADER, _around_remote_load, HookType.AROUND)
    HookRegistry.register(_RUNNER_LOAD, _after_runner_load, HookType.AFTER)
    HookRegistry.register(_PUBLISH, _around_publish, HookType.AROUND)
    HookRegistry.register(_EVENT_LOOP, _before_event_loop, HookType.BEFORE)


# --- roles --------------------------------------------------------------------

def _is_target(cfg) -> bool:
    return str(cfg.load_format) == "remote_instance" and str(cfg.remote_instance_weight_loader_backend) in (
        "modelexpress", "RemoteInstanceWeightLoaderBackend.MODELEXPRESS")


def _config_of(cfg) -> MxConfig | None:
    """Our config when this instance uses the backend (as target or seed), else None."""
    raw = getattr(cfg, "modelexpress_config", None)
    if _is_target(cfg):
        return parse_config(raw)
    if raw:
        config = parse_config(raw)
        return config if config.source else None
    return None


def _publishes(cfg, config: MxConfig) -> bool:
    """Targets seed by default (a fleet seeds itself); disk loads only with source=true."""
    return config.source if config.source is not None else _is_target(cfg)


# --- hooks ----------------------------------------------------------------------

def _after_server_args(result, self, *args, **kwargs):
    # Fail at start-up, in the launcher, with the key and what is allowed.
    if self.modelexpress_config or _is_target(self):
        parse_config(self.modelexpress_config)
    return None


def _around_te_gate(original, cfg, *args, **kwargs):
    if _config_of(cfg) is not None:
        return True
    return original(cfg, *args, **kwargs)


def _around_remote_load(original, self, *, model_config, device_config, **kwargs):
    from sglang.srt.runtime_context import get_model

    if not _is_target(get_model()):
        return original(self, model_config=model_config, device_config=device_config, **kwargs)
    return _load_from_peer(self.load_config, get_model(), model_config, device_config)


def _after_runner_load(result, self, *args, **kwargs):
    if not getattr(self, "is_draft_worker", False) and getattr(self, "model", None) is not None:
        _state.rank_infos[id(self.model)] = _rank_info(self.model_config, self.device)
    return None


def _around_publish(original, self, *args, **kwargs):
    from sglang.srt.runtime_context import get_model

    cfg = get_model()
    config = _config_of(cfg)
    info = _state.rank_infos.get(id(self.model))
    if config is None or info is None:
        return original(self, *args, **kwargs)
    if not _publishes(cfg, config):
        log.info("modelexpress: not publishing this instance (source=false)")
        return None
    from sglang_mx.integration import start_seed
    from sglang_mx.model_tensors import collect_tensors
    from sglang_mx.transfer.engine import MooncakeEngine

    if self.engine is None:
        raise MxError("SGLang created no Mooncake TransferEngine: install mooncake-transfer-engine "
                      "(or -non-cuda) in SGLang's environment")
    engine = MooncakeEngine.wrap(self.engine, self.session_id)
    publisher = start_seed(collect_tensors(self.model), engine, info, config, instance_id=_state.instance_id)
    _state.publishers.append(publisher)
    return None


def _before_event_loop(self, *args, **kwargs):
    for publisher in _state.publishers:
        publisher.mark_ready()
        log.info("modelexpress: worker %s (rank %d) is READY on %s", publisher.worker_id,
                 publisher.worker_rank, publisher.mx_source_id)
    return None


# --- the target's load ----------------------------------------------------------

def _load_from_peer(load_config, cfg, model_config, device_config):
    from sglang.srt.configs.load_config import LoadFormat
    from sglang.srt.model_loader.loader import DefaultModelLoader, DummyModelLoader

    from sglang_mx.integration import pull_into
    from sglang_mx.model_tensors import collect_tensors
    from sglang_mx.transfer.engine import MooncakeEngine

    config = parse_config(cfg.modelexpress_config)
    info = _rank_info(model_config, device_config.device)
    te = load_config.remote_instance_weight_loader_transfer_engine
    if te is None:
        raise MxError("SGLang created no Mooncake TransferEngine for the modelexpress backend: install "
                      "mooncake-transfer-engine (or -non-cuda) in SGLang's environment")
    engine = MooncakeEngine.wrap(te, load_config.remote_instance_weight_loader_transfer_engine_session_id)
    start = time.perf_counter()
    # Dummy weights, then SGLang's own post-processing: the same tensor layout
    # the seed published (quantized models rename and repack here).
    model = DummyModelLoader(dataclasses.replace(load_config, load_format=LoadFormat.DUMMY)).load_model(
        model_config=model_config, device_config=device_config)
    built = time.perf_counter() - start
    try:
        pull_into(collect_tensors(model), engine, info, config)
    except MxError as e:
        if config.fallback != "disk":
            raise
        log.warning("modelexpress: no usable seed, loading %s from disk instead (fallback=disk): %s",
                    model_config.model_path, e)
        del model
        disk = dataclasses.replace(load_config, load_format=LoadFormat.AUTO, model_loader_extra_config={})
        return DefaultModelLoader(disk).load_model(model_config=model_config, device_config=device_config)
    log.info("modelexpress: model built and post-processed in %.2f s before the pull", built)
    return model.eval()


def _rank_info(model_config, device):
    import torch
    import sglang
    from sglang.srt.runtime_context import get_parallel

    from sglang_mx.integration import RankInfo, dtype_name

    parallel = get_parallel()
    layout = {}
    for key in ("attn_tp_size", "attn_cp_size", "attn_dp_size", "moe_ep_size", "moe_tp_size", "moe_dp_size"):
        try:
            layout[key] = str(getattr(parallel, key))
        except Exception:  # a width this SGLang build does not define
            continue
    return RankInfo(
        model_path=model_config.model_path,
        tp_size=parallel.tp_size,
        tp_rank=parallel.tp_rank,
        pp_size=parallel.pp_size,
        pp_rank=parallel.pp_rank,
        ep_size=int(layout.get("moe_ep_size", 1)),
        dtype=dtype_name(model_config.dtype),
        quantization=model_config.quantization or "",
        revision=model_config.revision or "",
        device=torch.device(device).type,
        framework_version=sglang.__version__,
        layout=layout,
    )
