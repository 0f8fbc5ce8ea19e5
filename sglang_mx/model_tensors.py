"""Which tensors of a loaded model a seed publishes and a target fills, and the rule for the rest.

The rule (strict: what is not known to be safe to leave out moves):

- Published and pulled: parameters; buffers, persistent or not (post-processing
  builds weight-derived non-persistent buffers, e.g. a bf16 dequantized copy of a
  block-FP8 weight); tensor attributes of modules and of parameters, `_`-prefixed
  ones included (e.g. `weight._mxscale_w_scale`); tensors held in lists, tuples
  and dicts on modules (`attr.0`, `attr.key`).
- Left local, by rule: caches each instance computes from its config, named in
  CONFIG_CACHES (RoPE's `cos_sin_cache`, whose length differs between a running
  instance and a fresh one); runtime state that must never be copied from a live
  seed, any tensor whose name contains a RUNTIME_STATE word (Marlin workspaces,
  locks). A config cache not in the list fails the strict size check loudly.
- Python values that post-processing derives from weight values cannot move as
  bytes: `refresh_derived` recomputes the ones we know after the pull
  (`k_scale_float`/`v_scale_float` from `k_scale`/`v_scale`), and
  `uncarried_state` names the ones we cannot recompute (a scale's `power_of_two`),
  so such a model is refused before any byte moves instead of served with flags
  computed from dummy values.

The walk is deterministic, so a seed and a target built from the same model code
and identity get the same names in the same order. torch only; no SGLang.
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


# Buffers each instance computes from its config (never from weights): left local.
CONFIG_CACHES = ("cos_sin_cache", "inv_freq", "cos_cached", "sin_cached")
# Runtime state a live seed must never hand out (kernel workspaces, locks): left local.
RUNTIME_STATE = ("workspace", "lock")
# Python attributes that post-processing computes from a tensor's values: name -> the tensor it reads.
DERIVED_SCALARS = {"k_scale_float": "k_scale", "v_scale_float": "v_scale"}
# Value-derived Python flags on parameters that we cannot recompute: a model with them is refused.
UNCARRIED_FLAGS = ("power_of_two",)


def refresh_derived(model: torch.nn.Module) -> list[str]:
    """After a pull: recompute the DERIVED_SCALARS from the pulled tensors; returns their names."""
    refreshed = []
    for module_name, module in model.named_modules():
        for attr, source in DERIVED_SCALARS.items():
            tensor = getattr(module, source, None)
            if isinstance(getattr(module, attr, None), float) and isinstance(tensor, torch.Tensor):
                setattr(module, attr, float(tensor.reshape(-1)[0].item()) if tensor.numel() else 0.0)
                refreshed.append(f"{module_name}.{attr}" if module_name else attr)
    return refreshed


def uncarried_state(model: torch.nn.Module) -> list[str]:
    """Names of value-derived Python flags (UNCARRIED_FLAGS) the model holds; a peer load cannot carry them."""
    found = []
    for name, param in model.named_parameters(remove_duplicate=False):
        found += [f"{name}.{flag}" for flag in UNCARRIED_FLAGS if hasattr(param, flag)]
    return found


def _local_only(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in CONFIG_CACHES or any(word in name.lower() for word in RUNTIME_STATE)


def _tensors_in(attr: str, value) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for a tensor attribute, or for the tensors in a list/tuple/dict attribute."""
    if isinstance(value, torch.Tensor):
        yield attr, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                yield f"{attr}.{i}", item
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, torch.Tensor) and isinstance(key, (str, int)):
                yield f"{attr}.{key}", item


def _walk(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        params = dict(module.named_parameters(recurse=False, remove_duplicate=False))
        own = dict(params)
        own.update(module.named_buffers(recurse=False, remove_duplicate=False))
        registered = set(own) | set(getattr(module, "_parameters", {})) | set(getattr(module, "_buffers", {}))
        for attr, value in vars(module).items():
            if attr in registered or attr in ("_parameters", "_buffers", "_modules"):
                continue
            own.update(_tensors_in(attr, value))
        for pname, param in params.items():  # tensors post-processing hangs on parameters
            if param is not None:
                own.update((f"{pname}.{n}", t) for n, t in _tensors_in_vars(param))
        for attr, tensor in own.items():
            if tensor is None or id(tensor) in seen or _local_only(prefix + attr):
                continue
            seen.add(id(tensor))
            yield prefix + attr, tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor


def _tensors_in_vars(param: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        attrs = vars(param)
    except TypeError:  # a tensor subclass without __dict__
        return
    for attr, value in attrs.items():
        yield from _tensors_in(attr, value)


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
