"""Which tensors of a model move: parameters, persistent buffers, post-processing attributes."""

import torch

from sglang_mx.model_tensors import collect_tensors


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(3))  # persistent: from the checkpoint
        self.register_buffer("cache", torch.zeros(7), persistent=False)  # derived, local
        self.fused = torch.arange(6.0)  # attribute made by post-processing
        self.fused_t = self.embed.weight.t()  # a view of another tensor
        self.strided = torch.arange(24.0).view(4, 6)[:, :3]  # non-contiguous, owns its storage
        self.empty = torch.zeros(0)
        self.layer = torch.nn.Linear(4, 4)
        self._private = torch.ones(2)


def test_collects_what_came_from_the_checkpoint_once():
    model = Toy()
    tensors = collect_tensors(model)
    assert list(tensors) == ["scale", "fused", "strided", "empty", "embed.weight", "layer.weight", "layer.bias"]
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
