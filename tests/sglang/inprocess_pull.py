"""The in-process conformance check of architectures (run by test_architectures.py in a
subprocess with SGLang's CPU environment; prints one JSON line per architecture).

    python tests/sglang/inprocess_pull.py NAME CHECKPOINT_A CHECKPOINT_B DTYPE [NAME A B DTYPE ...]

SGLang's own loader builds three models in this process (scripts/sglang_cpu/build_model.py):
the seed from checkpoint A, the target from checkpoint B (so a tensor the pull misses keeps
B's values and shows), and a dummy build, which is what a real target pulls into. The
product's walk (`collect_tensors`) must give the same names and sizes on all three; its
tensors are copied byte for byte from the seed into the target (what the Mooncake pull
does), `account` must prove every byte of the target written or local by rule, and then
every parameter, buffer and tensor attribute of the target, found by the dump's own walk,
must equal the seed's.
"""

import json
import sys
import traceback

import build_model
import mx_dump
import torch

from sglang_mx.errors import UnplacedTensorError
from sglang_mx.model_tensors import account, collect_tensors, layout_fingerprint, refresh_derived
from tests.sglang.archs import as_bytes, differences


def check(a: str, b: str, dtype: str) -> dict:
    result: dict = {}
    seed = build_model.build(a, dtype=dtype)
    target = build_model.build(b, dtype=dtype)
    dummy = build_model.build(b, load_format="dummy", dtype=dtype)
    result["model_class"] = type(seed).__name__
    try:
        src, dst, blank = collect_tensors(seed), collect_tensors(target), collect_tensors(dummy)
    except UnplacedTensorError as e:
        result["refused"] = str(e)
        return result
    layout = [(n, t.nbytes) for n, t in src.items()]
    result["same_layout"] = layout == [(n, t.nbytes) for n, t in dst.items()] == [
        (n, t.nbytes) for n, t in blank.items()]
    result["same_fingerprint"] = layout_fingerprint(seed) == layout_fingerprint(target) == layout_fingerprint(dummy)
    with torch.no_grad():
        for name, tensor in dst.items():
            tensor.reshape(-1).view(torch.uint8).copy_(as_bytes(src[name]))  # all contiguous (span views)
    refresh_derived(target)
    tally = account(target, dst)
    result.update(collected=len(src), collected_bytes=sum(t.nbytes for t in src.values()),
                  written=tally.written, local=tally.local, total=tally.total)
    seen, held = mx_dump.model_tensors(seed), mx_dump.model_tensors(target)
    result["tensors"] = len(held)
    result["differences"] = differences(seen, held)
    # Python values post-processing derived from weight values (e.g. k_scale_float) must match too.
    result["scalars"] = [name for name, value in derived_scalars(seed).items()
                         if derived_scalars(target).get(name) != value]
    return result


def derived_scalars(model) -> dict:
    """module path.attr -> every float attribute whose name ends in _float (the derived KV scales)."""
    return {f"{name}.{attr}": value for name, module in model.named_modules() for attr, value in vars(module).items()
            if attr.endswith("_float") and isinstance(value, float)}


def main(args: list[str]) -> None:
    for name, a, b, dtype in zip(args[0::4], args[1::4], args[2::4], args[3::4]):
        try:
            result = check(a, b, dtype)
        except Exception:  # noqa: BLE001  one architecture's failure is reported, the others still run
            result = {"error": traceback.format_exc()[-3000:]}
        print(json.dumps({"name": name, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
