"""Split facts of a loaded SGLang model, read from its own parallel layers (sglang_mx.shards).

For each tensor of a recognised layer: which dimension SGLang split it along,
the sizes of the whole tensor's fused parts, and which rows this rank holds,
all from the layer's own attributes (its TP group's rank and size, output
sizes, head counts, vocab shard indices), never from names. What is not
recognised, or is recognised but quantized, repacked or pre-sharded, gets a
reason instead: a mixed-layout pull then refuses that tensor by name.

Recognised (SGLang 0.5.23 `sglang.srt.layers`): QKVParallelLinear,
MergedColumnParallelLinear, ColumnParallelLinear, RowParallelLinear,
VocabParallelEmbedding / ParallelLMHead, and as replicated ReplicatedLinear
and the norms of `layernorm` (RMSNorm, LayerNorm, GemmaRMSNorm) whose weights
SGLang loads whole.
"""

from __future__ import annotations

from sglang_mx.records import ShardSpec, Span
from sglang_mx.shards import check_spec, replicated


def shard_facts(model) -> tuple[dict[str, ShardSpec], dict[str, str]]:
    """(name -> ShardSpec, name -> why it has none) for the parameters of `model`'s layers."""
    from sglang.srt.layers import layernorm, linear, vocab_parallel_embedding as vocab

    norms = tuple(getattr(layernorm, n) for n in ("RMSNorm", "LayerNorm", "GemmaRMSNorm") if hasattr(layernorm, n))
    specs: dict[str, ShardSpec] = {}
    reasons: dict[str, str] = {}
    for prefix, module in model.named_modules():
        params = {n: p for n, p in module.named_parameters(recurse=False) if p is not None}
        if not params:
            continue
        names = {n: f"{prefix}.{n}" if prefix else n for n in params}
        kind = type(module).__name__
        try:
            if isinstance(module, linear.QKVParallelLinear):
                facts = _qkv(module, params)
            elif isinstance(module, linear.MergedColumnParallelLinear):
                facts = _column(module, params, list(module.output_sizes))
            elif isinstance(module, linear.ColumnParallelLinear):
                facts = _column(module, params, [module.output_size])
            elif isinstance(module, linear.RowParallelLinear):
                facts = _row(module, params)
            elif isinstance(module, vocab.VocabParallelEmbedding):
                facts = _vocab(module, params)
            elif isinstance(module, linear.ReplicatedLinear):
                _plain_linear(module)
                facts = {n: replicated(p.shape) for n, p in params.items()}
            elif norms and isinstance(module, norms):
                split_loaded = [n for n, p in params.items() if getattr(p, "weight_loader", None) is not None]
                if split_loaded:
                    raise _NoFacts(f"{kind}.{split_loaded[0]} has its own weight loader (it may be split)")
                facts = {n: replicated(p.shape) for n, p in params.items()}
            else:
                raise _NoFacts(f"{kind} is not a layer whose split sglang-mx knows")
            for n, p in params.items():
                spec = facts[n]
                problem = check_spec(spec) or _fits(spec, p)  # a layer whose tensors are not its own cut: no facts
                if problem:
                    raise _NoFacts(f"{kind}.{n}: {problem}")
        except _NoFacts as e:
            for n in params:
                reasons[names[n]] = str(e)
            continue
        for n in params:
            specs[names[n]] = facts[n]
    return specs, reasons


class _NoFacts(Exception):
    pass


def _rank_size(group) -> tuple[int, int]:
    return (0, 1) if group is None else (int(group.rank_in_group), int(group.world_size))


def _plain_linear(module) -> None:
    method = type(getattr(module, "quant_method", None)).__name__
    if method != "UnquantizedLinearMethod":
        raise _NoFacts(f"{type(module).__name__} uses {method} (quantized weights are repacked per layout)")
    if getattr(module, "use_presharded_weights", False):
        raise _NoFacts(f"{type(module).__name__} loads pre-sharded weights")
    if getattr(module, "use_intel_amx_backend", False):
        raise _NoFacts(f"{type(module).__name__} weights are packed for the CPU AMX backend")


def _fits(spec: ShardSpec, p) -> str:
    if tuple(p.shape) != spec.shape:
        return f"shape {tuple(p.shape)} differs from the layer's own {spec.shape} (repacked?)"
    if not p.is_contiguous():
        return f"not contiguous (stride {p.stride()})"
    return ""


