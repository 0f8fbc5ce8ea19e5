"""What patches/sglang-0.5.10.patch calls: the modelexpress backend on SGLang
releases without the plugin system.

SGLang 0.5.10 names the `modelexpress` backend but has no `sglang.srt.plugins`
entry point. The patch adds one call into this module at each place where
`sglang_mx.sglang.plugin` installs a hook on newer releases:

- `ServerArgs.__post_init__` -> `check_server_args` (the launcher rejects a bad
  `--modelexpress-config`, naming the key).
- `ServerArgs._parsed_modelexpress_config` -> `modelexpress_keys`: SGLang's own
  `modelexpress_url` / `_model_name` / `_source` come from our parse, so SGLang
  creates its Mooncake TransferEngine exactly when this backend loads or publishes.
- `RemoteInstanceModelLoader.load_model` (backend modelexpress) -> `load_model`.
- `ModelRunner.load_model`, after the model is loaded -> `publish_after_load`
  (instead of SGLang's own ModelExpress publication).
- `Scheduler.run_event_loop` -> `mark_ready`.

These functions only read 0.5.10's objects; the logic is
`sglang_mx.sglang.process`, `.rank`, `.target_load` and `.publish`'s, shared with the plugin. SGLang is imported inside
functions only.
"""

from __future__ import annotations

import logging

from sglang_mx.sglang import process, publish, rank, target_load

log = logging.getLogger("sglang_mx")

__all__ = ["check_server_args", "load_model", "mark_ready", "modelexpress_keys", "publish_after_load"]


_state = process.ProcessState()


def check_server_args(server_args) -> None:
    """Raise ConfigError for a bad `--modelexpress-config` (launcher, at start-up)."""
    process.log_at_info()
    _state.role(server_args)
    process.new_instance()


def modelexpress_keys(server_args) -> dict:
    """The dict behind 0.5.10's `modelexpress_url`, `_model_name` and `_source`.

    "source" is whether this instance publishes (a target does unless
    source=false), which is also when 0.5.10 creates a TransferEngine for it.
    """
    role = _state.role(server_args)
    if role.config is None:
        return {}
    return {"url": role.config.url, "model_name": role.config.model_name, "source": role.seed}


def load_model(model_loader, *, model_config, device_config):
    """`RemoteInstanceModelLoader.load_model` for backend modelexpress: pull from a seed."""
    from sglang.srt.server_args import get_global_server_args

    process.log_at_info()
    load_config = model_loader.load_config
    return target_load.load_from_peer(
        load_config, model_config, device_config,
        role=_state.role(get_global_server_args()),
        info=_rank_info(model_config, device_config.device, get_global_server_args()),
        transfer_engine=load_config.remote_instance_weight_loader_transfer_engine,
        session_id="",  # 0.5.10's LoadConfig lacks it; a target only reads, so it is not published
        pulled=_state.pulled,
    )


def publish_after_load(model_runner) -> None:
    """After `ModelRunner.load_model`: publish this rank's weights when configured to."""
    if getattr(model_runner, "is_draft_worker", False) or getattr(model_runner, "model", None) is None:
        return
    process.log_at_info()
    role = _state.role(model_runner.server_args)
    if role.config is None:
        return
    publish.publish_rank(
        _state, model_runner.model, model_runner.remote_instance_transfer_engine,
        model_runner.remote_instance_transfer_engine_session_id,
        _rank_info(model_runner.model_config, model_runner.device, server_args=model_runner.server_args), role,
    )


def mark_ready() -> None:
    """Before `Scheduler.run_event_loop`: this process's seeds go READY."""
    publish.mark_ready(_state.publishers)


def _rank_info(model_config, device, server_args):
    # 0.5.10 keeps its parallel state in module functions (no runtime_context).
    from sglang.srt.distributed import parallel_state
    from sglang.srt.layers import dp_attention

    # Looked up when asked: a getter this build lacks raises AttributeError, which rank_info skips.
    widths = {
        "attn_tp_size": (dp_attention, "get_attention_tp_size"),
        "attn_cp_size": (dp_attention, "get_attention_cp_size"),
        "attn_dp_size": (dp_attention, "get_attention_dp_size"),
        "moe_ep_size": (parallel_state, "get_moe_expert_parallel_world_size"),
        "moe_tp_size": (parallel_state, "get_moe_tensor_parallel_world_size"),
        "moe_dp_size": (parallel_state, "get_moe_data_parallel_world_size"),
    }
    pp = parallel_state.get_pp_group()
    return rank.rank_info(
        model_config, device,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_size=pp.world_size, pp_rank=pp.rank_in_group,
        width=lambda key: getattr(*widths[key])(),
        server_args=server_args,
    )
