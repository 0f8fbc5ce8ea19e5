"""Test-only: every rank of an SGLang process writes every tensor of its model to a file.

Installed by sitecustomize.py when `SGLANG_MX_TEST_DUMP=DIR` is set: right after
`ModelRunner.load_model` (a disk load with its post-processing, or a target's
dummy build and pull) rank R writes `DIR/rank{R}.pt`, a dict name -> a CPU copy of
each tensor. The walk is our own and independent of `sglang_mx.model_tensors` on
purpose (no local-only rule, no dedup): the architecture conformance tests compare
a seed's dump with a target's, so whatever the product's walk misses shows here.

Named: parameters and buffers (`named_parameters`/`named_buffers` without
dedup), every tensor attribute of a module or of a parameter, and tensors in
lists, tuples and dicts held by them (any depth).
"""

from __future__ import annotations

import os
import pathlib


def model_tensors(model) -> dict:
    import torch

    out = {}

    def add(name, value, depth=0):
        if isinstance(value, torch.Tensor):
            if value.device.type != "meta":
                out.setdefault(name, value.detach())
        elif isinstance(value, (list, tuple)) and depth < 8:
            for i, item in enumerate(value):
                add(f"{name}.{i}", item, depth + 1)
        elif isinstance(value, dict) and depth < 8:
            for key, item in value.items():
                add(f"{name}.{key}", item, depth + 1)

    for name, p in model.named_parameters(remove_duplicate=False):
        add(name, p)
    for name, b in model.named_buffers(remove_duplicate=False):
        add(name, b)
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, value in vars(module).items():
            if attr not in ("_parameters", "_buffers", "_modules"):
                add(prefix + attr, value)
        for pname, p in module._parameters.items():
            try:
                attrs = vars(p) if p is not None else {}
            except TypeError:
                attrs = {}
            for attr, value in attrs.items():
                add(f"{prefix}{pname}.{attr}", value)
    return out


def install(runner_module) -> None:
    import torch
    from sglang.srt.runtime_context import get_parallel

    cls = runner_module.ModelRunner
    load_model = cls.load_model

    def load_and_dump(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        model = getattr(self, "model", None)
        if model is not None and not getattr(self, "is_draft_worker", False):
            out = pathlib.Path(os.environ["SGLANG_MX_TEST_DUMP"])
            out.mkdir(parents=True, exist_ok=True)
            tensors = {name: t.cpu().clone() for name, t in model_tensors(model).items()}
            torch.save(tensors, out / f"rank{get_parallel().tp_rank}.pt")
        return result

    cls.load_model = load_and_dump