def _spans(sizes, rank: int, size: int) -> tuple[list[int], list[Span]]:
    """Each whole part split evenly over `size` ranks: this rank's span of each, laid end to end."""
    spans, local, start = [], 0, 0
    for whole in sizes:
        if whole % size:
            raise _NoFacts(f"a part of {whole} rows does not split evenly over {size} ranks")
        n = whole // size
        spans.append(Span(local, start + rank * n, n))
        local += n
        start += whole
    return list(sizes), spans


def _column(module, params, sizes) -> dict[str, ShardSpec]:
    _plain_linear(module)
    rank, size = _rank_size(module.tp_group)
    parts, spans = _spans(sizes, rank, size)
    return _rows_split(module, params, parts, spans)


def _qkv(module, params) -> dict[str, ShardSpec]:
    _plain_linear(module)
    rank, size = _rank_size(module.tp_group)
    kv_rank, kv_size = _rank_size(getattr(module, "kv_tp_group", module.tp_group))
    if (kv_rank, kv_size) != (rank, size):
        raise _NoFacts("QKVParallelLinear with its own key/value group")
    hd, vhd = module.head_size, module.v_head_size
    q_whole, k_whole = module.total_num_heads * hd, module.total_num_kv_heads * hd
    v_whole = module.total_num_kv_heads * vhd
    q_n, k_n, v_n = module.num_heads * hd, module.num_kv_heads * hd, module.num_kv_heads * vhd
    kv_shard = rank // module.num_kv_head_replicas  # which key/value heads this rank holds (replicated ones too)
    spans = [Span(0, rank * q_n, q_n), Span(q_n, q_whole + kv_shard * k_n, k_n),
             Span(q_n + k_n, q_whole + k_whole + kv_shard * v_n, v_n)]
    return _rows_split(module, params, [q_whole, k_whole, v_whole], spans)


def _row(module, params) -> dict[str, ShardSpec]:
    _plain_linear(module)
    rank, size = _rank_size(module.tp_group)
    if "weight" not in params or params["weight"].dim() != 2:
        raise _NoFacts("RowParallelLinear without a 2-D weight")
    weight = params["weight"]
    parts, spans = _spans([module.input_size], rank, size)
    facts = {"weight": _spec(weight, 1, parts, spans)}
    if "bias" in params:
        facts["bias"] = replicated(params["bias"].shape)  # SGLang does not split a row-parallel bias
    return facts | _unknown_params(module, params, ("weight", "bias"))


def _vocab(module, params) -> dict[str, ShardSpec]:
    quant = type(getattr(module, "quant_method", None)).__name__
    if quant not in ("UnquantizedEmbeddingMethod", "NoneType"):
        raise _NoFacts(f"{type(module).__name__} uses {quant}")
    if getattr(module, "use_presharded_weights", False):
        raise _NoFacts(f"{type(module).__name__} loads pre-sharded weights")
    if module.num_embeddings != module.org_vocab_size:
        raise _NoFacts(f"{type(module).__name__} has {module.num_embeddings - module.org_vocab_size} added "
                       "(LoRA) embeddings")
    per = module.num_embeddings_per_partition
    start = module.shard_indices.padded_org_vocab_start_index
    whole = module.num_embeddings_padded
    return _rows_split(module, params, [whole], [Span(0, start, per)])


def _spec(p, dim: int, parts, spans) -> ShardSpec:
    """The spec the layer's attributes describe, unchecked: `shard_facts` checks it against the tensor."""
    return ShardSpec(dim=dim, shape=tuple(p.shape), parts=tuple(parts), spans=tuple(spans))


def _rows_split(module, params, parts, spans) -> dict[str, ShardSpec]:
    """weight and bias split along dim 0 into `spans` of the whole `parts`; any other parameter: no facts."""
    return {n: _spec(p, 0, parts, spans) for n, p in params.items() if n in ("weight", "bias")} | \
        _unknown_params(module, params, ("weight", "bias"))


def _unknown_params(module, params, known) -> dict[str, ShardSpec]:
    extra = [n for n in params if n not in known]
    if extra:
        raise _NoFacts(f"{type(module).__name__} has parameter(s) {', '.join(extra)} whose split is unknown")
    return {}

