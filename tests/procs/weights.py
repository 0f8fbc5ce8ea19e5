"""Deterministic test weights, rebuilt identically in any process.

Every tensor's bytes come from a generator seeded by the tensor's name, so a
seed process and the test process agree byte for byte without sharing memory.
"""

from __future__ import annotations

import zlib

import torch

DTYPES = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "i8": torch.int8,
}


def layout(size_mb: int, variant: str = "") -> dict[str, tuple[int, torch.dtype]]:
    """name -> (number of elements, dtype). About `size_mb` MiB in all."""
    big = size_mb * 1024 * 1024 // 4  # bytes per dtype block, in four blocks
    spec: dict[str, tuple[int, torch.dtype]] = {}
    for key, dtype in DTYPES.items():
        itemsize = torch.empty(0, dtype=dtype).element_size()
        spec[f"big.{key}"] = (big // itemsize - 4096 // itemsize, dtype)
    for i in range(64):  # small tensors, allocated back to back (merge candidates)
        spec[f"small.{i}.{list(DTYPES)[i % 4]}"] = (1024, DTYPES[list(DTYPES)[i % 4]])
    spec["empty.f32"] = (0, torch.float32)
    spec["embed.bf16"] = (4096, torch.bfloat16)  # lm_head.bf16 is tied to it
    if variant == "mismatch":
        del spec["small.3.i8"]
        spec["only_on_seed.f32"] = (16, torch.float32)
        n, dtype = spec["small.5.bf16"]
        spec["small.5.bf16"] = (n + 8, dtype)
    return spec


def _content(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).view(dtype)


def build(size_mb: int, variant: str = "", *, filled: bool = True) -> dict[str, torch.Tensor]:
    """The tensors; small ones share one backing buffer, lm_head aliases embed."""
    spec = layout(size_mb, variant)
    out: dict[str, torch.Tensor] = {}
    small = {n: s for n, s in spec.items() if n.startswith("small.")}
    arena = torch.zeros(sum(numel * torch.empty(0, dtype=d).element_size() for numel, d in small.values()),
                        dtype=torch.uint8)
    offset = 0
    for name, (numel, dtype) in spec.items():
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if name in small:
            t = arena[offset : offset + nbytes].view(dtype)
            offset += nbytes
        else:
            t = torch.zeros(numel, dtype=dtype)
        if filled and numel:
            t.copy_(_content(name, numel, dtype))
        out[name] = t
    out["lm_head.bf16"] = out["embed.bf16"]
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)
