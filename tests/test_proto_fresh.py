"""The committed Python stubs are exactly what `python -m proto.generate` makes from the .proto files."""
from pathlib import Path

from proto.generate import PACKAGE_DIR, PROTO_ROOT, generate


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path):
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    committed = {p.name: p.read_text() for p in (PROTO_ROOT / PACKAGE_DIR).glob("*_pb2*.py*")}
    assert fresh, "no stubs were generated"
    assert sorted(committed) == sorted(fresh), "stub files missing or extra: run `python -m proto.generate`"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"stale stubs {stale}: run `python -m proto.generate`"


def test_stubs_import_as_a_package_and_not_the_algorithm_package():
    from proto.dyspec.v1 import generation_pb2_grpc, target_pb2, target_pb2_grpc

    assert target_pb2.DESCRIPTOR.package == "dyspec.v1"
    assert target_pb2.DESCRIPTOR.name == "dyspec/v1/target.proto"
    assert hasattr(target_pb2_grpc, "TargetVerificationStub")
    assert hasattr(generation_pb2_grpc, "DraftWorkerStub") and hasattr(generation_pb2_grpc, "GenerationStub")
