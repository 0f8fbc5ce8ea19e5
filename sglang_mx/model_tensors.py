"""Which tensors of a loaded model a seed publishes and a target fills.

Everything the forward pass reads that came from the checkpoint: parameters,
persistent buffers, and plain tensor attributes that post-processing hangs on
modules (quantization scales, fused or transposed copies). Non-persistent
buffers are caches each instance computes from its config (RoPE's
cos_sin_cache, whose length may differ between a running instance and a fresh
one) and stay local. The walk is deterministic, so a seed and a target built
from the same model code and identity get the same names in the same order.
torch only; no SGLang.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch


def collect_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor, one entry per distinct piece of memory.

    - Tied weights (one storage under several names) appear once, under the
      first name the walk meets.
    - A tensor that is a view inside another collected tensor is skipped.
    - A non-contiguous tensor is published as the contiguous byte span that
      holds its elements (a uint8 view of that span), so its bytes move as-is.
    - Meta tensors (no memory) are skipped.
    """
    spans: list[tuple[int, int]] = []  # (start, end) of the memory already covered
    out: dict[str, torch.Tensor] = {}
    walk = [(name, t) for name, t in _walk(model) if t.device.type != "meta"]
    order = {name: i for i, (name, _) in enumerate(walk)}
    # Biggest first, contiguous before strided, then walk order: a base tensor
    # is met before its views, and a parameter before its transposed copy.
    candidates = sorted(walk, key=lambda it: (-_span(it[1])[1], not it[1].is_contiguous(), order[it[0]]))
    for name, tensor in candidates:
        start, nbytes = _span(tensor)
        if nbytes and any(s <= start and start + nbytes <= e for s, e in spans):
            continue
        if nbytes:
            spans.append((start, start + nbytes))
        out[name] = tensor if tensor.is_contiguous() else _span_view(tensor)
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


def layout_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits over the name, shape, dtype, strides and storage offset of every
    tensor `collect_tensors` walks, in walk order.

    Part of the identity: two builds whose tensors agree in byte size but not in
    layout (a transposed copy, another packing, another order) never pair.
    """
    h = hashlib.sha256()
    for name, t in _walk(model):
        if t.device.type == "meta":
            continue
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{t.stride()}|{t.storage_offset()}\n".encode())
    return h.hexdigest()[:16]


def _walk(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        own = dict(module.named_parameters(recurse=False, remove_duplicate=False))
        local_only = getattr(module, "_non_persistent_buffers_set", set())
        own.update((n, b) for n, b in module.named_buffers(recurse=False, remove_duplicate=False)
                   if n not in local_only)
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in own or attr in local_only:
                continue
            if isinstance(value, torch.Tensor):
                own[attr] = value
        for attr, tensor in own.items():
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield prefix + attr, tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor


def _span(t: torch.Tensor) -> tuple[int, int]:
    """(first byte address, byte length) of the memory holding t's elements."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    return t.data_ptr(), extent * t.element_size()


def _span_view(t: torch.Tensor) -> torch.Tensor:
    _, nbytes = _span(t)
    offset = t.storage_offset() * t.element_size()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), offset, (nbytes,), (1,)
    )
