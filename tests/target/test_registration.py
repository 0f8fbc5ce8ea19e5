"""A target that becomes a seed keeps its registration (fake Mooncake binding, named as such)."""

from __future__ import annotations

import torch

from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.tensors import describe


class FakeBinding:
    """Counts register_memory / unregister_memory calls the way the Mooncake binding would see them."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}
        self.register_calls = self.unregister_calls = 0

    def register_memory(self, addr, length):
        self.register_calls += 1
        self.registered[addr] = length
        return 0

    def unregister_memory(self, addr):
        self.unregister_calls += 1
        self.registered.pop(addr)
        return 0


def test_wrappers_of_one_engine_share_registrations_and_keep_memory_until_its_last_holder_lets_go():
    binding = FakeBinding()
    weights = {f"w{i}": torch.ones(1024) for i in range(3)}
    ranges = [(t.addr, t.size) for t in describe(weights)]
    pull = MooncakeEngine.wrap(binding, "127.0.0.1:1", segments=None, allocations=None)  # the target's load
    kept = pull.register(ranges)  # ... pulled, and kept registered for the seed it becomes
    seed = MooncakeEngine.wrap(binding, "127.0.0.1:1", segments=None, allocations=None)  # the publication
    published = seed.register(ranges)
    assert published == kept and binding.register_calls == len(kept)  # registered once, not twice
    seed.unregister(published)  # the seed withdraws: the pull's hold keeps the memory registered
    assert binding.unregister_calls == 0 and len(binding.registered) == len(kept)
    pull.unregister(kept)
    assert binding.unregister_calls == len(kept) and binding.registered == {}


def test_pull_options_keep_registration_when_the_target_will_seed():
    from sglang_mx.config import parse_config
    from sglang_mx.target import PullOptions

    assert PullOptions.from_config(parse_config({}, env={})).keep_registered  # a target seeds by default
    assert not PullOptions.from_config(parse_config({"source": False}, env={})).keep_registered


def test_a_target_waits_on_the_watch_unless_configured_to_poll():
    from sglang_mx.config import parse_config
    from sglang_mx.target import PullOptions

    assert PullOptions.from_config(parse_config({}, env={})).watch
    assert not PullOptions.from_config(parse_config({"watch": False}, env={})).watch
