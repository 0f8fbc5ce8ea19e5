"""benchmarks/fleet_model.py: the fluid model's closed-form corners (pure)."""

import importlib.util
import pathlib
import sys

import pytest

_path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fleet_model.py"
_spec = importlib.util.spec_from_file_location("bench_fleet_model", _path)
model = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = model  # dataclasses look their module up
_spec.loader.exec_module(model)


def test_one_seed_is_bound_by_its_nic():
    fleet = model.Fleet(model_gb=10, link_gb_s=10, nic_gb_s=10, overhead_s=0)
    assert model.time_to_all_ready(fleet, 100) == pytest.approx(100 * 10 / 10)


def test_cascade_doubles_the_sources_every_round():
    fleet = model.Fleet(model_gb=10, link_gb_s=10, nic_gb_s=10, overhead_s=0, cascade=True, max_readers=1)
    assert model.time_to_all_ready(fleet, 7) == pytest.approx(3 * 1.0)  # 1 -> 2 -> 4 -> 8 instances
    assert model.time_to_all_ready(fleet, 1023) == pytest.approx(10 * 1.0)


def test_striping_needs_several_sources_and_fills_a_nic_wider_than_a_link():
    alone = model.Fleet(model_gb=10, link_gb_s=2.5, nic_gb_s=10, overhead_s=0)
    striped = model.Fleet(model_gb=10, link_gb_s=2.5, nic_gb_s=10, overhead_s=0, max_seeds=4)
    assert model.time_to_all_ready(striped, 1) == model.time_to_all_ready(alone, 1) == pytest.approx(4.0)
    assert model.time_to_all_ready(striped, 1, seeds=4) == pytest.approx(1.0)


def test_max_readers_caps_concurrent_pulls_per_source():
    fleet = model.Fleet(model_gb=10, link_gb_s=10, nic_gb_s=100, overhead_s=0, max_readers=2)
    assert model.time_to_all_ready(fleet, 4) == pytest.approx(2 * 1.0)  # two waves of two


def test_without_a_cap_every_target_crowds_the_first_seed_and_cascade_cannot_help():
    capped = model.Fleet(model_gb=10, link_gb_s=10, nic_gb_s=10, overhead_s=0, cascade=True, max_readers=1)
    crowd = model.Fleet(model_gb=10, link_gb_s=10, nic_gb_s=10, overhead_s=0, cascade=True)
    assert model.time_to_all_ready(crowd, 7) == pytest.approx(7.0)
    assert model.time_to_all_ready(capped, 7) == pytest.approx(3.0)
