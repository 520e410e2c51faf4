"""Regenerate serving/proto/vtfuse_pb2*.py from vtfuse.proto with grpcio-tools (committed output)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "serving/proto/vtfuse.proto"


def generate(out_dir: Path = ROOT) -> int:
    """Run protoc from grpcio-tools; outputs land at <out_dir>/serving/proto/vtfuse_pb2{,_grpc}.py(i)."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / PROTO),
        ]
    )
    stub = out_dir / "serving" / "proto" / "vtfuse_pb2.pyi"
    if code == 0 and stub.exists():  # generated: not linted
        stub.write_text("# ruff: noqa\n" + stub.read_text())
    return code


if __name__ == "__main__":
    sys.exit(generate())
