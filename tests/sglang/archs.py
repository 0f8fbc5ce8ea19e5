"""The architecture conformance suite's helpers: tiny checkpoints of each architecture and the
byte-for-byte comparison of two models' tensors (dumps written by scripts/sglang_cpu/mx_dump.py)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import torch

from sglang_mx.sglang.launch import sglang_env


def variant(name: str) -> tuple[str, str]:
    """"llama" -> ("llama", ""); "qwen2+fp8_block" -> ("qwen2", "fp8_block") (a quantized checkpoint)."""
    arch, _, quant = name.partition("+")
    return arch, quant


def make_checkpoints(root: pathlib.Path, wanted) -> dict[tuple[str, int], pathlib.Path]:
    """Tiny random checkpoints (scripts/sglang_cpu/make_tiny_model.py), one per (name, seed) in `wanted`
    (`variant` names), written by one process (torch and transformers imported once). Two seeds differ in
    every tensor."""
    out = {(name, seed): root / f"{name}-{seed}" for name, seed in wanted}
    jobs = []
    for (name, seed), path in out.items():
        arch, quant = variant(name)
        jobs.append([str(path), "--arch", arch, "--seed", str(seed), *(["--quant", quant] if quant else [])])
    code = ("import json, sys, make_tiny_model\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    sys.argv = ['make_tiny_model.py', *args]\n"
            "    make_tiny_model.main()\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], env=sglang_env(), capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"make_tiny_model failed:\n{proc.stderr[-3000:]}")
    return out


def checkpoint_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def differences(seed: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> list[str]:
    """Every name whose tensor is missing on one side or differs in dtype, shape or any byte."""
    out = []
    for name in sorted(set(seed) | set(target)):
        if name not in target:
            out.append(f"{name}: only in the seed")
        elif name not in seed:
            out.append(f"{name}: only in the target")
        else:
            a, b = seed[name], target[name]
            if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
                out.append(f"{name}: seed {a.dtype} {tuple(a.shape)}, target {b.dtype} {tuple(b.shape)}")
            elif not torch.equal(as_bytes(a), as_bytes(b)):
                out.append(f"{name}: bytes differ")
    return out


def load_dumps(directory: pathlib.Path) -> dict[int, dict[str, torch.Tensor]]:
    """rank -> name -> tensor, from an SGLang instance started with SGLANG_MX_TEST_DUMP=directory."""
    return {int(p.stem.removeprefix("rank")): torch.load(p, weights_only=True)
            for p in sorted(directory.glob("rank*.pt"))}
