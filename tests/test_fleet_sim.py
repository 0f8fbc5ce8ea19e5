"""benchmarks/fleet_sim.py: closed-form corners of the simulated fleet, and that it runs the policy's own
code (a change there changes the simulation). Pure: simulated links and clock, well under a second each."""

import dataclasses
import importlib.util
import json
import math
import pathlib
import sys

import pytest

from sglang_mx import leases
from sglang_mx.target import choice, stripes, waiting
from sglang_mx.target.policy import PullOptions

_path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fleet_sim.py"
_spec = importlib.util.spec_from_file_location("bench_fleet_sim", _path)
sim = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sim  # dataclasses look their module up
_spec.loader.exec_module(sim)

Mode = sim.Mode
MB = 10**6


def free(**costs):
    """No fixed cost at all, but those given (every time field of Costs at 0)."""
    zero = {f.name: 0 for f in dataclasses.fields(sim.Costs) if f.type == "float" and f.name != "payload"}
    return sim.Costs(**{**zero, **costs})


FREE = free()
ALONE_S = 8.0  # 8 tensors of 1 MB over 1 MB/s NICs


def fleet(mode, targets, *, costs=FREE, watch=True, poll_s=1.0, window_bytes=2 << 20, max_seeds=1, **kw):
    """8 MB in 8 tensors of 1 MB, every NIC 1 MB/s each way, no fixed costs unless given."""
    kw = {"sizes": (MB,) * 8, "nic_gb_s": 0.001, **kw}
    options = PullOptions(watch=watch, poll_interval_s=poll_s, pipeline=mode is Mode.PIPELINED,
                          window_bytes=window_bytes, max_seeds=max_seeds)
    return sim.Fleet(mode=mode, targets=targets, costs=costs, options=options, **kw)


def test_one_target_alone_moves_the_rank_at_the_nic_rate():
    assert sim.simulate(fleet(Mode.ALONE, 1)).last_s == pytest.approx(ALONE_S)


@pytest.mark.parametrize("n", [1, 5, 12])
def test_one_seed_serves_n_targets_in_n_times_alone(n):
    result = sim.simulate(fleet(Mode.ONE_SEED, n))
    assert result.last_s == pytest.approx(n * ALONE_S)
    assert max(result.done_s) - min(result.done_s) == pytest.approx(0)  # they share its NIC fairly
    assert result.peak_readers["s0"] == n


@pytest.mark.parametrize("n", [1, 3, 7, 8, 15, 20])
def test_store_and_forward_with_one_reader_doubles_the_sources_every_generation(n):
    result = sim.simulate(fleet(Mode.STORE_AND_FORWARD, n, max_readers=1))
    generations = math.ceil(math.log2(n + 1))
    # A seed listed at its cap is skipped unasked (tree.at_cap) until its heartbeat reports the slot free:
    # a generation that needs that slot waits for the heartbeat (SeedPublisher's load_report_gap_s).
    gap = result.fleet.report_gap_s
    assert generations * ALONE_S - 1e-9 <= result.last_s <= generations * ALONE_S + (generations - 1) * gap + 1e-9
    assert max(result.peak_readers.values()) == 1


def test_polling_pays_up_to_a_poll_interval_per_generation_and_the_watch_an_event():
    watched = sim.simulate(fleet(Mode.STORE_AND_FORWARD, 7, max_readers=1, costs=free(event_s=0.25)))
    polled = sim.simulate(fleet(Mode.STORE_AND_FORWARD, 7, max_readers=1, watch=False, poll_s=1.0))
    assert watched.last_s == pytest.approx(3 * ALONE_S + 2 * 0.25)  # generations 2 and 3 each wait an event
    assert 3 * ALONE_S < polled.last_s <= 3 * ALONE_S + 2 * 1.0
    assert polled.server()["ListSources"][0] > watched.server()["ListSources"][0]


def test_without_a_cap_every_target_crowds_the_first_seed_and_cascade_cannot_help():
    result = sim.simulate(fleet(Mode.STORE_AND_FORWARD, 3, max_readers=0))
    assert result.last_s == pytest.approx(3 * ALONE_S)  # the sources are fixed when the pull starts
    assert set(result.parents.values()) == {("s0",)}


def test_a_pipelined_chain_lags_one_read_and_one_update_per_hop():
    stream_s = 0.25
    costs = free(stream_s=stream_s)
    # A window under one tensor: one read in flight, as with large tensors.
    result = sim.simulate(fleet(Mode.PIPELINED, 4, max_readers=1, window_bytes=1, costs=costs))
    assert sorted(result.depth.values()) == [1, 2, 3, 4]
    hop = 1.0 + stream_s  # a child reads a tensor once its parent verified it and the update arrived
    for name, depth in result.depth.items():
        assert result.done_s[int(name[1:]) - 1] == pytest.approx(ALONE_S + (depth - 1) * hop)


