"""A seed process for tests: build weights, publish them, serve until told.

Prints one JSON line (worker_id, session, mx_source_id) once READY, then
waits until its stdin closes (clean exit: STALE) or a signal arrives.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from sglang_mx.client import MetadataClient
from sglang_mx.records import SourceIdentity
from sglang_mx.seed import SeedOptions, start_seed
from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.layout import seed_topology
from tests.procs import layouts, weights


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="test/model")
    p.add_argument("--size-mb", type=int, default=8)
    p.add_argument("--variant", default="")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--heartbeat", type=float, default=30.0)
    p.add_argument("--no-digests", action="store_true", help="publish without content digests")
    p.add_argument("--mutate", default="", help="after publishing, change one byte of this tensor in place")
    p.add_argument("--corrupt", default="", help="before publishing, change one byte of this tensor: a rogue seed "
                                                 "whose digests are computed over its corrupted bytes")
    p.add_argument("--digest", default="", help="the digest algorithm (SeedOptions.digest)")
    p.add_argument("--chunk-bytes", type=int, default=0, help="SeedOptions.chunk_bytes (0: no chunk digests)")
    p.add_argument("--layer-scale", type=int, default=0,
                   help="publish tests/procs/layouts.py's Llama layer at this scale, cut for --tp/--rank, with its "
                        "split facts (0: the weights of tests/procs/weights.py)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--instance", default="", help="worker id <instance>-rank<N>, and the topology's instance")
    p.add_argument("--model-id", default="", help="the layout-free model id advertised in the topology")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)

    shards = topology = None
    if args.layer_scale:
        shards = layouts.specs_for(args.tp, args.rank, args.kv_heads, args.layer_scale)
        whole = layouts.whole_tensors(args.kv_heads, scale=args.layer_scale)
        tensors = {name: layouts.cut(whole[name], spec) for name, spec in shards.items()}
        topology = seed_topology(model_id=args.model_id, tp_size=args.tp, pp_size=1, instance=args.instance)
    else:
        tensors = weights.build(args.size_mb, args.variant)
    if args.corrupt:
        tensors[args.corrupt].view(-1).view(torch.uint8)[0] ^= 0xFF
    identity = SourceIdentity(model_name=args.model, tensor_parallel_size=args.tp, dtype="mixed")
    engine = MooncakeEngine.create("127.0.0.1", protocol="tcp")
    client = MetadataClient(args.url, timeout_s=5, retries=1)
    publisher = start_seed(tensors, engine, identity, client, worker_rank=args.rank,
                           worker_id=f"{args.instance}-rank{args.rank}" if args.instance else None,
                           options=SeedOptions(heartbeat_interval_s=args.heartbeat, ready=True,
                                               digests=not args.no_digests, digest=args.digest,
                                               chunk_bytes=args.chunk_bytes),
                           shards=shards, topology=topology)
    if args.mutate:  # the weights change under a READY record (what an unguarded in-place update does)
        tensors[args.mutate].view(-1).view(torch.uint8)[0] ^= 0xFF
    print(json.dumps({"worker_id": publisher.worker_id, "session": engine.session_id,
                      "mx_source_id": publisher.mx_source_id, "manifest": publisher.manifest}), flush=True)
    sys.stdin.read()
    publisher.close()


if __name__ == "__main__":
    main()
