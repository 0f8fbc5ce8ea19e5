"""Describe torch tensors as TensorDescriptors (names, addresses, byte sizes)."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from sglang_mx.errors import MxError
from sglang_mx.records import PieceDigest, ShardSpec, TensorDescriptor


def describe(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    digests: Mapping[str, str] | None = None,
    shards: Mapping[str, ShardSpec] | None = None,
    pieces: Mapping[str, tuple[PieceDigest, ...]] | None = None,
    origins: Mapping[str, str] | None = None,
    chunks: Mapping[str, tuple[int, tuple[str, ...]]] | None = None,
) -> list[TensorDescriptor]:
    """One descriptor per named tensor, in the given order, with its digest (and where that came
    from: `origins`), split facts, piece digests and chunk digests (name -> (chunk_bytes,
    digests), sglang_mx.chunks) where given.

    Tensors must be contiguous: a strided view's bytes are not one range.
    Aliases (tied weights) keep their own names and share an address.
    """
    digests, shards, pieces, origins = digests or {}, shards or {}, pieces or {}, origins or {}
    chunks = chunks or {}
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    out = []
    for name, t in items:
        if not t.is_contiguous():
            raise MxError(
                f"tensor {name!r} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                "only contiguous tensors can be transferred as one byte range"
            )
        size = t.numel() * t.element_size()
        out.append(
            TensorDescriptor(
                name=name,
                addr=t.data_ptr() if size else 0,
                size=size,
                dtype=str(t.dtype).removeprefix("torch."),
                device_id=t.device.index or 0,
                digest=digests.get(name, ""),
                digest_origin=origins.get(name, "") if digests.get(name) else "",
                shard=shards.get(name),
                pieces=pieces.get(name, ()),
                chunk_bytes=chunks[name][0] if name in chunks else 0,
                chunks=chunks[name][1] if name in chunks else (),
            )
        )
    return out
