"""Which tensors of a loaded model a seed publishes and a target fills, and the rule for the rest.

The rule fails closed: what moves is defined positively, and what cannot be
placed stops the load.

- Moved (published and pulled): every parameter; every buffer, persistent or not
  (post-processing builds weight-derived non-persistent buffers, e.g. block-FP8's
  `_block_fp8_bf16_weight`); every tensor attribute of a module or of a parameter,
  `_`-prefixed ones included (e.g. `weight._mxscale_w_scale`); tensors held in
  lists, tuples and dicts (with str or int keys) on modules and parameters, nested
  or not (`attr.0`, `attr.key.1`).
- Left local, by rule: a tensor whose exact leaf name (the attribute or buffer
  name on its module or parameter; never a substring of the path) is in
  LOCAL_ONLY, each entry with its reason.
- Refused (UnplacedTensorError, naming the tensor): a tensor the walk meets but
  cannot move as bytes under a stable name (not strided memory, a dict key that
  is not str/int, containers nested deeper than MAX_NESTING), and a tensor held by
  any other object on a module (a quant method, a helper, an unregistered module)
  whose memory is not inside a tensor that moves or stays local by rule (objects of
  a PROCESS_STATE class, such as SGLang's process groups, hold the process's
  state, not the model's, and are not looked into). The seed
  then does not publish the model and the target does not load it from a peer.
- After a pull, `account` proves the target kept nothing it did not write: every
  distinct piece of the model's tensor memory is either inside a tensor the pull
  wrote or local by rule (written + local == all, in bytes), else it refuses.

Python values that post-processing derives from weight values cannot move as
bytes: `refresh_derived` recomputes the ones we know after the pull
(`k_scale_float`/`v_scale_float` from `k_scale`/`v_scale`), and `uncarried_state`
names the ones we cannot recompute (a scale's `power_of_two`), so such a model is
refused before any byte moves instead of served with flags computed from dummy values.

The walk is deterministic, so a seed and a target built from the same model code
and identity get the same names in the same order. torch only; no SGLang.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import types
from typing import Mapping

import torch

from sglang_mx.errors import UnplacedTensorError

# Exact leaf names left local, each with its reason. Everything else moves.
LOCAL_ONLY: Mapping[str, str] = {
    "cos_sin_cache": "RoPE's cos/sin table, computed from the config at build time; a live instance may have "
                     "grown it past a fresh build's length (rotary_embedding)",
    "workspace": "Marlin kernels' scratch and lock memory (quantization/marlin_utils*.py): the live seed's "
                 "runtime state, never weights",
    "locks": "humming kernels' lock counters (quantization/humming*.py): runtime state, never weights",
}
# Objects modules hold whose tensors are the process's state, not the model's (exact class names):
# never scanned for unplaced tensors.
PROCESS_STATE: Mapping[str, str] = {
    "GroupCoordinator": "SGLang's process group (parallel_state): communication state shared by every "
                        "module of the process (active-rank masks, buffers), never weights",
}
# Containers inside containers deeper than this are not walked: their tensors are refused, not guessed at.
MAX_NESTING = 4
# Python attributes that post-processing computes from a tensor's values: name -> the tensor it reads.
DERIVED_SCALARS = {"k_scale_float": "k_scale", "v_scale_float": "v_scale"}
# Value-derived Python flags on parameters that we cannot recompute: a model with them is refused.
UNCARRIED_FLAGS = ("power_of_two",)


def collect_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor for every tensor that moves, one entry per distinct piece of memory.

    - Tied weights (one storage under several names) appear once, under the
      first name the walk meets.
    - A tensor that is a view inside another collected tensor is skipped.
    - A non-contiguous tensor is published as the contiguous byte span that
      holds its elements (a uint8 view of that span), so its bytes move as-is.
    - Meta tensors (no memory) are skipped.

    Raises UnplacedTensorError when the model holds a tensor the rule cannot place.
    """
    survey = _survey(model)
    survey.raise_unplaced("the model holds tensors sglang-mx can neither move nor leave local by rule")
    return _distinct(survey.moving)


