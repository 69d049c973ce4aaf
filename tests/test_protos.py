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


def test_info_reports_every_limit_and_retrieval_default():
    """LimitsInfo mirrors Limits field for field; RetrievalDefaultsInfo has every request knob."""
    import dataclasses

    from protos.retroserve.v1 import retroserve_pb2 as pb
    from server.config import Limits, RetrievalDefaults
    from server.api.pb_convert import limits_to_pb, retrieval_defaults_to_pb

    limit_fields = {f.name for f in dataclasses.fields(Limits)}
    assert limit_fields == set(pb.LimitsInfo.DESCRIPTOR.fields_by_name)
    assert limits_to_pb(Limits()).max_prompt_tokens == Limits().max_prompt_tokens
    info = retrieval_defaults_to_pb(RetrievalDefaults(), ("none",))
    assert info.mode == pb.RETRIEVAL_MODE_NONE and list(info.available_modes) == [pb.RETRIEVAL_MODE_NONE]
    knobs = {f.name for f in dataclasses.fields(RetrievalDefaults)} - {"datastore_dir", "batch_window_ms", "cache_size"}
    assert knobs <= set(pb.RetrievalDefaultsInfo.DESCRIPTOR.fields_by_name)


def test_stop_reasons_match_the_generation_loop():
    """server.core.generation.StopReason strings map onto the enum by prefix (read from source: no engine import)."""
    import ast

    from protos.retroserve.v1 import retroserve_pb2 as pb
    from server.api.pb_convert import stop_reason_to_pb

    source = (generate.REPO_ROOT / "server" / "core" / "generation.py").read_text()
    stop_reason = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "StopReason")
    values = [node.value.value for node in stop_reason.body if isinstance(node, ast.Assign)]
    assert values
    for value in values:
        assert pb.StopReason.Name(stop_reason_to_pb(value)) == f"STOP_REASON_{value}"


@pytest.mark.parametrize("enum, table, names", [
    ("RetrievalMode", "MODE_FROM_PB", "RETRIEVAL_MODES"),
    ("ContextLayout", "LAYOUT_FROM_PB", "CONTEXT_LAYOUTS"),
    ("ShardPolicy", "SHARD_POLICY_FROM_PB", "SHARD_POLICIES"),
])
def test_every_enum_value_has_one_name_and_it_is_the_servers_setting(enum, table, names):
    """protos/retroserve/v1/names.py: each value of the .proto enum but UNSPECIFIED has exactly
    one name, the names are the server's settings (server/config.py), and the tables invert."""
    from protos.retroserve.v1 import names as enum_names
    from protos.retroserve.v1 import retroserve_pb2 as pb
    from server import config

    from_pb = getattr(enum_names, table)
    values = [v.number for v in pb.DESCRIPTOR.enum_types_by_name[enum].values if not v.name.endswith("_UNSPECIFIED")]
    assert sorted(from_pb) == sorted(values)
    assert sorted(from_pb.values()) == sorted(getattr(config, names))
    to_pb = getattr(enum_names, table.replace("_FROM_PB", "_TO_PB"))
    assert {number: name for name, number in to_pb.items()} == from_pb
