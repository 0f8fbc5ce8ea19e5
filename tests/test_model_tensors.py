"""Which tensors of a model move (parameters, buffers, post-processing attributes), and the rule for the rest."""

import torch

from sglang_mx.model_tensors import collect_tensors


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(3))  # persistent: from the checkpoint
        self.register_buffer("cache", torch.zeros(7), persistent=False)  # derived by post-processing: moves
        self.register_buffer("cos_sin_cache", torch.zeros(9), persistent=False)  # config cache: local
        self.workspace = torch.zeros(5)  # Marlin's runtime state (exact leaf name): never copied from a live seed
        self.marlin_workspace = torch.zeros(4)  # not a listed leaf name: moves
        self.fused = torch.arange(6.0)  # attribute made by post-processing
        self.fused_t = self.embed.weight.t()  # a view of another tensor
        self.strided = torch.arange(24.0).view(4, 6)[:, :3]  # non-contiguous, owns its storage
        self.empty = torch.zeros(0)
        self.layer = torch.nn.Linear(4, 4)
        self._private = torch.ones(2)  # `_`-prefixed post-processing attribute: moves
        self.parts = [torch.ones(3), torch.zeros(2)]  # tensors in a list: move
        self.layer.weight._scale_copy = torch.full((4,), 2.0)  # a tensor hung on a parameter: moves


def test_collects_what_came_from_the_checkpoint_once():
    model = Toy()
    tensors = collect_tensors(model)
    assert list(tensors) == ["scale", "cache", "marlin_workspace", "fused", "strided", "empty", "_private", "parts.0", "parts.1",
                             "embed.weight", "layer.weight", "layer.bias", "layer.weight._scale_copy"]
    assert tensors["embed.weight"].data_ptr() == model.embed.weight.data_ptr()


def test_strided_tensor_moves_as_its_byte_span():
    model = Toy()
    span = collect_tensors(model)["strided"]
    assert span.dtype == torch.uint8 and span.is_contiguous()
    # rows of 6 floats, 3 used: (3 rows * 6 + 3) elements * 4 bytes
    assert span.numel() == (3 * 6 + 3) * 4
    assert span.data_ptr() == model.strided.data_ptr()


def test_same_model_code_gives_same_names_and_sizes():
    a, b = collect_tensors(Toy()), collect_tensors(Toy())
    assert [(n, t.nbytes) for n, t in a.items()] == [(n, t.nbytes) for n, t in b.items()]


def test_meta_tensors_are_skipped():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 3)
    assert collect_tensors(model) == {}


def test_layout_fingerprint_sees_strides_dtypes_shapes_and_order():
    import torch

    from sglang_mx.model_tensors import layout_fingerprint

    def model(weight, bias):
        m = torch.nn.Linear(4, 4)
        m.weight = torch.nn.Parameter(weight)
        m.bias = torch.nn.Parameter(bias)
        return m

    w, b = torch.zeros(4, 4), torch.zeros(4)
    base = layout_fingerprint(model(w, b))
    assert layout_fingerprint(model(torch.ones(4, 4), torch.ones(4))) == base  # values do not matter
    assert layout_fingerprint(model(w.t().contiguous().t(), b)) != base  # same bytes, transposed layout
    assert layout_fingerprint(model(w.to(torch.bfloat16), b)) != base
    assert layout_fingerprint(model(torch.zeros(2, 8), b)) != base  # same byte size, other shape