def layout_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits over the name, shape, dtype, strides and storage offset of every
    tensor that moves, in walk order.

    Part of the identity: two builds whose tensors agree in byte size but not in
    layout (a transposed copy, another packing, another order) never pair.
    """
    h = hashlib.sha256()
    for name, t in _survey(model).moving:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{t.stride()}|{t.storage_offset()}\n".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Where every byte of a model's tensor memory came from after a pull."""

    written: int  # bytes inside tensors the pull wrote
    local: int  # bytes left local by a LOCAL_ONLY rule
    total: int  # bytes of the model's distinct tensor memory
    written_tensors: int
    local_tensors: int


def account(model: torch.nn.Module, written: Mapping[str, torch.Tensor]) -> Accounting:
    """Prove that every parameter, buffer and tensor attribute of `model` is either
    inside a tensor of `written` (what the pull filled) or local by rule.

    Raises UnplacedTensorError naming each tensor that is neither, and when the
    bytes do not add up (written + local != all).
    """
    survey = _survey(model)
    survey.raise_unplaced("the model holds tensors sglang-mx can neither move nor leave local by rule")
    covered = _Spans(_span(t) for t in written.values())
    local_spans = _Spans(_span(t) for _, t, _ in survey.local)
    local_names = {id(t) for _, t, _ in survey.local}
    written_bytes = local_bytes = total = n_written = n_local = 0
    missing = []
    for name, tensor in _distinct(survey.moving + [(n, t) for n, t, _ in survey.local]).items():
        start, nbytes = _span(tensor)
        total += nbytes
        if covered.holds(start, nbytes):
            written_bytes, n_written = written_bytes + nbytes, n_written + 1
        elif id(tensor) in local_names or local_spans.holds(start, nbytes):
            local_bytes, n_local = local_bytes + nbytes, n_local + 1
        else:
            missing.append((name, f"{nbytes} bytes the pull did not write"))
    if missing:
        raise UnplacedTensorError("after the pull the model still holds memory that was neither pulled nor "
                                  "local by rule; refusing to serve it", tensors=missing)
    if written_bytes + local_bytes != total:  # cannot happen unless the walk above is wrong
        raise UnplacedTensorError(f"after the pull {written_bytes} written + {local_bytes} local bytes != "
                                  f"{total} bytes of model memory", tensors=[])
    return Accounting(written=written_bytes, local=local_bytes, total=total, written_tensors=n_written,
                      local_tensors=n_local)


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


# --- the walk ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Survey:
    moving: list  # (name, tensor) in walk order, each tensor object once
    local: list  # (name, tensor, reason)
    unplaced: list  # (name, why)

    def raise_unplaced(self, message: str) -> None:
        if self.unplaced:
            raise UnplacedTensorError(message, tensors=self.unplaced)


_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)
_CODE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, type)


def _survey(model: torch.nn.Module) -> _Survey:
    survey = _Survey(moving=[], local=[], unplaced=[])
    seen: set[int] = set()
    held: list = []  # (name, tensor) held by other objects: fine only inside memory that is placed
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        found: list = []  # (name, leaf, tensor)
        params = {k: v for k, v in module._parameters.items() if v is not None}
        found += [(k, k, v) for k, v in params.items()]
        found += [(k, k, v) for k, v in module._buffers.items() if v is not None]
        skip = set(module._parameters) | set(module._buffers) | {"_parameters", "_buffers", "_modules"}
        for attr, value in vars(module).items():
            if attr not in skip:
                _contents(attr, attr, value, found, held, survey.unplaced, prefix, depth=0)
        for pname, param in params.items():  # tensors post-processing hangs on parameters
            for attr, value in _vars(param).items():
                _contents(f"{pname}.{attr}", attr, value, found, held, survey.unplaced, prefix, depth=0)
        for name, leaf, tensor in found:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
            if data.device.type == "meta":
                continue
            why = _unmovable(data)
            if why:
                survey.unplaced.append((prefix + name, why))
            elif leaf in LOCAL_ONLY:
                survey.local.append((prefix + name, data, LOCAL_ONLY[leaf]))
            else:
                survey.moving.append((prefix + name, data))
    placed = _Spans(_span(t) for _, t in survey.moving)
    placed.extend(_span(t) for _, t, _ in survey.local)
    for name, tensor in held:
        if id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        if _unmovable(tensor) or not placed.holds(*_span(tensor)):
            survey.unplaced.append((name, "held by an object other than a module or parameter, outside any "
                                          "tensor that moves"))
    return survey


