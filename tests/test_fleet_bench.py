"""benchmarks/fleet.py's own arithmetic: how deep the measured cascade was, and the bound whole-tensor
forwarding puts on a pipelined chain of that depth (pure functions; the emulated runs are by hand)."""

import importlib.util
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location(
    "fleet_bench", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fleet.py")
fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet)


def test_chain_depth_follows_each_targets_first_source_to_the_seed():
    chain = {"t1": ["seed"], "t2": ["t1"], "t3": ["t2"], "t4": ["t3"]}
    assert fleet.chain_depth(chain) == 4
    tree = {"t1": ["seed"], "t2": ["seed"], "t3": ["t1"], "t4": ["t1"], "t5": ["t3", "seed"]}
    assert fleet.chain_depth(tree) == 3  # t5 re-attached to the seed later: its first source counts
    assert fleet.chain_depth({}) == 0
    assert fleet.chain_depth({"t1": ["t2"], "t2": ["t1"]}) == 2  # a cycle (never planned) still ends


def test_the_bound_is_the_flow_shop_makespan_over_one_link():
    # sum + (hops - 1) x largest, over sum: a 16-deep chain of the default 64 uneven tensors.
    sizes = [1 + (i * 5) % 7 for i in range(64)]
    assert fleet.granularity_bound(sizes, 16) == pytest.approx(1 + 15 * 7 / sum(sizes))
    assert fleet.granularity_bound(sizes, 1) == 1.0  # one hop: the target alone
    assert fleet.granularity_bound([5, 5], 3) == pytest.approx(2.0)  # two halves, three hops: 10 + 2 x 5
    # Four times as many tensors of the same shares: the largest is a quarter of the share, so is the lag.
    finer = [1 + (i * 5) % 7 for i in range(256)]
    assert fleet.granularity_bound(finer, 16) - 1 == pytest.approx((fleet.granularity_bound(sizes, 16) - 1) / 4,
                                                                   rel=0.02)
    assert fleet.granularity_bound([], 4) == 1.0


def test_chunk_digests_default_to_the_models_size_over_128_reach_every_worker_and_cut_the_units():
    args = fleet.parse_args(["--emulate"])
    assert args.chunk_kb == 64 * 1024 // 128  # 512 KiB of the emulated 64 MiB
    assert fleet.parse_args(["--size-mb", "256"]).chunk_kb == 2048
    argv = fleet._worker_argv("t1", "target", args)
    assert argv[argv.index("--chunk-kb") + 1] == "512"
    assert fleet.parse_args(["worker", "--role", "seed", "--name", "s", "--url", "u", "--chunk-kb", "64"]).chunk_kb == 64
    units = fleet._unit_sizes(args)
    assert sum(units) == sum(fleet._weights_sizes(args)) and max(units) == 512 * 1024
    whole = fleet.parse_args(["--emulate", "--chunk-kb", "0"])
    assert fleet._unit_sizes(whole) == fleet._weights_sizes(whole)
    with pytest.raises(SystemExit):
        fleet.parse_args(["--emulate", "--chunk-kb", "6"])  # not whole 4 KiB pages
