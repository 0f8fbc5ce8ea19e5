"""Regenerate sglang_mx/_proto from proto/p2p.proto.

Run `python proto/generate.py` after editing the .proto, with grpcio-tools==1.71.*:
the code it writes then asks only for protobuf>=5.29 and grpcio>=1.71 at run time,
which keeps us installable beside SGLang and ModelExpress.
tests/test_wire.py fails while the committed code is out of date.
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "sglang_mx" / "_proto"


def main() -> int:
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={OUT_DIR}",
            f"--grpc_python_out={OUT_DIR}",
            str(PROTO_DIR / "p2p.proto"),
        ]
    )
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    # protoc writes an absolute import; the generated modules live in a package.
    grpc_file = OUT_DIR / "p2p_pb2_grpc.py"
    text = re.sub(r"^import p2p_pb2 as", "from . import p2p_pb2 as", grpc_file.read_text(), flags=re.M)
    grpc_file.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
