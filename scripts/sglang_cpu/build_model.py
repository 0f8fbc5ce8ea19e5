"""Build SGLang 0.5.23's model for a checkpoint in this process, on CPU, TP 1.

The "in-process route": for architectures whose SGLang server cannot serve on
this CPU machine (a Triton kernel or a CPU kernel stops it at forward time),
the model can still be constructed and loaded exactly as SGLang's scheduler
would, without a server, a scheduler or a forward pass:

    PYTHONPATH=scripts/sglang_cpu .venv/bin/python -c '
    import build_model
    disk = build_model.build("/tmp/tiny-llama")                       # SGLang's loader
    dummy = build_model.build("/tmp/tiny-llama", load_format="dummy")  # LoadFormat.DUMMY
    '

What `build` does is the minimal part of SGLang's scheduler start-up plus
`ModelRunner.load_model` for one rank on CPU:

1. a `ServerArgs(model_path=..., device="cpu", tp_size=1, ...)`, published
   process-wide with role "scheduler" and the placement of world rank 0
   (what `run_scheduler_process` does; the legacy shim
   `set_global_server_args_for_scheduler` is the same publish without ranks);
2. once per process: torch.distributed (gloo, world size 1, 127.0.0.1 and a
   free port) through SGLang's `init_distributed_environment`, then
   `initialize_model_parallel` and the DP-attention flags;
3. per model: `ModelConfig.from_server_args`, the DP gathered buffer and
   layernorm-SP flag sized for that model, `LoadConfig(load_format=...)`,
   SGLang's CPU head-count adjustment, `DeviceConfig("cpu")`, and
   `get_model_loader(load_config, model_config).load_model(...)`, which runs
   `load_weights` and every `quant_method.process_weights_after_loading`.

`build` may be called any number of times in one process; the process groups
are built on the first call and reused (TP 1 every time). Each call
re-publishes its own ServerArgs, so SGLang's process-wide configuration
describes the most recently built model.

Run with scripts/sglang_cpu on PYTHONPATH: its sitecustomize.py declares the
torchvision op schemas and sets SGLang's RoPE `_is_cpu` flag.

CLI smoke test:

    PYTHONPATH=scripts/sglang_cpu .venv/bin/python scripts/sglang_cpu/build_model.py MODEL_DIR [--load-format dummy] [--dtype float32] [--list]
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")

import torch

logger = logging.getLogger(__name__)

__all__ = ["build", "shutdown", "tensor_attributes", "summarize", "last_server_args"]

_DIST_READY = False
_LAST_SERVER_ARGS = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _publish(server_args) -> None:
    """Make `server_args` this process's configuration, as rank 0 of TP 1."""
    from sglang.srt.runtime_context import SpawnRanks, publish

    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))


def _init_distributed(server_args) -> None:
    """Build the WORLD and model-parallel groups once per process (gloo, 1 rank)."""
    global _DIST_READY
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.layers.dp_attention import initialize_dp_attention

    if not _DIST_READY:
        if not ps.model_parallel_is_initialized():
            if torch.distributed.is_initialized():
                # Someone else brought torch.distributed up: it must be one rank.
                if torch.distributed.get_world_size() != 1:
                    raise RuntimeError("torch.distributed is already initialized with world size "
                                       f"{torch.distributed.get_world_size()}; build() needs 1")
            ps.init_distributed_environment(
                backend="gloo",
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            )
            ps.initialize_model_parallel()
        _DIST_READY = True
    # Flags derived from the (re)published configuration, as the scheduler sets them.
    initialize_dp_attention(server_args)


def _server_args(model_path: str, load_format: str, dtype: str, overrides: Optional[dict]):
    from sglang.srt.server_args import ServerArgs

    kwargs = dict(
        model_path=model_path,
        device="cpu",
        dtype=dtype,
        load_format=load_format,
        tp_size=1,
        pp_size=1,
        skip_tokenizer_init=True,
        host="127.0.0.1",
        random_seed=0,
    )
    kwargs.update(overrides or {})
    return ServerArgs(**kwargs)


