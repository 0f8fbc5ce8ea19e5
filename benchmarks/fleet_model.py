"""Time until N targets are all READY, with and without cascade and striping: a fluid model.

    PYTHONPATH=. .venv/bin/python benchmarks/fleet_model.py --link-gb-s 5.6 --nic-gb-s 50 --model-gb 16
    PYTHONPATH=. .venv/bin/python benchmarks/fleet_model.py --from-json '{"median_target_gb_s": ...}'  # a fleet.py line

Inputs: the bytes one rank pulls (`model_gb`), what one seed-to-target link
carries (`link_gb_s`: one Mooncake stream, measured by benchmarks/fleet.py or
taken from published figures), the NIC limit of every instance (`nic_gb_s`,
egress for a seed and ingress for a target), and a fixed cost per pull
(`overhead_s`: listing, leases, digest check). Every target starts at t=0.

The model is event-driven and fluid: targets start pulling at once, or with
`max_readers` while leases are free (a striped target holds one on each of its
up to `max_seeds` sources); every pulling target moves at min(stripes x link,
its NIC, its share of all sources' egress); a target keeps its sources until it
is done. When a
target completes it becomes a source itself if `cascade`. Not modelled: the
metadata server (one ListSources and GetMetadata per target per round; see
benchmarks/metadata_load.py), a network core slower than the NICs, failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fleet:
    model_gb: float
    link_gb_s: float
    nic_gb_s: float
    overhead_s: float = 0.5
    cascade: bool = False
    max_seeds: int = 1
    max_readers: int = 0  # leases per source; 0: no cap (every target starts at once)

    def target_gb_s(self, sources: int) -> float:
        """The most one target pulls at: its stripes' links, or its NIC."""
        return min(min(self.max_seeds, sources) * self.link_gb_s, self.nic_gb_s)

    def slots(self, sources: int) -> int:
        """Targets pulling at once: max_readers leases per source (a striped target holds one on each
        of its sources); no cap: all of them."""
        if self.max_readers:
            return max(1, sources * self.max_readers // min(self.max_seeds, sources))
        return 1 << 62


def time_to_all_ready(fleet: Fleet, targets: int, seeds: int = 1) -> float:
    """Seconds until `targets` targets have pulled (the fluid model in the module docstring)."""
    now = 0.0
    sources = seeds
    waiting = targets
    active: list[float] = []  # GB left for each pulling target
    while waiting or active:
        start = min(waiting, fleet.slots(sources) - len(active))
        if start > 0:  # new pulls begin (their fixed cost is paid up front, as time spent, below)
            active += [fleet.model_gb] * start
            waiting -= start
        rate = min(fleet.target_gb_s(sources), sources * fleet.nic_gb_s / len(active))
        # Everyone active progresses at `rate`; the first to finish ends this step.
        step = min(active) / rate
        now += step
        active = [left - step * rate for left in active]
        done = sum(1 for left in active if left <= 1e-9)
        active = [left for left in active if left > 1e-9]
        if fleet.cascade:
            sources += done
    return now + fleet.overhead_s * _pull_waves(fleet, targets, seeds)


def _pull_waves(fleet: Fleet, targets: int, seeds: int) -> int:
    """How many pulls happen one after another on the longest path (each pays overhead_s once)."""
    if not fleet.cascade:
        return math.ceil(targets / min(fleet.slots(seeds), targets))
    ready, waves = seeds, 0
    while ready < seeds + targets:
        ready += min(fleet.slots(ready), seeds + targets)
        waves += 1
    return waves


# Without cascade no cap is best (the seed's NIC is shared by all at once); with cascade each source
# takes max_readers = ceil(NIC / link) readers, as many links as fill its NIC, so later targets wait for
# the new sources instead of crowding the first one (with no cap every target would start on the seed).
VARIANTS = (
    ("one seed", dict()),
    ("striping (4)", dict(max_seeds=4)),
    ("cascade", dict(cascade=True, capped=True)),
    ("cascade + striping (4)", dict(cascade=True, max_seeds=4, capped=True)),
)


def table(*, model_gb: float, link_gb_s: float, nic_gb_s: float, overhead_s: float,
          sizes=(10, 100, 1000)) -> str:
    lines = ["| variant | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for label, extra in VARIANTS:
        extra = dict(extra)
        if extra.pop("capped", False):
            extra["max_readers"] = max(1, math.ceil(nic_gb_s / link_gb_s))
        fleet = Fleet(model_gb=model_gb, link_gb_s=link_gb_s, nic_gb_s=nic_gb_s, overhead_s=overhead_s, **extra)
        lines.append(f"| {label} | " + " | ".join(f"{time_to_all_ready(fleet, n):,.1f} s" for n in sizes) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-gb", type=float, default=16.0, help="bytes one rank pulls, GB")
    p.add_argument("--link-gb-s", type=float, default=None, help="one seed-to-target link, GB/s")
    p.add_argument("--nic-gb-s", type=float, default=50.0, help="per-instance NIC limit, GB/s (400 Gbit/s = 50)")
    p.add_argument("--overhead-s", type=float, default=0.5, help="fixed cost per pull (lookup, lease, verify)")
    p.add_argument("--from-json", default="", help="the last line of benchmarks/fleet.py: its median link GB/s")
    args = p.parse_args(argv)
    link = args.link_gb_s
    if args.from_json:
        link = json.loads(args.from_json)["median_target_gb_s"]
    if link is None:
        p.error("give --link-gb-s or --from-json")
    print(f"model {args.model_gb:g} GB per rank, link {link:g} GB/s, NIC {args.nic_gb_s:g} GB/s, "
          f"{args.overhead_s:g} s per pull; time until all N targets are READY:\n")
    print(table(model_gb=args.model_gb, link_gb_s=link, nic_gb_s=args.nic_gb_s, overhead_s=args.overhead_s))


if __name__ == "__main__":
    main()
