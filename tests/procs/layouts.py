"""A Llama layer's tensors cut for TP ranks by SGLang's rules, rebuilt identically in any process.

Fused QKV with key/value heads replicated once TP exceeds them, fused gate_up,
row-split o_proj and down_proj, a vocab-split embedding, replicated norms and a
replicated row-parallel bias. `whole_tensors` is deterministic (seeded), so
seed processes and the test agree byte for byte.
"""

from __future__ import annotations

import torch

from sglang_mx.records import ShardSpec, Span
from sglang_mx.shards import check_spec, replicated

HEADS, HD, HIDDEN, INTER, VOCAB = 8, 4, 16, 32, 64  # at scale 1; all but HEADS grow with `scale`


def split(shape, dim: int, parts, spans) -> ShardSpec:
    """A split spec, checked (sglang_mx.shards.check_spec): spans inside their parts, laid end to end."""
    spec = ShardSpec(dim=dim, shape=tuple(shape), parts=tuple(parts), spans=tuple(spans))
    problem = check_spec(spec)
    if problem:
        raise ValueError(problem)
    return spec


def _dims(scale: int) -> tuple[int, int, int, int]:
    return HD * scale, HIDDEN * scale, INTER * scale, VOCAB * scale


def _spans(sizes, rank, tp):
    spans, local, start = [], 0, 0
    for whole in sizes:
        n = whole // tp
        spans.append(Span(local, start + rank * n, n))
        local += n
        start += whole
    return spans


def specs_for(tp: int, rank: int, kv_heads: int, scale: int = 1):
    """name -> ShardSpec of one rank, by SGLang's rules."""
    hd, hidden, inter, vocab = _dims(scale)
    q, kv = HEADS * hd, kv_heads * hd
    local_kv_heads = max(1, kv_heads // tp)
    replicas = max(1, tp // kv_heads)
    kv_shard = rank // replicas
    q_n, kv_n = q // tp, local_kv_heads * hd
    qkv_spans = [Span(0, rank * q_n, q_n), Span(q_n, q + kv_shard * kv_n, kv_n),
                 Span(q_n + kv_n, q + kv + kv_shard * kv_n, kv_n)]
    rows = q_n + 2 * kv_n
    return {
        "embed.weight": split((vocab // tp, hidden), 0, [vocab], _spans([vocab], rank, tp)),
        "qkv.weight": split((rows, hidden), 0, [q, kv, kv], qkv_spans),
        "qkv.bias": split((rows,), 0, [q, kv, kv], qkv_spans),
        "o.weight": split((hidden, q // tp), 1, [q], _spans([q], rank, tp)),
        "o.bias": replicated((hidden,)),
        "gate_up.weight": split((2 * inter // tp, hidden), 0, [inter, inter], _spans([inter, inter], rank, tp)),
        "down.weight": split((hidden, inter // tp), 1, [inter], _spans([inter], rank, tp)),
        "norm.weight": replicated((hidden,)),
    }


def whole_tensors(kv_heads: int, seed: int = 0, scale: int = 1):
    hd, hidden, inter, vocab = _dims(scale)
    g = torch.Generator().manual_seed(seed)
    q, kv = HEADS * hd, kv_heads * hd
    shapes = {"embed.weight": (vocab, hidden), "qkv.weight": (q + 2 * kv, hidden), "qkv.bias": (q + 2 * kv,),
              "o.weight": (hidden, q), "o.bias": (hidden,), "gate_up.weight": (2 * inter, hidden),
              "down.weight": (hidden, inter), "norm.weight": (hidden,)}
    return {n: torch.randn(*s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def cut(whole: torch.Tensor, spec) -> torch.Tensor:
    """The rank's tensor: its spans of the whole tensor, laid end to end."""
    if spec.replicated:
        return whole.clone()
    return torch.cat([whole.narrow(spec.dim, s.global_start, s.length) for s in spec.spans], dim=spec.dim).contiguous()


