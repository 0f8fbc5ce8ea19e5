"""The target's load inside SGLang: build the model with dummy weights, post-process it, pull
every tensor from a seed, prove every byte accounted for, or fall back to disk."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time

from sglang_mx.errors import MxError
from sglang_mx.layout import RankInfo
from sglang_mx.roles import Role, falls_back_to_disk
from sglang_mx.sglang.process import require_engine
from sglang_mx.sglang.rank import layout_facts, with_checkpoint

log = logging.getLogger("sglang_mx")


def load_from_peer(load_config, model_config, device_config, *, role: Role, info: RankInfo, transfer_engine,
                   session_id: str, pulled: dict | None = None, pipelined: dict | None = None,
                   instance_id: str = ""):
    """Build the model with dummy weights, post-process it, and pull every tensor
    from a READY seed; with fallback=disk, load from disk when no seed serves.

    `--model-loader-extra-config` belongs to the disk loaders: the dummy build runs
    without it (SGLang's dummy loader refuses any), a fallback load with it.
    A model filled from a peer is added (id -> the digests its bytes were verified against) to
    `pulled`: it may seed at once. With config `pipeline` (and a role that seeds), the rank
    publishes itself as a partial seed while it pulls (sglang_mx.target.pipeline) and ends a READY
    seed, added to `pipelined` (id -> its SeedPublisher) for the publication step to adopt.
    """
    from sglang.srt.configs.load_config import LoadFormat
    from sglang.srt.model_loader.loader import DefaultModelLoader, DummyModelLoader

    from sglang_mx.model_tensors import (
        account, collect_tensors, layout_fingerprint, refresh_derived, uncarried_state,
    )
    from sglang_mx.roles import load_with_fallback
    from sglang_mx.transfer.engine import MooncakeEngine

    require_engine(transfer_engine)
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
        info_now = dataclasses.replace(content.result(), layout_fingerprint=layout_fingerprint(model))
        shards = None
        if role.config.any_layout:
            shards, why = layout_facts(model, tensors, info_now)
            if shards is None:
                log.info("modelexpress: only seeds of this exact layout can serve this rank: %s", why)
        client = early.take()
        log.info("modelexpress: tensors collected and identity fingerprinted in %.3f s",
                 time.perf_counter() - start)
        pipeline = _pipeline_seed(tensors, engine, info_now, role, shards, instance_id) if (
            pipelined is not None) else None
        try:
            report = pull_into(tensors, engine, info_now, role.config, client=client, shards=shards,
                               pipeline=pipeline)
            refreshed = refresh_derived(model)
            if refreshed:
                log.info("modelexpress: recomputed %d value-derived attribute(s) from the pulled weights: %s",
                         len(refreshed), ", ".join(refreshed[:5]))
            tally = account(model, tensors)  # nothing kept that the pull did not write, unless local by rule
        except BaseException:
            if pipeline is not None and pipeline.publisher is not None:
                pipeline.publisher.close()  # this rank will not serve: neither does its seed
            raise
        if pipeline is not None:
            pipelined[id(model)] = pipeline.publisher
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
    # What the checkpoint is by content, hashed (or read from its cache) while the model builds.
    hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="modelexpress-content")
    content = hashing.submit(lambda: info if role.config.checkpoint else with_checkpoint(info))
    hashing.shutdown(wait=False)
    try:
        return load_with_fallback(build, pull, from_disk, fall_back=falls_back_to_disk(role.config),
                                  what=model_config.model_path)
    finally:
        early.close()


def _pipeline_seed(tensors, engine, info: RankInfo, role: Role, shards, instance_id: str):
    """The PipelineSeed of a rank configured with `pipeline` whose role seeds (None otherwise)."""
    config = role.config
    if not (config.pipeline and role.seed):
        return None
    from sglang_mx.client import MetadataClient
    from sglang_mx.layout import identity_for, model_source_id, seed_topology
    from sglang_mx.seed import SeedOptions
    from sglang_mx.target.pipeline import PipelineSeed

    topology = None if shards is None else seed_topology(
        model_id=model_source_id(info, config), tp_size=info.tp_size, pp_size=info.pp_size, instance=instance_id)
    return PipelineSeed(tensors, engine, identity_for(info, config), MetadataClient.for_config(config),
                        worker_rank=info.worker_rank, worker_id=f"{instance_id}-rank{info.worker_rank}",
                        options=SeedOptions.from_config(config, accelerator=info.device), shards=shards,
                        topology=topology)


class _EarlyClient:
    """A metadata client made, and its channel connected, in a thread while the model builds.

    The identity's layout fingerprint needs the built model, so listing waits for
    the build; importing grpc and protobuf and the connection do not.
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
    thread: many small parallel fills on a busy machine wait on OpenMP barriers
    more than they fill. SGLang's loader calls
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
