"""The committed Python modules are what `python -m protos.generate` makes from the .proto files,
and the API documents every field (the .proto is the reference clients in other languages read)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from protos import generate


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("protos-out")
    generate.generate(out)
    return out


@pytest.mark.parametrize(
    "relative",
    [name for proto in generate.PROTO_FILES for name in generate.generated_names(proto)],
)
def test_generated_modules_are_current(regenerated, relative):
    committed = generate.REPO_ROOT / relative
    assert committed.is_file(), f"{relative} is missing; run `python -m protos.generate`"
    assert (regenerated / relative).read_bytes() == committed.read_bytes(), (
        f"{relative} is stale; run `python -m protos.generate` and commit the result"
    )


def test_generated_imports_are_package_absolute():
    """`-I <repo root>` makes the grpc module import its messages as a package, not a top-level name."""
    grpc_module = (generate.REPO_ROOT / "protos/retroserve/v1/retroserve_pb2_grpc.py").read_text()
    assert "from protos.retroserve.v1 import retroserve_pb2" in grpc_module


def _source_info(proto_file: str):
    """FileDescriptorProto with comments, straight from protoc."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        status = protoc.main([
            "grpc_tools.protoc",
            f"-I{generate.REPO_ROOT}",
            f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            str(generate.REPO_ROOT / proto_file),
        ])
        assert status == 0
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return descriptor_set.file[0]


@pytest.mark.parametrize("proto_file", generate.PROTO_FILES)
def test_every_field_enum_value_and_rpc_has_a_comment(proto_file):
    file_proto = _source_info(proto_file)
    commented = {
        tuple(location.path)
        for location in file_proto.source_code_info.location
        if location.leading_comments.strip() or location.trailing_comments.strip()
    }
    missing = []
    # Descriptor paths: 4 = message_type, 2 = field; 5 = enum_type, 2 = value; 6 = service, 2 = method.
    for m, message in enumerate(file_proto.message_type):
        for f, field in enumerate(message.field):
            if (4, m, 2, f) not in commented:
                missing.append(f"{message.name}.{field.name}")
    for e, enum in enumerate(file_proto.enum_type):
        for v, value in enumerate(enum.value):
            if (5, e, 2, v) not in commented:
                missing.append(f"{enum.name}.{value.name}")
    for s, service in enumerate(file_proto.service):
        for r, method in enumerate(service.method):
            if (6, s, 2, r) not in commented:
                missing.append(f"{service.name}.{method.name}")
    assert not missing, f"undocumented in {proto_file}: {missing}"
