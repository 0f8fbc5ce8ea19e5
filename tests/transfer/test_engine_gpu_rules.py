"""MooncakeEngine's GPU rules on CPU, with stand-ins named as fakes: the transport asked for is the
transport used (FakeTransferEngine, fake segment descriptors), registration follows allocations
(a fake allocation map), no piece straddles a registered region on either side, and a read that
Mooncake reports timed out is still in flight (LateBinding: its bytes land late).
"""

from __future__ import annotations

import ctypes
import os

import pytest

from sglang_mx.errors import TransferError
from sglang_mx.transfer import engine as engine_module
from sglang_mx.transfer.engine import MooncakeEngine, ReadsInFlightError
from sglang_mx.transfer.plan import Read
from sglang_mx.transfer.regions import Allocation, lookup_in
from sglang_mx.transfer.segment import Segment, parse_segment

MiB = 1 << 20


class FakeTransferEngine:
    """Stand-in for mooncake.engine.TransferEngine: records the environment `initialize` saw."""

    seen_env: dict = {}

    def initialize(self, host, metadata, protocol, device):
        FakeTransferEngine.seen_env = {k: os.environ.get(k) for k in engine_module._STEERING_ENV}
        return 0

    def get_rpc_port(self):
        return 4242

    def register_memory(self, addr, length):
        return 0

    def unregister_memory(self, addr):
        return 0


def fake_segments(protocol, buffers=()):
    asked = []

    def query(session):
        asked.append(session)
        return Segment(name=session, protocols=(protocol,), buffers=tuple(buffers))
    query.asked = asked
    return query


def test_tcp_asked_is_tcp_confirmed_and_the_environment_is_restored(monkeypatch):
    monkeypatch.delenv("MC_FORCE_TCP", raising=False)
    engine = MooncakeEngine.create("127.0.0.1", protocol="tcp", binding=FakeTransferEngine,
                                   segments=fake_segments("tcp"))
    assert engine.transport == "tcp" and engine.session_id == "127.0.0.1:4242"
    assert FakeTransferEngine.seen_env["MC_FORCE_TCP"] == "1" and "MC_FORCE_TCP" not in os.environ


def test_nvlink_intra_sets_mc_intranode_nvlink_while_mooncake_initializes(monkeypatch):
    monkeypatch.delenv("MC_INTRANODE_NVLINK", raising=False)
    engine = MooncakeEngine.create("127.0.0.1", protocol="nvlink_intra", binding=FakeTransferEngine,
                                   segments=fake_segments("nvlink_intra"))
    assert engine.transport == "nvlink_intra"
    assert FakeTransferEngine.seen_env["MC_INTRANODE_NVLINK"] == "1" and "MC_INTRANODE_NVLINK" not in os.environ


def test_another_transport_installed_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.delenv("MC_INTRANODE_NVLINK", raising=False)
    with pytest.raises(TransferError, match=r"installed transport tcp where 'nvlink_intra' was asked for .*"
                                            r"lacks intra-node NVLink"):
        MooncakeEngine.create("127.0.0.1", protocol="nvlink_intra", binding=FakeTransferEngine,
                              segments=fake_segments("tcp"))
    monkeypatch.setenv("MC_INTRANODE_NVLINK", "1")
    with pytest.raises(TransferError, match=r"installed transport nvlink_intra where 'rdma' .*"
                                            r"The environment sets MC_INTRANODE_NVLINK=1: unset it"):
        MooncakeEngine.create("127.0.0.1", protocol="rdma", binding=FakeTransferEngine,
                              segments=fake_segments("nvlink_intra"))


def test_the_real_binding_confirms_tcp_and_lists_what_was_registered():
    pytest.importorskip("mooncake.engine")
    buf = ctypes.create_string_buffer(MiB)
    with MooncakeEngine.create("127.0.0.1", protocol="tcp") as engine:
        assert engine.transport == "tcp"
        engine.register([(ctypes.addressof(buf), MiB)])
        from sglang_mx.transfer.segment import query_segment
        assert query_segment(engine.session_id).buffers == ((ctypes.addressof(buf), MiB),)


def test_segment_descriptors_parse_single_and_multi_protocol():
    one = parse_segment('{"name":"h:1","protocol":"tcp","buffers":[{"addr":20,"length":5},{"addr":10,"length":3}]}')
    assert one.protocols == ("tcp",) and one.buffers == ((10, 3), (20, 5))
    assert parse_segment('{"name":"h:1","protocol":["rdma","cxl"]}').protocols == ("rdma", "cxl")


# --- registration and pieces ---------------------------------------------------------

class RecordingBinding(FakeTransferEngine):
    def __init__(self):
        self.registered, self.submitted = [], []

    def register_memory(self, addr, length):
        self.registered.append((addr, length))
        return 0

    def batch_transfer_async_read(self, session, locals_, remotes, lengths):
        self.submitted.append((locals_[0], remotes[0], lengths[0]))
        return len(self.submitted)

    def transfer_check_status(self, bid):
        return 1


A, B = 0x10000000, 0x10200000  # a fake allocation map: two segments back to back
FAKE_ALLOCATIONS = lookup_in([(A, 2 * MiB), (B, 2 * MiB), Allocation(0x30000000, MiB, virtual=True)])


