"""Regenerate the Python stubs of the wire contract: `python -m proto.generate`.

protoc names generated modules after the proto path below its include root, so the stubs of
`dyspec/v1/target.proto` import their siblings as `from dyspec.v1 import ...`, which would resolve to
this project's `dyspec` algorithm package. The proto root stays `proto/` (the package is `dyspec.v1`,
as other languages and buf expect), and the imports are rewritten to `proto.dyspec.v1` afterwards.
tests/test_proto_fresh.py regenerates into a temporary folder and fails when the committed stubs differ.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = "dyspec/v1"  # proto package dyspec.v1, below PROTO_ROOT
_SIBLING_IMPORT = re.compile(r"^from dyspec\.v1 import ", re.MULTILINE)


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under dyspec/v1 into
    out_root/dyspec/v1 (imports fixed); returns the written files, sorted."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = sorted((out_root / PACKAGE_DIR).glob("*_pb2*.py*"))
    for path in written:
        path.write_text(_SIBLING_IMPORT.sub("from proto.dyspec.v1 import ", path.read_text()))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proto.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/, in place)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
