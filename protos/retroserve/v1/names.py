"""The API's enum values by the names the server, its CLI and its Python client use.

One table per enum, beside the generated code: validation reads requests with the *_FROM_PB
tables, conversion and the client write them with the *_TO_PB ones. The names ("chunk",
"prepend", "partial") are the server's settings (server/config.py); tests/test_protos.py checks
that every named enum value of the .proto has exactly one name here.
"""

from __future__ import annotations

from retroserve.v1 import retroserve_pb2 as pb

MODE_FROM_PB = {
    pb.RETRIEVAL_MODE_NONE: "none",
    pb.RETRIEVAL_MODE_CHUNK: "chunk",
    pb.RETRIEVAL_MODE_TOKEN: "token",
    pb.RETRIEVAL_MODE_HYBRID: "hybrid",
}
LAYOUT_FROM_PB = {
    pb.CONTEXT_LAYOUT_PREPEND: "prepend",
    pb.CONTEXT_LAYOUT_AFTER_PROMPT: "after_prompt",
    pb.CONTEXT_LAYOUT_SUFFIX: "suffix",
}
SHARD_POLICY_FROM_PB = {
    pb.SHARD_POLICY_PARTIAL: "partial",
    pb.SHARD_POLICY_REQUIRE_ALL: "require_all",
}
MODE_TO_PB = {name: number for number, name in MODE_FROM_PB.items()}
LAYOUT_TO_PB = {name: number for number, name in LAYOUT_FROM_PB.items()}
SHARD_POLICY_TO_PB = {name: number for number, name in SHARD_POLICY_FROM_PB.items()}
