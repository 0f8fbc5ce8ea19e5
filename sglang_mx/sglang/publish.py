"""The seed's publication inside SGLang: one path for the plugin and the 0.5.10 adapter."""

from __future__ import annotations

import dataclasses
import logging

from sglang_mx.layout import RankInfo, identity_for
from sglang_mx.roles import Role
from sglang_mx.sglang.process import ProcessState, require_engine
from sglang_mx.sglang.rank import layout_facts, with_checkpoint

log = logging.getLogger("sglang_mx")


def publish_rank(state: ProcessState, model, transfer_engine, session_id: str, info: RankInfo, role: Role):
    """The one publication path of the plugin and the 0.5.10 adapter: publish one rank when its role
    seeds, else log why not; returns the SeedPublisher, or None when nothing was published.

    A model holding a tensor the rule cannot place (UnplacedTensorError) is not published; the
    instance keeps serving its own requests. A rank whose weights were pulled from a peer goes
    READY at once (cascade: its weights are final and were checked).
    """
    from sglang_mx.errors import UnplacedTensorError

    if not role.seed:
        log.info("modelexpress: not publishing this instance: %s", role.why_not_seed or "source=false")
        return None
    adopted = state.pipelined.pop(id(model), None)
    if adopted is not None:  # a pipelined pull published this rank already, and it is READY
        state.publishers.append(adopted)
        log.info("modelexpress: worker %s (rank %d) has served its verified tensors since its pull began and is "
                 "READY", adopted.worker_id, adopted.worker_rank)
        return adopted
    try:
        publisher = publish(model, transfer_engine, session_id, info, role, instance_id=state.instance_id,
                            known_digests=state.pulled.get(id(model)))
    except UnplacedTensorError as e:
        log.error("modelexpress: not publishing rank %d of %s: %s", info.worker_rank, info.model_path, e)
        return None
    state.publishers.append(publisher)
    if id(model) in state.pulled:
        mark_ready([publisher])
    return publisher


def publish(model, transfer_engine, session_id: str, info: RankInfo, role: Role, *, instance_id: str,
            known_digests=None):
    """Register and publish one rank's tensors (INITIALIZING); returns the SeedPublisher.

    `known_digests`: what the pull verified these weights against (ProcessState.pulled)."""
    from sglang_mx.client import MetadataClient
    from sglang_mx.layout import model_source_id, seed_topology
    from sglang_mx.model_tensors import collect_tensors, layout_fingerprint
    from sglang_mx.seed import SeedOptions, start_seed
    from sglang_mx.transfer.engine import MooncakeEngine

    require_engine(transfer_engine)
    config = role.config
    info = dataclasses.replace(info if config.checkpoint else with_checkpoint(info),
                               layout_fingerprint=layout_fingerprint(model))
    tensors = collect_tensors(model)
    shards, why = layout_facts(model, tensors, info)
    topology = None
    if shards is None:
        log.info("modelexpress: rank %d serves targets of its own layout only: %s", info.worker_rank, why)
    else:
        topology = seed_topology(model_id=model_source_id(info, config), tp_size=info.tp_size,
                                 pp_size=info.pp_size, instance=instance_id)
    return start_seed(
        tensors, MooncakeEngine.wrap(transfer_engine, session_id), identity_for(info, config),
        MetadataClient.for_config(config), worker_rank=info.worker_rank,
        worker_id=f"{instance_id}-rank{info.worker_rank}", options=SeedOptions.from_config(config, accelerator=info.device),
        shards=shards, topology=topology, known_digests=known_digests,
    )


def mark_ready(publishers) -> None:
    """Every publisher of `publishers` goes READY (once the rank serves, or at once after a pull)."""
    for publisher in publishers:
        publisher.mark_ready()
        log.info("modelexpress: worker %s (rank %d) is READY on %s", publisher.worker_id,
                 publisher.worker_rank, publisher.mx_source_id)