def test_derived_python_scalars_are_recomputed_after_a_pull_and_uncarried_flags_named():
    from sglang_mx.model_tensors import refresh_derived, uncarried_state

    class Attention(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k_scale = torch.nn.Parameter(torch.tensor([k]), requires_grad=False)
            self.k_scale_float = float(k)  # post-processing reads the value into a Python float

    seed, target = Attention(0.5), Attention(1.0)  # the target's float came from dummy values
    for name, tensor in collect_tensors(target).items():  # what the pull does: bytes, by name
        tensor.copy_(collect_tensors(seed)[name])
    assert target.k_scale_float == 1.0  # stale
    assert refresh_derived(target) == ["k_scale_float"]
    assert target.k_scale_float == 0.5

    target.k_scale.power_of_two = True  # a flag computed from values that sglang-mx cannot recompute
    assert uncarried_state(target) == ["k_scale.power_of_two"]
    assert uncarried_state(seed) == []


# --- fail closed: exact leaf names, unplaceable tensors refused, every byte accounted for ---

import pytest  # noqa: E402

from sglang_mx.errors import UnplacedTensorError  # noqa: E402
from sglang_mx.model_tensors import LOCAL_ONLY, account, layout_fingerprint  # noqa: E402


def _moe_layer(experts: int = 4) -> torch.nn.Module:
    """A Mixtral-shaped decoder layer, named as SGLang 0.5.23 names it (`block_sparse_moe`)."""
    layer = torch.nn.Module()
    layer.input_layernorm = torch.nn.LayerNorm(8)
    moe = torch.nn.Module()
    moe.gate = torch.nn.Linear(8, experts, bias=False)
    moe.experts = torch.nn.Module()
    moe.experts.w13_weight = torch.nn.Parameter(torch.randn(experts, 32, 8), requires_grad=False)
    moe.experts.w2_weight = torch.nn.Parameter(torch.randn(experts, 8, 16), requires_grad=False)
    layer.block_sparse_moe = moe
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([layer])
    return model


def test_names_that_contain_a_local_word_still_move():
    """Mixtral's `block_sparse_moe` contains "lock": a substring rule left its experts unpulled."""
    names = list(collect_tensors(_moe_layer()))
    assert "layers.0.block_sparse_moe.experts.w13_weight" in names
    assert "layers.0.block_sparse_moe.experts.w2_weight" in names
    assert "layers.0.block_sparse_moe.gate.weight" in names
    for leaf in ("_block_fp8_bf16_weight", "w13_blockscale_swizzled", "visual_blocks_weight", "lock_free"):
        m = torch.nn.Module()
        m.register_buffer(leaf, torch.ones(3), persistent=False)
        assert list(collect_tensors(m)) == [leaf]


def test_the_layout_fingerprint_sees_the_experts():
    assert layout_fingerprint(_moe_layer(4)) != layout_fingerprint(_moe_layer(8))


def test_every_local_rule_is_an_exact_leaf_name_with_a_reason():
    for leaf, reason in LOCAL_ONLY.items():
        assert "." not in leaf and len(reason) > 20
        m = torch.nn.Module()
        m.register_buffer(leaf, torch.ones(2))
        m.register_buffer(f"{leaf}_copy", torch.ones(2))
        assert list(collect_tensors(m)) == [f"{leaf}_copy"]


def test_nested_containers_are_named_and_moved():
    m = torch.nn.Module()
    m.groups = {"a": [torch.ones(2), (torch.zeros(3),)], 7: torch.ones(1)}
    assert list(collect_tensors(m)) == ["groups.a.0", "groups.a.1.0", "groups.7"]


@pytest.mark.parametrize("make, name, why", [
    (lambda m: setattr(m, "by_dtype", {torch.float32: torch.ones(2)}), "by_dtype[torch.float32]", "dict key"),
    (lambda m: setattr(m, "deep", [[[[[[torch.ones(2)]]]]]]), "deep.0.0.0.0.0", "nested deeper"),
    (lambda m: setattr(m, "sparse", torch.eye(3).to_sparse()), "sparse", "layout"),
    (lambda m: setattr(m, "quant_method", type("Method", (), {})()) or setattr(m.quant_method, "cache",
                                                                                   torch.ones(4)),
     "quant_method.cache", "held by an object"),
    (lambda m: setattr(m, "helper", [torch.nn.Linear(2, 2)]), "helper.0.weight helper.0.bias",
     "held by an object"),
])
def test_a_tensor_the_rule_cannot_place_is_refused_by_name(make, name, why):
    m = torch.nn.Linear(2, 2)
    make(m)
    with pytest.raises(UnplacedTensorError, match=why) as e:
        collect_tensors(m)
    assert [n for n, _ in e.value.tensors] == name.split()
    with pytest.raises(UnplacedTensorError):
        account(m, {})


def test_objects_holding_views_of_moving_tensors_are_fine():
    m = torch.nn.Linear(4, 4)
    m.quant_method = type("Method", (), {})()
    m.quant_method.weight_t = m.weight.t()  # inside a tensor that moves
    m.quant_method.config = {"bits": 8}
    assert list(collect_tensors(m)) == ["weight", "bias"]


def test_account_counts_written_and_local_bytes_and_refuses_the_rest():
    m = _moe_layer()
    m.layers[0].register_buffer("cos_sin_cache", torch.ones(10), persistent=False)
    tensors = collect_tensors(m)
    result = account(m, tensors)
    total = sum(t.nbytes for t in tensors.values())
    assert (result.written, result.local, result.total) == (total, 40, total + 40)
    assert (result.written_tensors, result.local_tensors) == (len(tensors), 1)

    partial = {n: t for n, t in tensors.items() if "w2_weight" not in n}
    with pytest.raises(UnplacedTensorError, match="neither pulled nor local") as e:
        account(m, partial)
    assert [n for n, _ in e.value.tensors] == ["layers.0.block_sparse_moe.experts.w2_weight"]