def test_a_pipelined_read_moves_while_the_one_before_it_is_verified():
    costs = free(read_rtt_s=0.01, poll_gap_s=0.02, digest_gb_s=0.01)
    store = sim.simulate(fleet(Mode.STORE_AND_FORWARD, 1, max_readers=1, costs=costs)).last_s
    assert store == pytest.approx(0.01 + ALONE_S + 0.02 + 0.1)  # all in flight: only the last check shows
    # A window of one byte still keeps two reads in flight (MooncakeEngine.read): each read's round trip
    # and check hide behind the next read's transfer, as with every read in flight.
    one = sim.simulate(fleet(Mode.PIPELINED, 1, max_readers=1, window_bytes=1, costs=costs)).last_s
    assert one == pytest.approx(store)


def test_a_round_ends_with_its_slowest_stripe():
    # Two seeds of 1 and 0.5 MB/s, a target of 10 MB/s reading half from each: 8 s, not 8 / 1.5.
    result = sim.simulate(fleet(Mode.ONE_SEED, 1, seeds=2, seed_nic_gb_s=(0.001, 0.0005), nic_gb_s=0.01,
                                max_seeds=2))
    assert result.last_s == pytest.approx(4 * MB / (0.5 * MB))
    assert result.rounds == [1]
    assert sorted(result.parents["t1"]) == ["s0", "s1"]


def test_leases_cap_the_readers_and_the_rest_wait():
    f = fleet(Mode.ONE_SEED, 4, max_readers=2)
    result = sim.simulate(f)
    assert result.peak_readers["s0"] == 2
    # Two at a time, each at half the seed's NIC; the others hear of the freed leases through the seed's
    # next heartbeat (SeedPublisher's load_report_gap_s) and the watch.
    assert f.report_gap_s == 0.2
    assert result.last_s == pytest.approx(2 * 2 * ALONE_S + f.report_gap_s)


def test_a_cap_the_leases_did_not_enforce_would_show(monkeypatch):
    def acquire(self):  # a regression: the cap forgotten
        self.granted += 1
        self.peak = max(self.peak, self.granted)
        return f"lease-{self.granted}"

    monkeypatch.setattr(leases.ReaderLeases, "acquire", acquire)
    result = sim.simulate(fleet(Mode.ONE_SEED, 4, max_readers=2))
    assert result.peak_readers["s0"] == 4
    assert result.last_s == pytest.approx(4 * ALONE_S)


def test_the_tree_is_planned_by_the_policys_order_parents(monkeypatch):
    f = fleet(Mode.PIPELINED, 10, max_readers=2, costs=sim.Costs(), watch=False, poll_s=0.5)
    planned = sim.simulate(f)
    assert sorted(planned.depth.values()) == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]  # shallowest first: level by level

    real = choice.order_parents
    monkeypatch.setattr(choice, "order_parents", lambda *a, **kw: list(reversed(real(*a, **kw))))
    reversed_ = sim.simulate(f)
    assert reversed_.parents != planned.parents


def test_a_policy_that_never_finds_a_seed_stalls_the_simulation(monkeypatch):
    monkeypatch.setattr(choice, "order_candidates", lambda refs, **kw: [])
    with pytest.raises(sim.Stalled, match="0 of 2 targets verified"):
        sim.simulate(fleet(Mode.ONE_SEED, 2, horizon_s=100.0))


def test_store_and_forward_takes_seeds_in_order_candidates_order(monkeypatch):
    calls = []
    real = choice.order_candidates
    monkeypatch.setattr(choice, "order_candidates", lambda refs, **kw: calls.append(len(refs)) or real(refs, **kw))
    sim.simulate(fleet(Mode.STORE_AND_FORWARD, 3, max_readers=1))
    assert calls  # every walk with a free seed ordered its listing with the policy's function


def test_a_plan_reading_what_a_parent_has_not_verified_fails_the_simulation(monkeypatch):
    monkeypatch.setattr(stripes, "assign", lambda dests, has: [[stripes.Slice(d, 0, d.size) for d in dests]]
                        + [[] for _ in has[1:]])  # a regression: holders ignored
    with pytest.raises(sim.PlanError, match="has not verified it yet"):
        sim.simulate(fleet(Mode.PIPELINED, 3, max_readers=1))


def test_a_cut_that_loses_bytes_fails_the_simulation(monkeypatch):
    real = stripes.cut
    monkeypatch.setattr(stripes, "cut", lambda dests, parts: [[stripes.Slice(p.dest, p.offset, p.length - 1)
                                                                for p in s] for s in real(dests, parts)])
    with pytest.raises(sim.PlanError, match="bytes planned"):
        sim.simulate(fleet(Mode.ALONE, 1))


def test_the_wait_is_the_policys_seed_waiter(monkeypatch):
    gap = sim.Fleet.__dataclass_fields__["report_gap_s"].default  # the freed slot is heard of by heartbeat
    assert sim.simulate(fleet(Mode.STORE_AND_FORWARD, 3, max_readers=1)).last_s == pytest.approx(2 * ALONE_S + gap)
    monkeypatch.setattr(waiting.SeedWaiter, "wait", lambda self, timeout_s: self._sleep(5.0))
    result = sim.simulate(fleet(Mode.STORE_AND_FORWARD, 3, max_readers=1))
    assert result.last_s == pytest.approx(10.0 + ALONE_S)  # the waiters list at 0, 5 and 10 s


