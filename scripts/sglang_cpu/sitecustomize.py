"""Test-environment workarounds for running SGLang 0.5.23 on a CPU-only machine.

Not part of sglang_mx: put this directory on PYTHONPATH for SGLang processes
(tests, the demo and the benchmark do), and Python loads it in every process,
including the schedulers SGLang spawns. It does two things, lazily, on import:

1. PyPI's torchvision 0.28.0 is a CUDA build whose ops do not load beside the
   CPU torch; its import then fails on the missing schemas of
   `torchvision::nms` and `torchvision::qnms`. Declare them first.
2. SGLang's rotary embedding takes a vLLM kernel unless
   `sglang.srt.layers.rotary_embedding.base._is_cpu` is True; set it.
"""

import importlib.abc
import sys

_ROPE_MODULE = "sglang.srt.layers.rotary_embedding.base"
_keep = []  # the torch.library.Library must outlive the import


def _declare_torchvision_ops() -> None:
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # a torchvision build with working ops defined it already
            pass
    _keep.append(lib)


class _CpuWorkarounds(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._torchvision_done = False

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" and not self._torchvision_done:
            self._torchvision_done = True
            _declare_torchvision_ops()
            return None
        if fullname != _ROPE_MODULE:
            return None
        spec = next(
            (s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
             for s in [f.find_spec(fullname, path, target)] if s is not None),
            None,
        )
        if spec is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module._is_cpu = True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _CpuWorkarounds())
