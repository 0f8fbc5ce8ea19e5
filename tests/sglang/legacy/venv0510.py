"""A separate virtual environment with the real SGLang 0.5.10, built once and reused.

SGLang is installed with --no-deps (its declared dependencies are GPU-sized),
then the subset that importing its argument parser and loader module needs on
CPU, pinned as 0.5.10 declares them where it pins; torch is the CPU 2.13.0 from
the local wheel store (0.5.10 declares 2.9.1, which is a CUDA build). Mooncake's
non-CUDA build lets SGLang keep a modelexpress load format (without it, 0.5.10
falls back to loading from disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import pathlib
import shutil
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
VENV = ROOT / ".venv-sglang-0510"
PYTHON = VENV / "bin" / "python"
SITE = VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
CPU_ENV = ROOT / "scripts" / "sglang_cpu"  # the torchvision-on-CPU-torch workaround

CONSTRAINTS = ["torch==2.13.0", "torchvision==0.28.0", "transformers==5.3.0", "openai==2.6.1"]
DEPENDENCIES = [
    "torch==2.13.0", "torchvision==0.28.0", "triton", "transformers==5.3.0", "openai==2.6.1",
    "numpy", "tqdm", "pybase64", "requests", "IPython", "pydantic", "aiohttp", "safetensors", "orjson",
    "packaging", "pillow", "starlette", "partial_json_parser", "huggingface_hub", "pyzmq", "dill",
    "sentencepiece", "compressed-tensors", "gguf", "psutil",
]
NO_DEPS = ["sglang==0.5.10", "mooncake-transfer-engine-non-cuda==0.3.13.post1"]
_STAMP = VENV / ".sglang-mx-ready"


def _spec() -> str:
    return hashlib.sha256(repr((CONSTRAINTS, DEPENDENCIES, NO_DEPS, sys.version)).encode()).hexdigest()[:16]


class PyPIUnreachable(Exception):
    pass


def ensure() -> pathlib.Path:
    """The venv's python, building the venv when missing or out of date (about 3 minutes)."""
    with _locked():
        if _STAMP.is_file() and _STAMP.read_text() == _spec():
            return PYTHON
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        constraints = VENV / "constraints.txt"
        constraints.write_text("\n".join(CONSTRAINTS) + "\n")
        pip = [str(PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraints)]
        _pip(pip + DEPENDENCIES)
        _pip(pip + ["--no-deps"] + NO_DEPS)
        _STAMP.write_text(_spec())
        return PYTHON


def _pip(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        if not _pypi_reachable():
            raise PyPIUnreachable(f"PyPI (pypi.org:443) is unreachable: cannot install SGLang 0.5.10 "
                                  f"into {VENV}")
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _locked():
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.with_name(VENV.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