def test_registration_is_split_at_allocation_boundaries():
    binding = RecordingBinding()
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=FAKE_ALLOCATIONS)
    assert engine.register([(B - 4096, 4096), (B, 4096)]) == [(B - 4096, 4096), (B, 4096)]
    assert binding.registered == [(B - 4096, 4096), (B, 4096)]


def test_virtual_memory_is_refused_before_registration_where_the_transport_needs_ipc_handles():
    binding = RecordingBinding()
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="nvlink_intra", allocations=FAKE_ALLOCATIONS)
    with pytest.raises(TransferError, match=r"virtual-memory allocations, which transport 'nvlink_intra' cannot "
                                            r"register .*expandable_segments.*--enable-memory-saver"):
        engine.register([(A, 4096), (0x30000000, 4096)])
    assert binding.registered == []
    tcp = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=FAKE_ALLOCATIONS)
    assert tcp.register([(0x30000000, 4096)]) == [(0x30000000, 4096)]


def test_no_piece_straddles_a_local_allocation_or_a_seed_buffer(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    binding = RecordingBinding()
    seed = fake_segments("nvlink_intra", buffers=[(0x50000000, MiB), (0x50000000 + MiB, 3 * MiB)])
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="nvlink_intra", segments=seed,
                            allocations=FAKE_ALLOCATIONS)
    engine.register([(A, 4 * MiB)])  # two regions: A and B
    engine.read("seed:1", [Read(B - 2 * MiB + 512 * 1024, 0x50000000, 2 * MiB)])
    # local edge at B (offset 1.5 MiB), seed edge at +1 MiB
    assert [(l_ - A, r - 0x50000000, n) for l_, r, n in binding.submitted] == [
        (512 * 1024, 0, MiB), (512 * 1024 + MiB, MiB, 512 * 1024), (2 * MiB, MiB + 512 * 1024, 512 * 1024)]
    assert seed.asked == ["seed:1"]


def test_a_seed_on_another_transport_is_refused_before_any_byte_moves():
    binding = RecordingBinding()
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="nvlink_intra",
                            segments=fake_segments("tcp"), allocations=None)
    with pytest.raises(TransferError, match="seed seed:1 uses transport tcp, this engine nvlink_intra"):
        engine.read("seed:1", [Read(A, 0x50000000, 10)])
    assert binding.submitted == []


def test_tcp_never_asks_the_seed_and_host_memory_is_cut_only_by_size(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    binding, seed = RecordingBinding(), fake_segments("tcp", buffers=[(0x50000000, 10)])
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", segments=seed, allocations=None)
    engine.register([(A, 4096), (A + 4096, 4096)])
    engine.read("seed:1", [Read(A, 0x50000000, 8192)])
    assert binding.submitted == [(A, 0x50000000, 8192)] and seed.asked == []


# --- late writes ----------------------------------------------------------------------

class LateBinding:
    """Stand-in binding: each batch reports in flight, then timed out (-2) for `timed_out_polls` checks
    (None: for ever), then completed, writing its bytes (0xAB) into our memory only then."""

    def __init__(self, *, timed_out_polls: int | None, events: list | None = None):
        self.timed_out_polls = timed_out_polls
        self.batches: dict[int, list] = {}
        self.events = events if events is not None else []
        self.checks_after_terminal = 0

    def batch_transfer_async_read(self, session, locals_, remotes, lengths):
        bid = len(self.batches) + 1
        self.batches[bid] = [locals_[0], lengths[0], 1, self.timed_out_polls, session]
        self.events.append(("submit", session))
        return bid

    def transfer_check_status(self, bid):
        b = self.batches[bid]
        if b[2] is None:
            self.checks_after_terminal += 1
            return 1
        if b[2] > 0:
            b[2] -= 1
            return 0
        if b[3] is None or b[3] > 0:
            b[3] = None if b[3] is None else b[3] - 1
            return -2
        ctypes.memset(b[0], 0xAB, b[1])  # the late write
        self.events.append(("landed", b[4]))
        b[2] = None
        return 1

    def in_flight(self):
        return sum(1 for b in self.batches.values() if b[2] is not None)


def test_a_timed_out_read_fails_only_after_its_bytes_landed(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0)
    buf = ctypes.create_string_buffer(64)
    binding = LateBinding(timed_out_polls=20)
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=None)
    done = []
    with pytest.raises(TransferError, match=r"timed out in Mooncake .*return code -2"):
        engine.read("seed:1", [Read(ctypes.addressof(buf), 0x9000, 64)], on_done=done.append)
    assert binding.in_flight() == 0 and buf.raw == b"\xab" * 64  # nothing left to write into our memory
    assert binding.checks_after_terminal == 0 and done == []


def test_a_read_that_never_ends_raises_reads_in_flight_naming_the_memory(monkeypatch):
    monkeypatch.setattr(engine_module, "POLL_S", 0.001)
    binding = LateBinding(timed_out_polls=None)
    engine = MooncakeEngine(binding, "me:1", owned=False, transport="tcp", allocations=None)
    with pytest.raises(ReadsInFlightError, match="still in flight 0.05 s after reading stopped") as info:
        engine.read("seed:1", [Read(0x1000, 0x9000, 64), Read(0x2000, 0x9100, 32)], drain_s=0.05)
    assert not isinstance(info.value, TransferError)  # no failover to the next seed may catch it (roles: no fallback)
    assert info.value.ranges == ((0x1000, 64), (0x2000, 32)) and info.value.seed == "seed:1"
