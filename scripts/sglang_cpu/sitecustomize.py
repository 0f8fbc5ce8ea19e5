"""Test-environment workarounds for running SGLang 0.5.23 on a CPU-only machine.

Not part of sglang_mx: put this directory on PYTHONPATH for SGLang processes
(tests, the demo and the benchmark do), and Python loads it in every process,
including the schedulers SGLang spawns. It does two things, lazily, on import:

1. PyPI's torchvision 0.28.0 is a CUDA build whose ops do not load beside the
   CPU torch; its import then fails on the missing schemas of
   `torchvision::nms` and `torchvision::qnms`. Declare them first.
2. SGLang's rotary embedding takes a vLLM kernel unless
   `sglang.srt.layers.rotary_embedding.base._is_cpu` is True; set it.
3. Final-logit soft-capping (Gemma 2) takes a Triton kernel, which has no CPU
   driver, unless `sglang.srt.layers.logits_processor._is_cpu` is True (the
   flag gates only the soft-capping paths there); set it.

With `SGLANG_MX_TEST_DUMP=DIR` set it also installs the conformance tests'
tensor dump (`mx_dump.py`, test-only): every rank writes every tensor of its
model to DIR once its load is done.
"""

import importlib.abc
import os
import sys

_ROPE_MODULE = "sglang.srt.layers.rotary_embedding.base"
_LOGITS_MODULE = "sglang.srt.layers.logits_processor"
_RUNNER_MODULE = "sglang.srt.model_executor.model_runner"
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
        if fullname in (_ROPE_MODULE, _LOGITS_MODULE):
            after = _set_cpu_flag
        elif fullname == _RUNNER_MODULE and os.environ.get("SGLANG_MX_TEST_DUMP"):
            import mx_dump

            after = mx_dump.install
        else:
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
            after(module)

        spec.loader.exec_module = exec_module
        return spec


def _set_cpu_flag(module) -> None:
    module._is_cpu = True


sys.meta_path.insert(0, _CpuWorkarounds())
