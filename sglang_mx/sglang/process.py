"""What one SGLang process carries from its start to its event loop, shared by the plugin (SGLang
0.5.15+) and the 0.5.10 adapter: its role, its instance id, the ranks it publishes, and the
withdrawal of its seeds before its weights change.

Both entry modules reach SGLang their own way (hooks, or calls the patch adds),
gather the same plain facts and call `sglang.rank`, `sglang.target_load` and
`sglang.publish`, so roles, identities, the target's load and the seed's
publication happen one way. SGLang's own modules, and ours that bring grpc and
Mooncake, are imported inside the functions that use them: every SGLang process
loads the plugin, most never load or publish through it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Callable

from sglang_mx.errors import MxError
from sglang_mx.layout import RankInfo
from sglang_mx.roles import LaunchSettings, Role, role_of

log = logging.getLogger("sglang_mx")

NO_ENGINE = ("SGLang created no Mooncake TransferEngine for the modelexpress backend: install "
              "mooncake-transfer-engine (or -non-cuda) in SGLang's environment")



def require_engine(transfer_engine) -> None:
    """MxError when SGLang created no TransferEngine for this backend."""
    if transfer_engine is None:
        raise MxError(NO_ENGINE)


@dataclasses.dataclass
class ProcessState:
    """What one SGLang process carries from its start to its event loop.

    Hooks and patch calls are free functions, so each entry module keeps one.
    The role (and so the config) is parsed once per process and kept here.
    """

    # Shared by every rank of one SGLang instance (`new_instance` in the launcher; schedulers inherit it).
    instance_id: str = dataclasses.field(default_factory=lambda: os.environ.get(INSTANCE_ENV) or uuid.uuid4().hex[:12])
    roles: dict = dataclasses.field(default_factory=dict)  # LaunchSettings -> Role
    rank_infos: dict = dataclasses.field(default_factory=dict)  # id(model) -> RankInfo (plugin)
    runners: dict = dataclasses.field(default_factory=dict)  # id(model) -> SGLang ModelRunner (plugin)
    publishers: list = dataclasses.field(default_factory=list)  # the live SeedPublishers
    sources: list = dataclasses.field(default_factory=list)  # what this process publishes (Source)
    # id(model) -> the digests its pulled weights were verified against, for models whose weights came
    # from a peer (pulled, and verified per `verify`): their weights are final (post-processing ran
    # before the pull), so they go READY as soon as published, with those digests.
    pulled: dict = dataclasses.field(default_factory=dict)
    # id(model) -> the SeedPublisher a pipelined pull (config `pipeline`) left READY: the rank served its
    # verified tensors while it pulled, and publication adopts that publisher instead of starting one.
    pipelined: dict = dataclasses.field(default_factory=dict)
    # worker id -> name -> digest, of every seed withdrawn: what it published before its weights changed
    # (a seed resuming after SGLang released its memory goes READY again only with these very digests).
    withdrawn: dict = dataclasses.field(default_factory=dict)

    def role(self, server_args) -> Role:
        """This process's role, parsed from SGLang's ServerArgs on first use."""
        settings = settings_of(server_args)
        if settings not in self.roles:
            self.roles[settings] = role_of(settings)
        return self.roles[settings]


# Carries the instance id from SGLang's launcher to its scheduler processes (spawned with its environment).
INSTANCE_ENV = "SGLANG_MX_INSTANCE_ID"


def new_instance() -> None:
    """In the launcher, before any scheduler starts: a fresh id every rank of this instance will share
    (worker ids are `<instance>-rank<N>`; a target of another layout takes an instance's ranks together)."""
    os.environ[INSTANCE_ENV] = uuid.uuid4().hex[:12]


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


@dataclasses.dataclass(frozen=True)
class Source:
    """One rank this process publishes, enough to publish it again after its weights changed."""

    engine: object  # SGLang's TransferEngine
    session_id: str
    role: Role
    model: Callable[[], object]  # the rank's model as it is now
    rank_info: Callable[[], RankInfo]  # its facts as they are now (model path included)
    first_path: str  # the model path it was first published with


def withdraw(state: ProcessState, *, why: str) -> None:
    """Every seed of this process goes STALE and releases its memory, before its weights change.

    A target reading at that moment fails (or its digest check does) and moves on.
    """
    publishers, state.publishers = state.publishers, []
    for publisher in publishers:
        state.withdrawn[publisher.worker_id] = publisher.digests
        publisher.close()
        log.warning("modelexpress: worker %s (rank %d) withdrawn from %s: %s", publisher.worker_id,
                    publisher.worker_rank, publisher.mx_source_id, why)


def republish(state: ProcessState, *, unchanged_only: bool = False) -> None:
    """After an update from disk: publish every source under the identity of what it now holds.

    `unchanged_only` (after SGLang gave the weights' memory back, `resume_memory_occupation`):
    a source goes READY again only when every digest equals what it published before it was
    withdrawn; otherwise it is published and closed at once (STALE), saying which tensors differ.
    """
    from sglang_mx.errors import UnplacedTensorError
    from sglang_mx.sglang.publish import mark_ready, publish

    for source in state.sources:
        info = source.rank_info()
        if source.role.config.model_name and info.model_path != source.first_path:
            # model_name names the first checkpoint: the identity cannot say what is held now.
            log.warning("modelexpress: not publishing %s again: the config's model_name %r named %s",
                        info.model_path, source.role.config.model_name, source.first_path)
            continue
        try:
            publisher = publish(source.model(), source.engine, source.session_id, info, source.role,
                                instance_id=state.instance_id)
        except UnplacedTensorError as e:
            log.error("modelexpress: not publishing %s again: %s", info.model_path, e)
            continue
        before = state.withdrawn.pop(publisher.worker_id, None)
        if unchanged_only and publisher.digests != before:
            changed = sorted(n for n in set(publisher.digests) | set(before or {})
                             if publisher.digests.get(n) != (before or {}).get(n))
            publisher.close()
            log.warning("modelexpress: worker %s stays withdrawn after the memory came back: %s",
                        publisher.worker_id, f"{len(changed)} tensor(s) differ from what it published ("
                        f"{', '.join(changed[:5])})" if before is not None else "nothing published before to compare")
            continue
        state.publishers.append(publisher)
        mark_ready([publisher])
