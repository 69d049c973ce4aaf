"""Regenerate the Python modules of the .proto files: `python scripts/generate_protos.py`.

`protos/` is the proto root (as for buf, grpcurl and other-language clients: `-I protos`), so
`protos/retroserve/v1/retroserve.proto` is `retroserve/v1/retroserve.proto`, its module is
`protos/retroserve/v1/retroserve_pb2.py` and imports read `from retroserve.v1 import
retroserve_pb2` (pyproject maps the Python package `retroserve` to `protos/retroserve`). The
generated modules (`_pb2.py`, `_pb2_grpc.py` and `.pyi` stubs) are committed;
tests/test_protos.py regenerates them into a temporary directory and fails if they differ, so an
edited .proto cannot ship with stale stubs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PROTO_FILES = ("retroserve/v1/retroserve.proto", "retroserve/v1/admin.proto", "retroserve/v1/retriever.proto")
"""Paths relative to the proto root; keep in step with the .proto files on disk."""


def generated_names(proto_file: str) -> list[str]:
    """Files protoc writes for one .proto (relative to the output root, as to the proto root)."""
    stem = proto_file.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(output_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on PROTO_FILES, writing under `output_root`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    written = []
    for proto_file in PROTO_FILES:
        status = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={output_root}",
            f"--pyi_out={output_root}",
            f"--grpc_python_out={output_root}",
            str(PROTO_ROOT / proto_file),
        ])
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto_file} with exit status {status}")
        written.extend(output_root / name for name in generated_names(proto_file))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/generate_protos.py", description=__doc__.splitlines()[0])
    parser.add_argument("--output-root", type=Path, default=PROTO_ROOT,
                        help="write the modules under this directory instead of protos/")
    args = parser.parse_args(argv)
    for path in generate(args.output_root):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
