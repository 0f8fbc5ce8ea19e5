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
        self.marlin_workspace = torch.zeros(5)  # runtime state: never copied from a live seed
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
    assert list(tensors) == ["scale", "cache", "fused", "strided", "empty", "_private", "parts.0", "parts.1",
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