def _contents(name: str, leaf: str, value, found: list, held: list, unplaced: list, prefix: str, *,
              depth: int) -> None:
    """Place the tensors in one attribute value: a tensor, containers of them, or tensors held by
    other objects (kept in `held` for the coverage check)."""
    if isinstance(value, torch.Tensor):
        found.append((name, leaf, value))
    elif isinstance(value, _SCALARS) or isinstance(value, _CODE):
        return
    elif isinstance(value, (list, tuple, dict)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if not isinstance(item, (torch.Tensor, list, tuple, dict)):
                if not isinstance(item, (_SCALARS, _CODE)):
                    _held_by(f"{prefix}{name}.{key}", item, held, depth=1)
                continue
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                if _has_tensor(item):
                    unplaced.append((f"{prefix}{name}[{key!r}]", f"under a dict key of type {type(key).__name__}, "
                                                                 "which has no stable name"))
            elif depth >= MAX_NESTING:
                if _has_tensor(item):
                    unplaced.append((f"{prefix}{name}.{key}", f"containers nested deeper than {MAX_NESTING}"))
            else:
                _contents(f"{name}.{key}", leaf, item, found, held, unplaced, prefix, depth=depth + 1)
    else:
        _held_by(prefix + name, value, held, depth=1)


def _held_by(name: str, obj, held: list, *, depth: int) -> None:
    """Tensors another object holds (a module not registered as a child, a quant method, a helper),
    two attribute levels deep. Objects of a PROCESS_STATE class are not the model's."""
    if type(obj).__name__ in PROCESS_STATE:
        return
    if isinstance(obj, torch.nn.Module):
        held.extend((f"{name}.{n}", t) for n, t in obj.state_dict(keep_vars=True).items()
                    if isinstance(t, torch.Tensor))
        return
    for attr, value in _vars(obj).items():
        if isinstance(value, torch.Tensor):
            held.append((f"{name}.{attr}", value))
        elif isinstance(value, (list, tuple, dict)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            held.extend((f"{name}.{attr}.{k}", t) for k, t in items if isinstance(t, torch.Tensor))
        elif depth < 2 and not isinstance(value, (_SCALARS, _CODE)):
            _held_by(f"{name}.{attr}", value, held, depth=depth + 1)


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_has_tensor(v) for v in value)


def _vars(obj) -> dict:
    try:
        return vars(obj)
    except TypeError:  # no __dict__ (a tensor subclass, a slotted object)
        return {}


def _unmovable(t: torch.Tensor) -> str:
    """Why `t` cannot move as bytes, or ""."""
    if t.layout != torch.strided:
        return f"{t.layout} layout has no flat bytes to move"
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return f"a {type(t).__name__} without plain storage"
    return ""


def _distinct(walk: list) -> dict[str, torch.Tensor]:
    """The walk's tensors, one per distinct piece of memory, in walk order (see collect_tensors)."""
    spans = _Spans(())
    out: dict[str, torch.Tensor] = {}
    order = {name: i for i, (name, _) in enumerate(walk)}
    # Biggest first, contiguous before strided, then walk order: a base tensor
    # is met before its views, and a parameter before its transposed copy.
    for name, tensor in sorted(walk, key=lambda it: (-_span(it[1])[1], not it[1].is_contiguous(), order[it[0]])):
        start, nbytes = _span(tensor)
        if nbytes and spans.holds(start, nbytes):
            continue
        if nbytes:
            spans.extend([(start, nbytes)])
        out[name] = tensor if tensor.is_contiguous() else _span_view(tensor)
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


class _Spans:
    """A union of byte ranges; `holds(start, n)` says whether [start, start + n) lies inside it."""

    def __init__(self, spans) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._merged: list[tuple[int, int]] | None = None
        self.extend(spans)

    def extend(self, spans) -> None:
        self._ranges.extend((start, start + n) for start, n in spans if n)
        self._merged = None

    def holds(self, start: int, nbytes: int) -> bool:
        if self._merged is None:
            self._merged = []
            for s, e in sorted(self._ranges):
                if self._merged and s <= self._merged[-1][1]:
                    self._merged[-1] = (self._merged[-1][0], max(self._merged[-1][1], e))
                else:
                    self._merged.append((s, e))
        i = bisect.bisect_right(self._merged, (start, float("inf"))) - 1
        return i >= 0 and self._merged[i][0] <= start and start + nbytes <= self._merged[i][1]


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
