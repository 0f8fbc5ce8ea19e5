"""A partial seed the test steers: a real PipelineSeed whose "pull" is the test's commands.

It publishes tests/procs/weights.py's tensors as a partial seed (depth 1) with their true
digests, but its memory holds zeros until told: `verify NAME[,NAME...]` writes those
tensors' true bytes and marks them verified; `finish` writes the rest and turns it into a
full READY seed. Bytes of a tensor it has not verified are wrong on purpose: a child that
read one would fail its digest. With `--chunk-bytes` it publishes chunk digests too
(sglang_mx.chunks), and `verify` takes chunks' unit names ("big.f32#0+65536"): only those bytes
are written. `lie UNIT[,UNIT...]` marks them verified without writing them (a rogue parent);
`--wrong-whole NAME` publishes a wrong whole digest for NAME beside its true chunk digests.
Prints one JSON line once published (worker_id, session), then "ok" after each command; exits
when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sglang_mx.client import MetadataClient
from sglang_mx.chunks import parse_unit, unit_views
from sglang_mx.digest import byte_view, digest_many
from sglang_mx.records import SourceIdentity
from sglang_mx.seed import SeedOptions
from sglang_mx.target.pipeline import PipelineSeed
from sglang_mx.transfer.engine import MooncakeEngine
from tests.procs import weights


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="test/model")
    p.add_argument("--size-mb", type=int, default=4)
    p.add_argument("--max-readers", type=int, default=1)
    p.add_argument("--chunk-bytes", type=int, default=0)
    p.add_argument("--wrong-whole", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)

    truth = weights.build(args.size_mb)
    mine = weights.build(args.size_mb, filled=False)
    digests = digest_many(truth)
    if args.chunk_bytes:
        for name, t in truth.items():
            if t.numel() * t.element_size() > args.chunk_bytes:
                digests.update(digest_many(unit_views(name, t, args.chunk_bytes)))
    if args.wrong_whole:
        digests[args.wrong_whole] = digest_many({"x": truth[args.wrong_whole][:1] + 1})["x"]
    identity = SourceIdentity(model_name=args.model, tensor_parallel_size=1, dtype="mixed")
    engine = MooncakeEngine.create("127.0.0.1", protocol="tcp")
    client = MetadataClient(args.url, timeout_s=5, retries=1)
    engine.register((t.data_ptr(), t.numel() * t.element_size()) for t in mine.values() if t.numel())
    seed = PipelineSeed(mine, engine, identity, client, worker_rank=0,
                        options=SeedOptions(max_readers=args.max_readers, heartbeat_interval_s=1.0))
    seed.attach(1, digests)
    print(json.dumps({"worker_id": seed.worker_id, "session": engine.session_id,
                      "endpoint": seed.publisher._lease_server.endpoint}), flush=True)
    for line in sys.stdin:
        command, _, names = line.strip().partition(" ")
        if command in ("verify", "lie"):
            chosen = names.split(",")
            for name in chosen if command == "verify" else ():
                unit = parse_unit(name)
                if unit is None:
                    mine[name].copy_(truth[name])
                else:
                    tensor, offset, length = unit
                    byte_view(tensor, mine[tensor])[offset:offset + length] = byte_view(tensor, truth[tensor])[
                        offset:offset + length]
            seed.verified_names({name: digests[name] for name in chosen})
        elif command == "finish":
            for name, t in truth.items():
                mine[name].copy_(t)
            seed.finish(digests)
        print("ok", flush=True)
    seed.abort() if not seed.verified.snapshot().complete else seed.publisher.close()


if __name__ == "__main__":
    main()