def build(model_path: str, *, load_format: str = "auto", dtype: str = "float32",
          server_args_overrides: Optional[dict] = None) -> torch.nn.Module:
    """Construct and load SGLang's model class for `model_path` on CPU, TP 1.

    `load_format` is any SGLang load format ("auto", "safetensors", "dummy", ...);
    `dtype` is SGLang's --dtype. `server_args_overrides` adds ServerArgs fields
    (for instance {"json_model_override_args": "..."}). Returns the model in
    eval mode after SGLang's loader has run `load_weights` (or the dummy
    initializer) and `process_weights_after_loading`.
    """
    global _LAST_SERVER_ARGS
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.configs.update_config import adjust_config_with_unaligned_cpu_tp
    from sglang.srt.layers.dp_attention import init_dp_gathered_buffer
    from sglang.srt.layers.layernorm_sp import initialize_layernorm_sp
    from sglang.srt.model_loader.loader import get_model_loader

    server_args = _server_args(str(model_path), load_format, dtype, server_args_overrides)
    _publish(server_args)
    _LAST_SERVER_ARGS = server_args
    _init_distributed(server_args)

    model_config = ModelConfig.from_server_args(server_args)
    init_dp_gathered_buffer(model_config)
    initialize_layernorm_sp(model_config=model_config)

    load_config = LoadConfig(load_format=load_format, tp_rank=0)
    # ModelRunner.load_model does this on CPU (records the original head counts).
    model_config = adjust_config_with_unaligned_cpu_tp(model_config, load_config, 1)

    loader = get_model_loader(load_config, model_config)
    model = loader.load_model(model_config=model_config, device_config=DeviceConfig("cpu", gpu_id=0))
    return model


def shutdown() -> None:
    """Tear down the process groups and torch.distributed that `build` brought up.

    Optional: a later `build` brings them up again (on a new free port). Models
    already built stay usable as modules (their tensors are untouched).
    """
    global _DIST_READY
    from sglang.srt.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.destroy_distributed_environment()
    _DIST_READY = False


def last_server_args():
    """The ServerArgs the latest `build` published (None before the first)."""
    return _LAST_SERVER_ARGS


def tensor_attributes(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Tensors hung on modules as plain attributes: in vars(module) but neither
    a registered parameter nor a registered buffer (post-processing leftovers)."""
    found: Dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            # (a Parameter found here was assigned around nn.Module.__setattr__)
            if isinstance(value, torch.Tensor):
                found[f"{mod_name}.{attr}" if mod_name else attr] = value
    return found


def summarize(model: torch.nn.Module) -> Tuple[int, int, int]:
    """(#named_parameters, #named_buffers, #unregistered tensor attributes)."""
    return (sum(1 for _ in model.named_parameters()),
            sum(1 for _ in model.named_buffers()),
            len(tensor_attributes(model)))


def _main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build SGLang's model for a checkpoint on CPU (smoke test).")
    p.add_argument("model_path")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--also-dummy", action="store_true", help="then build it again with load_format=dummy")
    p.add_argument("--list", action="store_true", help="print every parameter, buffer and tensor attribute")
    args = p.parse_args(argv)

    formats = [args.load_format] + (["dummy"] if args.also_dummy else [])
    for fmt in formats:
        model = build(args.model_path, load_format=fmt, dtype=args.dtype)
        n_p, n_b, n_a = summarize(model)
        print(f"{type(model).__name__} load_format={fmt}: params={n_p} buffers={n_b} tensor_attrs={n_a}")
        if args.list:
            for name, t in model.named_parameters():
                print(f"  param  {name} {tuple(t.shape)} {t.dtype}")
            for name, t in model.named_buffers():
                print(f"  buffer {name} {tuple(t.shape)} {t.dtype}")
            for name, t in tensor_attributes(model).items():
                print(f"  attr   {name} {tuple(t.shape)} {t.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
