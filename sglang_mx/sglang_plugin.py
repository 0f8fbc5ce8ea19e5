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

import logging

from sglang_mx import sglang_common

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


_state = sglang_common.ProcessState()


def register() -> None:
    """Entry point: install the hooks (SGLang applies them right after)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    sglang_common.log_at_info()
    HookRegistry.register(_SERVER_ARGS, _after_server_args, HookType.AFTER)
    HookRegistry.register(_TE_GATE, _around_te_gate, HookType.AROUND)
    HookRegistry.register(_LOADER, _around_remote_load, HookType.AROUND)
    HookRegistry.register(_RUNNER_LOAD, _after_runner_load, HookType.AFTER)
    HookRegistry.register(_PUBLISH, _around_publish, HookType.AROUND)
    HookRegistry.register(_EVENT_LOOP, _before_event_loop, HookType.BEFORE)


# --- hooks ----------------------------------------------------------------------

def _after_server_args(result, self, *args, **kwargs):
    sglang_common.check_server_args(self)  # fails in the launcher, naming the key
    return None


def _around_te_gate(original, cfg, *args, **kwargs):
    if sglang_common.config_of(cfg) is not None:
        return True
    return original(cfg, *args, **kwargs)


def _around_remote_load(original, self, *, model_config, device_config, **kwargs):
    from sglang.srt.runtime_context import get_model

    if not sglang_common.is_target(get_model()):
        return original(self, model_config=model_config, device_config=device_config, **kwargs)
    return _load_from_peer(self.load_config, get_model(), model_config, device_config)


def _after_runner_load(result, self, *args, **kwargs):
    if not getattr(self, "is_draft_worker", False) and getattr(self, "model", None) is not None:
        _state.rank_infos[id(self.model)] = _rank_info(self.model_config, self.device)
    return None


def _around_publish(original, self, *args, **kwargs):
    from sglang.srt.runtime_context import get_model

    cfg = get_model()
    config = sglang_common.config_of(cfg)
    info = _state.rank_infos.get(id(self.model))
    if config is None or info is None:
        return original(self, *args, **kwargs)
    if not sglang_common.publishes(cfg, config):
        log.info("modelexpress: not publishing this instance (source=false)")
        return None
    _state.publishers.append(sglang_common.publish(
        self.model, self.engine, self.session_id, info, config, instance_id=_state.instance_id))
    return None


def _before_event_loop(self, *args, **kwargs):
    sglang_common.mark_ready(_state.publishers)
    return None


# --- the target's load ----------------------------------------------------------

def _load_from_peer(load_config, cfg, model_config, device_config):
    return sglang_common.load_from_peer(
        load_config, model_config, device_config,
        config=sglang_common.config_of(cfg),
        info=_rank_info(model_config, device_config.device),
        transfer_engine=load_config.remote_instance_weight_loader_transfer_engine,
        session_id=load_config.remote_instance_weight_loader_transfer_engine_session_id,
    )


def _rank_info(model_config, device):
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return sglang_common.rank_info(
        model_config, device, tp_size=parallel.tp_size, tp_rank=parallel.tp_rank,
        pp_size=parallel.pp_size, pp_rank=parallel.pp_rank, width=lambda key: getattr(parallel, key),
    )
