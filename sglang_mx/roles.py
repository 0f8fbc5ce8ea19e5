"""Who loads from a peer, who publishes, and when to fall back: pure rules.

The SGLang glue reads three settings off SGLang's ServerArgs into a
`LaunchSettings` and asks `role_of`; nothing here imports SGLang, so every
rule tests without it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Callable, TypeVar

from sglang_mx.config import MxConfig, parse_config
from sglang_mx.errors import MxError, ReadsInFlightError

log = logging.getLogger(__name__)

BACKEND = "modelexpress"  # --remote-instance-weight-loader-backend
LOAD_FORMAT = "remote_instance"  # --load-format
# The --load-format values (SGLang 0.5.23's LoadFormat) that read the model's own checkpoint files.
# Only an instance loaded this way (or a target of this backend, whose pull was checked) publishes:
# `dummy` weights are random, and the others come from elsewhere (another instance over NCCL or IPC,
# an RL trainer, a private loader) with nothing that ties them to the checkpoint the identity names.
CHECKPOINT_FORMATS = frozenset({
    "auto", "pt", "safetensors", "instanttensor", "npcache", "sharded_state", "presharded", "gguf",
    "bitsandbytes", "mistral", "layered", "fastsafetensors", "runai_streamer", "remote", "jax",
})


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """The SGLang settings that decide this backend's role (plain strings)."""

    load_format: str
    backend: str  # --remote-instance-weight-loader-backend, e.g. "nccl", "modelexpress"
    modelexpress_config: str | None  # the raw --modelexpress-config


@dataclasses.dataclass(frozen=True)
class Role:
    """What this instance does with the backend. `config` is None when it does nothing."""

    config: MxConfig | None
    target: bool  # loads its weights from a peer
    seed: bool  # publishes its weights once loaded
    why_not_seed: str = ""  # set when `source: true` was asked for and refused

    @property
    def uses_backend(self) -> bool:
        """SGLang must create its Mooncake TransferEngine (to read, or to be read)."""
        return self.target or self.seed


def role_of(settings: LaunchSettings) -> Role:
    """Parse the config (raising ConfigError for a bad one) and decide the role.

    - A target is an instance started with `--load-format remote_instance
      --remote-instance-weight-loader-backend modelexpress`.
    - A target publishes too unless `source` is false: a fleet seeds itself.
    - An instance that loads from disk publishes only with `source: true`; a
      config without it is still checked, so a typo never passes silently.
    - Only weights read from the checkpoint seed: with any other --load-format
      (`dummy` above all) `source: true` is refused; the role keeps the config
      (so SGLang's own publication stays off) and says why in `why_not_seed`.
    """
    target = settings.load_format == LOAD_FORMAT and settings.backend == BACKEND
    if not target and not settings.modelexpress_config:
        return Role(config=None, target=False, seed=False)
    config = parse_config(settings.modelexpress_config)
    seed = config.source if config.source is not None else target
    if not target and not seed:
        return Role(config=None, target=False, seed=False)
    if not target and settings.load_format not in CHECKPOINT_FORMATS:
        return Role(config=config, target=False, seed=False, why_not_seed=(
            f"--load-format {settings.load_format} does not read the model's checkpoint, and only weights read "
            f"from it are published (source: true needs one of {', '.join(sorted(CHECKPOINT_FORMATS))}, or a "
            f"target of this backend)"))
    return Role(config=config, target=target, seed=seed)


def falls_back_to_disk(config: MxConfig) -> bool:
    """After no seed could serve a target: load from disk (True) or fail the start-up (False)."""
    return config.fallback == "disk"


M = TypeVar("M")


def load_with_fallback(build: Callable[[], M], pull: Callable[[M], M], from_disk: Callable[[], M], *,
                       fall_back: bool, what: str) -> M:
    """`pull(build())`, or, when no seed could serve (an MxError) and `fall_back` is set,
    `from_disk()` once the built model is gone.

    The built model is dropped, and the failure's traceback with it (it holds the
    frames that held the model's tensors), before the disk load allocates a second
    copy: on a GPU two copies of the weights would not fit for any model over half
    its memory. Without `fall_back` the error propagates.
    """
    model = build()
    try:
        return pull(model)
    except ReadsInFlightError:
        raise  # memory a peer may still write: no disk load may reuse it
    except MxError as e:
        if not fall_back:
            raise
        reason = str(e)
    del model
    gc.collect()  # cycles through the dropped traceback's frames
    log.warning("modelexpress: no usable seed, loading %s from disk instead (fallback=disk): %s", what, reason)
    return from_disk()
