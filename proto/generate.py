"""Generate the Python stubs for proto/segmentation.proto into service/proto (`make proto`).

grpc_tools writes `import segmentation_pb2` in the gRPC stub, which only works with the output
folder on sys.path; it is rewritten to a relative import so the stubs work as
`service.proto.segmentation_pb2`. tests/test_proto_sync.py runs this into a temporary folder
and compares with the committed stubs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "segmentation.proto"
OUT = ROOT / "service" / "proto"
STUBS = ("segmentation_pb2.py", "segmentation_pb2.pyi", "segmentation_pb2_grpc.py")


def generate(out: Path = OUT) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO.parent}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    grpc_stub = out / "segmentation_pb2_grpc.py"
    text = re.sub(
        r"^import segmentation_pb2 as", "from . import segmentation_pb2 as", grpc_stub.read_text(), flags=re.MULTILINE
    )
    grpc_stub.write_text(text)
    init = out / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs for proto/segmentation.proto (make proto); do not edit."""\n')
    return [out / name for name in STUBS]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
