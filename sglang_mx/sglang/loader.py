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
import os
import threading
import time
import uuid
from typing import Callable

from sglang_mx.errors import MxError
from sglang_mx.layout import RankInfo, identity_for
from sglang_mx.roles import LaunchSettings, Role, falls_back_to_disk, role_of

log = logging.getLogger("sglang_mx")

# Parallel widths besides TP/PP that change a rank's tensor layout.
LAYOUT_KEYS = ("attn_tp_size", "attn_cp_size", "attn_dp_size", "moe_ep_size", "moe_tp_size", "moe_dp_size")
# ServerArgs fields that pick kernels which repack weights in place during post-processing
# (same shapes, other bytes): read from SGLang 0.5.23's quantization and MoE code.
BYTE_SETTINGS = ("moe_runner_backend", "moe_a2a_backend", "fp8_gemm_runner_backend", "fp4_gemm_runner_backend",
                 "enable_deterministic_inference")
# Environment flags read by that code with the same effect (seed and target must agree).
BYTE_ENV = ("SGLANG_ENABLE_JIT_DEEPGEMM", "SGLANG_USE_AITER", "SGLANG_USE_AITER_FP8_PER_TOKEN",
            "SGLANG_USE_AITER_MOE_GU_ITLV", "SGLANG_FORCE_FP8_MARLIN", "SGLANG_OPT_HOPPER_BLOCK_FP8_BF16",
            "SGLANG_MOE_PADDING", "SGLANG_OPT_DEEPGEMM_HC_PRENORM", "SGLANG_INT4_WEIGHT")

_NO_ENGINE = ("SGLang created no Mooncake TransferEngine for the modelexpress backend: install "
              "mooncake-transfer-engine (or -non-cuda) in SGLang's environment")


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


# --- rank facts -------------------------------------------------------------------

def byte_settings(server_args, environ=None) -> dict[str, str]:
    """The BYTE_SETTINGS this SGLang defines and the BYTE_ENV flags that are set, as strings."""
    import os

    environ = os.environ if environ is None else environ
    found = {}
    for key in BYTE_SETTINGS:
        value = getattr(server_args, key, None)
        if value is not None:
            found[key] = str(getattr(value, "value", value))
    found.update((f"env.{key}", environ[key]) for key in BYTE_ENV if key in environ)
    return found


def rank_info(model_config, device, *, tp_size: int, tp_rank: int, pp_size: int, pp_rank: int,
              width: Callable[[str], object], server_args=None) -> RankInfo:
    """The RankInfo of one rank; `width(key)` gives a LAYOUT_KEYS width, raising
    AttributeError when this SGLang build does not define it. A speculative
    draft model (`model_config.is_draft_model`) gets role "draft": its own identity."""
    import sglang
    import torch

    device_type = torch.device(device).type
    gpu_arch = cuda_version = ""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        gpu_arch, cuda_version = f"sm_{major}{minor}", torch.version.cuda or ""

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
        device=device_type,
        framework_version=sglang.__version__,
        layout=layout,
        byte_settings=byte_settings(server_args) if server_args is not None else {},
        torch_version=torch.__version__,
        cuda_version=cuda_version,
        gpu_arch=gpu_arch,
        role="draft" if getattr(model_config, "is_draft_model", False) else "",
    )


# --- the target's load ------------------------------------------------------------

