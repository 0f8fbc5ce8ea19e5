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
from sglang_mx.seed import start_seed
from sglang_mx.transfer.engine import MooncakeEngine
from tests.procs import weights


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
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)

    tensors = weights.build(args.size_mb, args.variant)
    identity = SourceIdentity(model_name=args.model, tensor_parallel_size=args.tp, dtype="mixed")
    engine = MooncakeEngine.create("127.0.0.1", protocol="tcp")
    client = MetadataClient(args.url, timeout_s=5, retries=1)
    publisher = start_seed(tensors, engine, identity, client, worker_rank=args.rank,
                           heartbeat_interval_s=args.heartbeat, ready=True, digests=not args.no_digests)
    if args.mutate:  # the weights change under a READY record (what an unguarded in-place update does)
        tensors[args.mutate].view(-1).view(torch.uint8)[0] ^= 0xFF
    print(json.dumps({"worker_id": publisher.worker_id, "session": engine.session_id,
                      "mx_source_id": publisher.mx_source_id}), flush=True)
    sys.stdin.read()
    publisher.close()


if __name__ == "__main__":
    main()
