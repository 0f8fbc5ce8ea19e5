"""Print the modelexpress wheel's p2p.proto FileDescriptorProto, base64-encoded, on stdout.

Run in a process of its own: the wheel's p2p_pb2 registers "p2p.proto" (package
model_express.p2p) in protobuf's default pool, as ours does, so the two cannot
share a process. The two generated files are copied into a private package so
that modelexpress/__init__ (which imports torch and more) never runs.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import pathlib
import shutil
import sys
import tempfile


def main() -> int:
    spec = importlib.util.find_spec("modelexpress")
    if spec is None or not spec.submodule_search_locations:
        print("modelexpress is not installed", file=sys.stderr)
        return 3
    src = pathlib.Path(list(spec.submodule_search_locations)[0])
    with tempfile.TemporaryDirectory() as tmp:
        pkg = pathlib.Path(tmp) / "mx_wheel_proto"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for name in ("p2p_pb2.py", "p2p_pb2_grpc.py"):
            shutil.copy(src / name, pkg / name)
        sys.path.insert(0, tmp)
        p2p_pb2 = importlib.import_module("mx_wheel_proto.p2p_pb2")
        importlib.import_module("mx_wheel_proto.p2p_pb2_grpc")  # it must load too
        from google.protobuf import descriptor_pb2

        proto = descriptor_pb2.FileDescriptorProto()
        p2p_pb2.DESCRIPTOR.CopyToProto(proto)
        print(base64.b64encode(proto.SerializeToString()).decode("ascii"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
