"""mx_source_id, the hash that keys a source on the metadata server, and how an identity reads.

Which identity an SGLang rank publishes under and asks for is decided in
sglang_mx.layout (`identity_for`); this module holds only the wire's rule, which
the metadata server shares.

The rule is ModelExpress's, so ids agree with a real ModelExpress server: SHA-256
over a compact JSON object with sorted keys, first 16 lowercase hex characters.

Non-ASCII text is hashed as raw UTF-8 (what ModelExpress's Rust server does),
not as \\uXXXX escapes (what its Python client does). The server computes the id
it stores and returns, so agreeing with the Rust server is what keeps a mixed
fleet pairing up.
"""

from __future__ import annotations

import hashlib
import json

from sglang_mx.records import SourceIdentity

_OPTIONAL_FIELDS = (
    "backend_framework_version",
    "torch_version",
    "cuda_version",
    "triton_version",
    "gpu_arch",
    "compile_config_digest",
)


def mx_source_id(identity: SourceIdentity) -> str:
    """Return the 16-hex-character id of `identity`."""
    payload = json.dumps(
        canonical_identity(identity), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def canonical_identity(identity: SourceIdentity) -> dict[str, object]:
    """The JSON object that `mx_source_id` hashes."""
    extra: dict[str, str] = {}
    for key in sorted(identity.extra_parameters):
        # After lowercasing two keys may collide: the first in sorted order wins.
        extra.setdefault(key.lower(), identity.extra_parameters[key].lower())
    canonical: dict[str, object] = {
        "mx_version": identity.mx_version.lower(),
        "mx_source_type": int(identity.mx_source_type),
        "model_name": identity.model_name.lower(),
        "backend_framework": int(identity.backend_framework),
        "tensor_parallel_size": int(identity.tensor_parallel_size),
        "pipeline_parallel_size": int(identity.pipeline_parallel_size),
        "expert_parallel_size": int(identity.expert_parallel_size),
        "dtype": identity.dtype.lower(),
        "quantization": identity.quantization.lower(),
        "revision": identity.revision.lower(),
        "extra_parameters": extra,
    }
    for name in _OPTIONAL_FIELDS:
        value = getattr(identity, name)
        if value:
            canonical[name] = value.lower()
    return canonical


def describe_identity(identity: SourceIdentity) -> str:
    """A one-line summary for error messages: what a seed must match."""
    parts = [
        repr(identity.model_name),
        f"TP {identity.tensor_parallel_size} PP {identity.pipeline_parallel_size} EP {identity.expert_parallel_size}",
        f"dtype {identity.dtype or '-'}",
    ]
    if identity.quantization:
        parts.append(f"quantization {identity.quantization}")
    if identity.revision:
        parts.append(f"revision {identity.revision}")
    if identity.backend_framework_version:
        parts.append(f"{identity.backend_framework.name.lower()} {identity.backend_framework_version}")
    for field in ("torch_version", "cuda_version", "gpu_arch"):
        if getattr(identity, field):
            parts.append(f"{field} {getattr(identity, field)}")
    parts += [f"{k}={v}" for k, v in sorted(identity.extra_parameters.items())]
    return ", ".join(parts)
