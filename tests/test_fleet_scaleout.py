"""Small fleets (benchmarks/fleet.py's processes, bounded): load spreads, the fleet cascades.

Every target starts at the same moment and pulls with verify=require; the
leases' peaks show each seed's cap held.
"""

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location(
    "bench_fleet", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fleet.py")
fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet)


def test_a_fleet_grows_from_targets_once_the_first_seed_retires():
    # The seed serves one target, then withdraws: the other targets, started at the same moment,
    # can only be served by targets that finished before them (each seeds once verified).
    summary = fleet.drive(fleet.parse_args([
        "--targets", "3", "--size-mb", "16", "--max-readers", "1", "--retire-after", "1", "--cascade",
        "--wait-s", "40", "--timeout-s", "60",
    ]))
    pulled_from = summary["pulled_from"]
    assert set(pulled_from) == {"t1", "t2", "t3"}  # every target ended verified (verify=require)
    [first] = [t for t, sources in pulled_from.items() if sources == ["seed"]]
    assert summary["from_targets"] == 2, summary
    assert any(first in sources for sources in pulled_from.values())  # the tree: seed -> first -> ...
    assert all(peak <= 1 for peak in summary["peak_readers"].values())  # every cap held


def test_targets_starting_together_spread_over_equally_idle_seeds():
    summary = fleet.drive(fleet.parse_args([
        "--seeds", "2", "--targets", "4", "--size-mb", "32", "--max-readers", "2", "--timeout-s", "60",
    ]))
    assert set(summary["pulled_from"]) == {"t1", "t2", "t3", "t4"}
    used = {seed for sources in summary["pulled_from"].values() for seed in sources}
    assert used == {"seed1", "seed2"}, summary  # not all on one seed
    assert summary["seed_peak_readers"] <= 2