def load_from_peer(load_config, model_config, device_config, *, role: Role, info: RankInfo, transfer_engine,
                   session_id: str, pulled: dict | None = None):
    """Build the model with dummy weights, post-process it, and pull every tensor
    from a READY seed; with fallback=disk, load from disk when no seed serves.

    `--model-loader-extra-config` belongs to the disk loaders: the dummy build runs
    without it (SGLang's dummy loader refuses any), a fallback load with it.
    A model filled from a peer is added (id -> the digests its bytes were verified against) to
    `pulled`: it may seed at once.
    """
    from sglang.srt.configs.load_config import LoadFormat
    from sglang.srt.model_loader.loader import DefaultModelLoader, DummyModelLoader

    from sglang_mx.model_tensors import (
        account, collect_tensors, layout_fingerprint, refresh_derived, uncarried_state,
    )
    from sglang_mx.roles import load_with_fallback
    from sglang_mx.transfer.engine import MooncakeEngine

    if transfer_engine is None:
        raise MxError(_NO_ENGINE)
    engine = MooncakeEngine.wrap(transfer_engine, session_id)
    quantized = bool(model_config.quantization)

    def build():
        start = time.perf_counter()
        # SGLang's own dummy load, post-processing included: the same tensor layout
        # the seed published (quantized models rename and repack here).
        dummy = dataclasses.replace(load_config, load_format=LoadFormat.DUMMY, model_loader_extra_config={})
        with _dummy_fill(fill=quantized):
            model = DummyModelLoader(dummy).load_model(model_config=model_config, device_config=device_config)
        synchronize(device_config.device)  # post-processing kernels done before the first byte moves
        log.info("modelexpress: model built and post-processed in %.3f s before the pull (weights %s)",
                 time.perf_counter() - start, "filled with constants" if quantized else "not filled")
        return model

    def pull(model):
        from sglang_mx.target import pull_into  # grpc and protobuf: imported by `early` meanwhile

        uncarried = uncarried_state(model)
        if uncarried:  # flags post-processing computed from dummy values: never serve them
            raise MxError(f"the model holds value-derived state sglang-mx cannot carry from a peer "
                          f"({', '.join(uncarried[:5])}{' ...' if len(uncarried) > 5 else ''}); load it from disk "
                          "(fallback: disk)")
        start = time.perf_counter()
        tensors = collect_tensors(model)  # a tensor it cannot place: UnplacedTensorError, before any byte moves
        info_now = dataclasses.replace(info, layout_fingerprint=layout_fingerprint(model))
        shards = None
        if role.config.any_layout:
            shards, why = layout_facts(model, tensors, info_now)
            if shards is None:
                log.info("modelexpress: only seeds of this exact layout can serve this rank: %s", why)
        client = early.take()
        log.info("modelexpress: tensors collected and identity fingerprinted in %.3f s",
                 time.perf_counter() - start)
        report = pull_into(tensors, engine, info_now, role.config, client=client, shards=shards)
        refreshed = refresh_derived(model)
        if refreshed:
            log.info("modelexpress: recomputed %d value-derived attribute(s) from the pulled weights: %s",
                     len(refreshed), ", ".join(refreshed[:5]))
        tally = account(model, tensors)  # nothing kept that the pull did not write, unless local by rule
        log.info("modelexpress: every byte accounted for: %d tensor(s) written by the pull (%d B, %d verified) "
                 "+ %d local by rule (%d B) == %d B of model memory", tally.written_tensors, tally.written,
                 report.verified, tally.local_tensors, tally.local, tally.total)
        if pulled is not None:
            pulled[id(model)] = dict(report.digests)
        return model.eval()

    def from_disk():
        disk = dataclasses.replace(load_config, load_format=LoadFormat.AUTO)
        return DefaultModelLoader(disk).load_model(model_config=model_config, device_config=device_config)

    early = _EarlyClient(role.config)  # connects while the model builds
    try:
        return load_with_fallback(build, pull, from_disk, fall_back=falls_back_to_disk(role.config),
                                  what=model_config.model_path)
    finally:
        early.close()


class _EarlyClient:
    """A metadata client made, and its channel connected, in a thread while the model builds.

    The identity's layout fingerprint needs the built model, so listing waits for
    the build; importing grpc and protobuf (0.4 s here) and the connection do not.
    If anything goes wrong here the pull makes its own client, whose calls report it.
    """

    def __init__(self, config) -> None:
        self._client = None
        self._thread = threading.Thread(target=self._connect, args=(config,), name="modelexpress-connect",
                                        daemon=True)
        self._thread.start()

    def _connect(self, config) -> None:
        try:
            import sglang_mx.target  # noqa: F401  (the pull's imports, grpc and protobuf among them)
            from sglang_mx.client import MetadataClient

            self._client = MetadataClient.for_config(config)
            if not self._client.connect():
                log.warning("modelexpress: metadata server %s did not answer while the model was built", config.url)
        except Exception as e:  # noqa: BLE001  the pull's own client will raise the real error
            log.warning("modelexpress: could not connect to the metadata server early: %s", e)

    def take(self):
        """The client (the caller closes it), or None."""
        self._thread.join()
        client, self._client = self._client, None
        return client

    def close(self) -> None:
        client = self.take()
        if client is not None:
            client.close()


