"""SGLang plugin: the `modelexpress` remote-instance backend, via SGLang's hooks.

Registered as the entry point `sglang.srt.plugins: modelexpress`; SGLang calls
`register()` in every process (launcher, schedulers, detokenizer). The hooks
translate SGLang objects into plain facts and call `sglang_mx.sglang.process`, `.rank`, `.target_load` and `.publish`;
the logic lives there and in the modules it calls. Hooks:

- `ServerArgs.check_server_args` (before; once, in the launcher, before any
  scheduler starts, for `launch_server`, `sglang serve` and `Engine(...)`
  alike): parse and validate `--modelexpress-config`. (`ServerArgs` is a
  msgspec struct that captures `__post_init__` when the class is created, so a
  hook there never runs.)
- `overrides.remote_instance_transfer_engine_of`: make SGLang create its
  Mooncake TransferEngine whenever this backend loads or publishes.
- `RemoteInstanceModelLoader.load_model` (target): build the model with dummy
  weights and post-process it, pull every tensor from a seed, or fall back.
- `ModelRunner.load_model` (after): note this rank's identity facts (a
  speculative draft model's too: it seeds and loads as role "draft").
- `RemoteInstanceWeightTransporter.maybe_register_and_publish_weight_info`:
  publish with our own registration instead of SGLang's (which walks the CUDA
  allocator and would register the weights a second time).
- `bootstrap._bind_threads_if_cpu` (note the rank's CPUs SGLang computes, cut
  to the mask the process had before) and
  `RemoteInstanceWeightTransporter.init_engine` (when this backend uses the
  engine): start Mooncake's threads allowed on the rank's CPUs, not on the one
  core sgl_kernel's binding leaves the scheduler's main thread (`.affinity`).
- `Scheduler.run_event_loop` (before): mark READY once the rank serves. A rank
  whose weights were pulled from a peer goes READY at publication instead
  (cascade: its weights are final, so it seeds others before it serves).
- The scheduler's in-place weight updaters (`SchedulerWeightUpdaterManager`:
  from disk, tensor, distributed, IPC, begin_weight_update, memory release) and
  EPLB's `ExpertLocationUpdater.update`: before the first byte changes, every
  seed of the process withdraws (STALE, memory unregistered); after an update
  from disk it publishes again under the identity of what it now holds (the new
  model path, new digests). After `resume_memory_occupation` it is published
  again and goes READY only when every digest equals what it published before
  the release (otherwise it stays withdrawn, naming the tensors). Other updates
  leave it withdrawn: what it then holds has no identity a target could ask for.
"""

from __future__ import annotations

import logging

from sglang_mx.sglang import affinity, process, publish, rank, target_load

log = logging.getLogger("sglang_mx")

_LOADER = "sglang.srt.model_loader.loader.RemoteInstanceModelLoader.load_model"
_TE_GATE = "sglang.srt.arg_groups.overrides.remote_instance_transfer_engine_of"
_RUNNER_LOAD = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
_PUBLISH = (
    "sglang.srt.model_executor.model_runner_components.remote_instance_weight_transporter."
    "RemoteInstanceWeightTransporter.maybe_register_and_publish_weight_info"
)
_INIT_ENGINE = (
    "sglang.srt.model_executor.model_runner_components.remote_instance_weight_transporter."
    "RemoteInstanceWeightTransporter.init_engine"
)
_BIND_THREADS = "sglang.srt.distributed.bootstrap._bind_threads_if_cpu"
_EVENT_LOOP = "sglang.srt.managers.scheduler.Scheduler.run_event_loop"
_UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager."
_REPUBLISH_AFTER = (_UPDATER + "update_weights_from_disk",)
_RESUME = _UPDATER + "resume_memory_occupation"
_WITHDRAW_BEFORE = tuple(_UPDATER + name for name in (
    "update_weights_from_tensor", "update_weights_from_distributed", "update_weights_from_ipc",
    "begin_weight_update", "release_memory_occupation")) + (
    "sglang.srt.eplb.expert_location_updater.ExpertLocationUpdater.update",)
_SERVER_ARGS = "sglang.srt.server_args.ServerArgs.check_server_args"


_state = process.ProcessState()
_rank_cpus = affinity.RankCpus()


