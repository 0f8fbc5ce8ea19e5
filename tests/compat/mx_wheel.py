"""The modelexpress 0.7.0 wheel's OWN generated p2p_pb2, loaded without its package.

Importing `modelexpress` runs its `__init__` (torch and more); the two generated
files load on their own from a private package in a temporary directory. The
wheel's p2p_pb2 registers "p2p.proto" in protobuf's default pool, as ours does,
so callers run in a process of their own (tests/compat/mx_descriptor.py, mx_parse.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import pathlib
import shutil
import sys
import tempfile
from typing import Iterator


class NotInstalled(Exception):
    pass


@contextlib.contextmanager
def wheel_p2p(*, with_grpc: bool = False) -> Iterator[object]:
    """Yields the wheel's p2p_pb2 module (its p2p_pb2_grpc imported too with `with_grpc`)."""
    spec = importlib.util.find_spec("modelexpress")
    if spec is None or not spec.submodule_search_locations:
        raise NotInstalled("modelexpress is not installed")
    src = pathlib.Path(list(spec.submodule_search_locations)[0])
    with tempfile.TemporaryDirectory() as tmp:
        pkg = pathlib.Path(tmp) / "mx_wheel_proto"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for name in ("p2p_pb2.py", "p2p_pb2_grpc.py") if with_grpc else ("p2p_pb2.py",):
            shutil.copy(src / name, pkg / name)
        sys.path.insert(0, tmp)
        try:
            module = importlib.import_module("mx_wheel_proto.p2p_pb2")
            if with_grpc:
                importlib.import_module("mx_wheel_proto.p2p_pb2_grpc")  # it must load too
            yield module
        finally:
            sys.path.remove(tmp)
