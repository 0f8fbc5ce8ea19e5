"""benchmarks/netem.py: emulated hosts (network namespaces behind a switch namespace, tbf-shaped links).

Root only: skipped with the reason elsewhere. Every step is bounded (subprocess timeouts), and
what a test makes is checked gone afterwards, the root namespace's links unchanged.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location(
    "bench_netem", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "netem.py")
netem = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = netem  # its dataclasses look their module up there
_spec.loader.exec_module(netem)


def _why_not() -> str:
    try:
        netem.require_root()
    except netem.NetemError as e:
        return str(e)
    return ""


if reason := _why_not():
    pytest.skip(f"emulated hosts unavailable here: {reason}", allow_module_level=True)


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True, text=True, timeout=10).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def _ours(prefix: str) -> list[str]:
    return [ns for ns in netem._namespaces() if ns.startswith(prefix)]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    return p.pid


def test_two_hosts_move_at_the_shaped_rate_both_ways_and_leave_nothing_behind():
    links = _root_links()
    rate = 20.0
    with netem.Netem(2, rate) as net:
        assert len(_ours(net.prefix)) == 3  # switch + 2 hosts
        assert net.exec_argv(1, ["true"]) == ["ip", "netns", "exec", f"{net.prefix}h1", "true"]
        for src, dst in ((0, 1), (1, 0)):
            got = netem.measure(net, src, dst, mb=30, timeout_s=30)
            # TCP payload at MTU 1500 is about 96% of the wire rate; never above it; loose below (a busy CPU).
            assert 0.6 * rate < got < 1.0 * rate, (src, dst, got)
        up, down = net.link_bytes()[0]
        assert up > 30e6 and down > 30e6  # both directions went through host 0's shaped link
        assert _root_links() == links  # nothing made in the root namespace
    assert _ours(net.prefix) == []
    assert _root_links() == links


def test_an_exception_inside_removes_everything():
    with pytest.raises(KeyError):
        with netem.Netem(2, 10) as net:
            sleeper = subprocess.Popen(net.exec_argv(0, ["sleep", "60"]))
            raise KeyError("boom")
    assert _ours(net.prefix) == []
    assert sleeper.wait(timeout=10) != 0  # what ran inside was killed


def test_cleanup_removes_a_dead_runs_namespaces_and_spares_a_live_one():
    dead = netem.Netem(1, 10, prefix=netem.run_prefix(_dead_pid()))
    dead.__enter__()  # a run that crashed before its __exit__
    with netem.Netem(1, 10) as live:
        gone = netem.cleanup()
        assert set(_ours(dead.prefix)) == set() and {f"{dead.prefix}sw", f"{dead.prefix}h0"} <= set(gone)
        assert len(_ours(live.prefix)) == 2


def test_names_of_hosts_and_errors():
    net = netem.Netem(3, 5, prefix="mxe1-")
    assert [h.ip for h in net.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert net.host("h2").ns == "mxe1-h2" and net.host(1).ip == "10.77.0.2"
    with pytest.raises(netem.NetemError, match="no host 'h9'"):
        net.host("h9")
    with pytest.raises(netem.NetemError, match="between 1 and"):
        netem.Netem(0, 5)
    assert os.geteuid() == 0
