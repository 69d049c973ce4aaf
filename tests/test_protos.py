"""The committed Python modules are what `python scripts/generate_protos.py` makes from the .proto files,
and the API documents every field (the .proto is the reference clients in other languages read)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("generate_protos", REPO_ROOT / "scripts" / "generate_protos.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


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
    committed = generate.PROTO_ROOT / relative
    assert committed.is_file(), f"{relative} is missing; run `python scripts/generate_protos.py`"
    assert (regenerated / relative).read_bytes() == committed.read_bytes(), (
        f"{relative} is stale; run `python scripts/generate_protos.py` and commit the result"
    )


def test_generated_imports_are_package_absolute():
    """`-I protos` makes the grpc module import its messages from the package `retroserve.v1` (the
    proto package's path), which pyproject maps to protos/retroserve."""
    grpc_module = (generate.PROTO_ROOT / "retroserve/v1/retroserve_pb2_grpc.py").read_text()
    assert "from retroserve.v1 import retroserve_pb2" in grpc_module
    import retroserve.v1.retroserve_pb2 as module
    assert Path(module.__file__).resolve() == generate.PROTO_ROOT / "retroserve/v1/retroserve_pb2.py"


def _source_info(proto_file: str):
    """FileDescriptorProto with comments, straight from protoc."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        status = protoc.main([
            "grpc_tools.protoc",
            f"-I{generate.PROTO_ROOT}",
            f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            str(generate.PROTO_ROOT / proto_file),
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

    from retroserve.v1 import retroserve_pb2 as pb
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

    from retroserve.v1 import retroserve_pb2 as pb
    from server.api.pb_convert import stop_reason_to_pb

    source = (REPO_ROOT / "server" / "core" / "generation.py").read_text()
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
    from retroserve.v1 import names as enum_names
    from retroserve.v1 import retroserve_pb2 as pb
    from server import config

    from_pb = getattr(enum_names, table)
    values = [v.number for v in pb.DESCRIPTOR.enum_types_by_name[enum].values if not v.name.endswith("_UNSPECIFIED")]
    assert sorted(from_pb) == sorted(values)
    assert sorted(from_pb.values()) == sorted(getattr(config, names))
    to_pb = getattr(enum_names, table.replace("_FROM_PB", "_TO_PB"))
    assert {number: name for name, number in to_pb.items()} == from_pb


NODE_TOOLS = REPO_ROOT / "node_modules"
"""`npm ci` (make install) puts buf and the Node.js gRPC packages here, pinned in package.json."""


def node_tool(relative: str) -> Path:
    """A tool installed by `npm ci`; skipped where this machine has no Node.js at all."""
    import shutil

    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed (buf and the Node.js client test need it)")
    tool = NODE_TOOLS / relative
    assert tool.exists(), f"{tool} is missing: run `npm ci` (make install does, where npm is installed)"
    return tool


def run_buf(*args: str):
    import subprocess

    buf = node_tool(".bin/buf")
    return subprocess.run([str(buf), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_buf_lint_passes_with_the_exceptions_buf_yaml_explains():
    result = run_buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_finds_no_break_against_the_previous_commit():
    import subprocess

    previous = subprocess.run(["git", "cat-file", "-e", "HEAD~1:buf.yaml"], cwd=REPO_ROOT, capture_output=True)
    if previous.returncode != 0:
        pytest.skip("the previous commit has no buf.yaml (it predates the proto root protos/), or this clone is shallow")
    result = run_buf("breaking", "--against", ".git#ref=HEAD~1")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_reports_a_removed_field(tmp_path):
    """The check can fail: a copy of the protos without one field is a break against the committed ones."""
    import shutil

    copy = tmp_path / "module"
    shutil.copytree(generate.PROTO_ROOT, copy / "protos", ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    shutil.copy(REPO_ROOT / "buf.yaml", copy / "buf.yaml")
    proto = copy / "protos/retroserve/v1/retroserve.proto"
    text = proto.read_text()
    assert "  string stop_sequence = 5;\n" in text
    proto.write_text(text.replace("  string stop_sequence = 5;\n", "", 1))
    result = run_buf("breaking", str(copy), "--against", str(REPO_ROOT))
    assert result.returncode != 0 and "stop_sequence" in result.stdout, result.stdout + result.stderr
