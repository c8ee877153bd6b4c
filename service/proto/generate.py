"""Generate the gRPC stubs from open_inference_grpc.proto: `python -m service.proto.generate [ROOT]`.

protoc runs with the repository root as its include path, so the generated
modules import each other as `service.proto.…`. ROOT (default: this
repository) is where `service/proto/` is written: the stub test points it at
a temp dir holding a copy of the .proto and compares the result with the
committed files. Needs grpcio-tools (requirements/dev.txt), which the image
does not carry: the stubs are committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = Path("service") / "proto" / "open_inference_grpc.proto"
GENERATED = tuple(PROTO.with_name(PROTO.stem + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
REPO = Path(__file__).resolve().parents[2]


def generate(root: Path = REPO) -> list[Path]:
    """Run protoc on root/PROTO; the generated files' paths."""
    from grpc_tools import protoc  # dev-only dependency

    args = ["protoc", f"-I{root}", f"--python_out={root}", f"--pyi_out={root}", f"--grpc_python_out={root}"]
    if protoc.main([*args, str(root / PROTO)]) != 0:
        raise RuntimeError(f"protoc failed on {root / PROTO}")
    return [root / p for p in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO):
        print(path)