def synchronize(device) -> None:
    """Wait for every kernel queued on `device` (a no-op off CUDA)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _dummy_fill(*, fill: bool):
    """Replace the random init of SGLang's dummy loader: no fill at all, or (`fill`) constants.

    Every byte is overwritten by the pull, so random init (seconds per GB on a
    CPU) is wasted. An unquantized model's post-processing is at most a repack
    of the values (same bytes moved around, e.g. the CPU AMX weight packing) and
    the repacked tensors are what the seed published and the pull overwrites,
    so its weights are left unwritten: fresh memory, populated (MADV_POPULATE_WRITE)
    just before each read is submitted, which is cheaper than a fill. A quantized
    model's post-processing computes from the values (scales, requantization) and
    may branch on them, so it gets harmless constants, written with one intra-op
    thread: many small parallel fills on a busy 2-core machine wait on OpenMP
    barriers (1.3 s instead of 0.6 s per GB measured here). SGLang's loader calls
    `initialize_dummy_weights` through its module globals (0.5.10 and 0.5.23
    alike); the swap lasts for this one load, in the loading thread.
    """
    from sglang.srt.model_loader import loader

    original = getattr(loader, "initialize_dummy_weights", None)
    if original is None:  # a release that does not fill this way: leave it alone
        yield
        return
    loader.initialize_dummy_weights = _fill_constant if fill else _no_fill
    try:
        yield
    finally:
        loader.initialize_dummy_weights = original


def _no_fill(model, *args, **kwargs) -> None:
    pass


def _fill_constant(model, *args, **kwargs) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and tensor.element_size() >= 2:
                    tensor.fill_(1.0 if "scale" in name else 1e-3)
                elif tensor.numel():
                    tensor.zero_()
    finally:
        torch.set_num_threads(threads)


# --- the seed's publication ---------------------------------------------------------

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
    from sglang_mx.seed import start_seed
    from sglang_mx.transfer.engine import MooncakeEngine

    if transfer_engine is None:
        raise MxError(_NO_ENGINE)
    config = role.config
    info = dataclasses.replace(info, layout_fingerprint=layout_fingerprint(model))
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
        worker_id=f"{instance_id}-rank{info.worker_rank}", heartbeat_interval_s=config.heartbeat_interval_s,
        accelerator=info.device, max_readers=config.max_readers, lease_ttl_s=config.reader_lease_s,
        shards=shards, topology=topology, known_digests=known_digests,
    )


def layout_facts(model, tensors, info: RankInfo) -> tuple[dict | None, str]:
    """(the split facts of every tensor in `tensors`, "") when a mixed-layout pull can be planned
    for this rank, else (None, why not: the layout, or the first tensor without facts)."""
    from sglang_mx.layout import layout_refusal
    from sglang_mx.sglang.shard_facts import shard_facts

    why = layout_refusal(info)
    if why:
        return None, why
    specs, reasons = shard_facts(model)
    for name in tensors:
        if name not in specs:
            return None, f"tensor {name!r}: {reasons.get(name, 'not a parameter of a layer sglang-mx knows')}"
    return {name: specs[name] for name in tensors}, ""


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
        publisher.close()
        log.warning("modelexpress: worker %s (rank %d) withdrawn from %s: %s", publisher.worker_id,
                    publisher.worker_rank, publisher.mx_source_id, why)


def republish(state: ProcessState) -> None:
    """After an update from disk: publish every source under the identity of what it now holds."""
    from sglang_mx.errors import UnplacedTensorError

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
        state.publishers.append(publisher)
        mark_ready([publisher])


def mark_ready(publishers) -> None:
    """Every publisher of `publishers` goes READY (once the rank serves, or at once after a pull)."""
    for publisher in publishers:
        publisher.mark_ready()
        log.info("modelexpress: worker %s (rank %d) is READY on %s", publisher.worker_id,
                 publisher.worker_rank, publisher.mx_source_id)
