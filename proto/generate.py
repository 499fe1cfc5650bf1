"""Generate the Python stubs for proto/segmentation.proto and proto/inference.proto into service/proto
(`make proto`).

grpc_tools writes `import segmentation_pb2` in the gRPC stub, which only works with the output
folder on sys.path; it is rewritten to a relative import so the stubs work as
`service.proto.segmentation_pb2`.

The v2 messages (package `inference`) have the same full names as those tritonclient registers in
protobuf's default descriptor pool; two files defining one name in one pool fail at import. So
inference_pb2 is built in a pool of its own (`POOL`), and a process may import both the service's
stubs and tritonclient. tests/test_proto_sync.py runs this into a temporary folder and compares with
the committed stubs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = (ROOT / "proto" / "segmentation.proto", ROOT / "proto" / "inference.proto")
PRIVATE_POOL = {"inference"}  # stubs whose descriptors live in their own pool, not the default one
OUT = ROOT / "service" / "proto"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "POOL = _descriptor_pool.DescriptorPool()  # its own pool: tritonclient defines the same names\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def stub_names(proto: Path) -> list[str]:
    return [f"{proto.stem}_pb2.py", f"{proto.stem}_pb2.pyi", f"{proto.stem}_pb2_grpc.py"]


def generate(out: Path = OUT) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{proto.parent}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = proto.stem
        grpc_stub = out / f"{stem}_pb2_grpc.py"
        text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", grpc_stub.read_text(), flags=re.M)
        grpc_stub.write_text(text)
        if stem in PRIVATE_POOL:
            messages = out / f"{stem}_pb2.py"
            text = messages.read_text()
            if DEFAULT_POOL not in text:
                raise RuntimeError(f"{messages.name}: protoc's output changed; update the pool rewrite")
            messages.write_text(text.replace(DEFAULT_POOL, OWN_POOL))
        written += [out / name for name in stub_names(proto)]
    init = out / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs for proto/*.proto (make proto); do not edit."""\n')
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