def register() -> None:
    """Entry point: install the hooks (SGLang applies them right after)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    process.log_at_info()
    HookRegistry.register(_SERVER_ARGS, _before_server_args_check, HookType.BEFORE)
    HookRegistry.register(_TE_GATE, _around_te_gate, HookType.AROUND)
    HookRegistry.register(_LOADER, _around_remote_load, HookType.AROUND)
    HookRegistry.register(_RUNNER_LOAD, _after_runner_load, HookType.AFTER)
    HookRegistry.register(_PUBLISH, _around_publish, HookType.AROUND)
    HookRegistry.register(_BIND_THREADS, _around_bind_threads, HookType.AROUND)
    HookRegistry.register(_INIT_ENGINE, _around_init_engine, HookType.AROUND)
    HookRegistry.register(_EVENT_LOOP, _before_event_loop, HookType.BEFORE)
    HookRegistry.register(_RESUME, _around_resume, HookType.AROUND)
    for target in _REPUBLISH_AFTER:
        HookRegistry.register(target, _around_update_from_disk, HookType.AROUND)
    for target in _WITHDRAW_BEFORE:
        HookRegistry.register(target, _before_weights_change, HookType.BEFORE)


# --- hooks ----------------------------------------------------------------------

def _before_server_args_check(server_args, *args, **kwargs):
    _state.role(server_args)  # raises ConfigError in the launcher, naming the key
    process.new_instance()
    return None


def _around_te_gate(original, cfg, *args, **kwargs):
    if _state.role(cfg).uses_backend:
        return True
    return original(cfg, *args, **kwargs)


def _around_remote_load(original, self, *, model_config, device_config, **kwargs):
    from sglang.srt.runtime_context import get_model, get_server_args

    role = _state.role(get_model())
    if not role.target:
        return original(self, model_config=model_config, device_config=device_config, **kwargs)
    load_config = self.load_config
    info = _rank_info(model_config, device_config.device, get_server_args())
    return target_load.load_from_peer(
        load_config, model_config, device_config, role=role, info=info,
        transfer_engine=load_config.remote_instance_weight_loader_transfer_engine,
        session_id=load_config.remote_instance_weight_loader_transfer_engine_session_id,
        pulled=_state.pulled, pipelined=_state.pipelined, instance_id=_state.instance_id,
    )


def _after_runner_load(result, self, *args, **kwargs):
    # Draft models too: they publish and load under their own identity (role "draft").
    if getattr(self, "model", None) is not None:
        _state.rank_infos[id(self.model)] = _rank_info(self.model_config, self.device, self.server_args)
        _state.runners[id(self.model)] = self
    return None


def _around_publish(original, self, *args, **kwargs):
    from sglang.srt.runtime_context import get_model

    role = _state.role(get_model())
    info = _state.rank_infos.get(id(self.model))
    if role.config is None or info is None:
        return original(self, *args, **kwargs)
    if publish.publish_rank(_state, self.model, self.engine, self.session_id, info, role) is None:
        return None
    runner = _state.runners.get(id(self.model))
    _state.sources.append(process.Source(
        engine=self.engine, session_id=self.session_id, role=role,
        model=lambda: runner.model if runner is not None else self.model,
        rank_info=lambda: _rank_info(runner.model_config, runner.device, runner.server_args) if runner else info,
        first_path=info.model_path,
    ))
    return None


def _around_bind_threads(original, *args, **kwargs):
    ops = affinity.linux_ops()
    allowed = ops.get_affinity(affinity.CALLING_THREAD) if ops is not None else ()
    bound = original(*args, **kwargs)
    if ops is not None:
        try:
            _rank_cpus.note(bound, allowed)
        except ValueError as e:  # a cpu list SGLang let through that we cannot read: widen nothing
            log.warning("modelexpress: Mooncake threads will start with the binding's mask: %s", e)
    return bound


def _around_init_engine(original, self, *args, **kwargs):
    from sglang.srt.runtime_context import get_model

    if not _state.role(get_model()).uses_backend:
        return original(self, *args, **kwargs)
    result, widening = affinity.run_widened(lambda: original(self, *args, **kwargs), _rank_cpus.cpus,
                                            affinity.linux_ops())
    log.log(logging.WARNING if widening.failed else logging.INFO, "modelexpress: %s", widening.describe())
    return result


def _before_event_loop(self, *args, **kwargs):
    publish.mark_ready(_state.publishers)
    return None


def _before_weights_change(self, *args, **kwargs):
    process.withdraw(_state, why=f"{type(self).__name__} is about to change the weights in place")
    return None


def _around_resume(original, self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    # The memory came back (withdrawn at release_memory_occupation): READY again only with the very
    # digests published before; anything else stays withdrawn, naming what differs.
    process.republish(_state, unchanged_only=True)
    return result


def _around_update_from_disk(original, self, recv_req, *args, **kwargs):
    process.withdraw(_state, why=f"update_weights_from_disk({recv_req.model_path!r})")
    result = original(self, recv_req, *args, **kwargs)
    # Success or SGLang's rollback: either way the model now holds the checkpoint its
    # model_config names, which is the identity it publishes under again.
    process.republish(_state)
    return result


def _rank_info(model_config, device, server_args):
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return rank.rank_info(
        model_config, device, tp_size=parallel.tp_size, tp_rank=parallel.tp_rank,
        pp_size=parallel.pp_size, pp_rank=parallel.pp_rank, width=lambda key: getattr(parallel, key),
        server_args=server_args,
    )