def test_the_metadata_server_load_is_counted_per_call_and_per_rank():
    alone = sim.simulate(fleet(Mode.ALONE, 1))
    load = alone.server()
    assert (load["ListSources"][0], load["GetMetadata"][0], load["PublishMetadata"][0]) == (1, 1, 0)
    assert alone.server(ranks=8)["GetMetadata"] == tuple(8 * x for x in load["GetMetadata"])

    piped = sim.simulate(fleet(Mode.PIPELINED, 1, max_readers=1)).server()
    assert piped["ListSources"][0] == 2  # READY, then the partial seeds
    assert piped["PublishMetadata"][0] == 2  # partial, then the full record
    run = sim.simulate(fleet(Mode.PIPELINED, 3, max_readers=1))
    chain = run.server()
    assert chain["WatchSources"][0] == 2  # the two that waited opened a watch
    # Waiting targets ask busy seeds again, at the seeds' lease endpoints (listed): the server is asked for a
    # record only by a target a seed granted a lease, once per target here.
    assert chain["GetMetadata"][0] == 3 and run.load.seed_calls > 3 + 3  # (+3: the releases)


def test_same_seed_same_run():
    a = sim.simulate(fleet(Mode.PIPELINED, 10, max_readers=2, costs=sim.Costs()))
    b = sim.simulate(fleet(Mode.PIPELINED, 10, max_readers=2, costs=sim.Costs()))
    assert (a.done_s, a.parents, a.depth) == (b.done_s, b.parents, b.depth)


def test_coarsening_keeps_bytes_and_counts_tensors():
    sizes = sim.uneven_sizes(1e9, 1000)
    grouped, per_group = sim.coarsen(sizes, 40)
    assert len(grouped) == 40 and sum(grouped) == sum(sizes) and sum(per_group) == 1000
    assert len(set(sizes)) == 7  # uneven, as benchmarks/fleet.py builds them


def test_a_slow_shared_link_is_not_cut_by_the_engines_deadline():
    # One seed for 5 targets of 8 MB at 1 MB/s: 40 s in all, past MooncakeEngine.read's 30 s + 1 ns per
    # byte, but the deadline counts from the last piece that landed, and pieces keep landing.
    result = sim.simulate(fleet(Mode.ONE_SEED, 5))
    assert result.last_s == pytest.approx(40.0) and result.timed_out == 0


def test_emulated_json_prints_predictions_next_to_measurements(tmp_path, capsys):
    run = {"rate_mb_s": 25, "size_mb": 8, "tensors": 8, "targets": 4, "max_readers": 1,
           "measured": {"alone": 0.4, "one-seed": 1.5, "store-and-forward": 1.2, "pipelined": None}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    sim.main(["--emulated-json", str(path), "--rpc-ms", "4"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
             {"alone", "one-seed", "store-and-forward", "pipelined"}}
    assert set(lines) == {"alone", "one-seed", "store-and-forward", "pipelined"}
    assert "1.50" in lines["one-seed"]  # the measured value beside the prediction
    assert "failed" in lines["pipelined"]
    assert "RPC 4 ms" in out


def test_the_table_runs_small(capsys):
    results = sim.table(model_gb=0.08, nic_gb_s=0.05, tensors=20, sizes=(3, 6))
    out = capsys.readouterr().out
    assert "| store-and-forward |" in out and "Metadata server at 48 rank-targets" in out
    assert len(results) == 2 * 2 * (1 + 3 + 3)  # N x poll/watch x runs of the variants


def test_emulated_json_names_missing_keys(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rate_mb_s": 25}))
    with pytest.raises(SystemExit, match="lacks size_mb, tensors, targets, max_readers"):
        sim.main(["--emulated-json", str(path)])


def test_chunk_digests_make_a_pipelined_chain_lag_by_a_chunk_not_by_its_largest_tensor():
    kw = dict(rate_mb_s=4.0, size_mb=16, tensors=16, targets=6, max_readers=1)
    whole = sim.emulated_fleet(Mode.PIPELINED, **kw)
    chunked = sim.emulated_fleet(Mode.PIPELINED, chunk_kb=128, **kw)
    assert max(chunked.sizes) == 128 * 1024 and sum(chunked.sizes) == sum(whole.sizes)
    assert sim.emulated_fleet(Mode.ALONE, chunk_kb=128, **kw).sizes == whole.sizes  # only a pipelined pull cuts
    alone = sim.simulate(sim.emulated_fleet(Mode.ALONE, **kw)).last_s
    lag_whole = sim.simulate(whole).last_s - alone
    lag_chunked = sim.simulate(chunked).last_s - alone
    assert lag_chunked < lag_whole / 2  # the largest tensor is ~1.8 MB here, a chunk 0.13 MB
