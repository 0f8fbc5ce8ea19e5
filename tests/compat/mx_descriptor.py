"""Print the modelexpress wheel's p2p.proto FileDescriptorProto, base64-encoded, on stdout.

Run in a process of its own: the wheel's p2p_pb2 registers "p2p.proto" (package
model_express.p2p) in protobuf's default pool, as ours does, so the two cannot
share a process. The two generated files are copied into a private package so
that modelexpress/__init__ (which imports torch and more) never runs.
"""

from __future__ import annotations

import base64
import sys

from google.protobuf import descriptor_pb2
from mx_wheel import NotInstalled, wheel_p2p  # this directory is on sys.path: run as a script


def main() -> int:
    try:
        with wheel_p2p(with_grpc=True) as p2p_pb2:
            proto = descriptor_pb2.FileDescriptorProto()
            p2p_pb2.DESCRIPTOR.CopyToProto(proto)
    except NotInstalled as e:
        print(e, file=sys.stderr)
        return 3
    print(base64.b64encode(proto.SerializeToString()).decode("ascii"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
