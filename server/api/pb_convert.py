"""to_pb for types that live where protobuf should not be imported (config, retriever).

Config dataclasses and retriever types stay free of the API's generated modules, so the datastore
tools and the retriever do not depend on the gRPC API; their protobuf forms are made here. The
Neighbour converter is retriever/neighbour_pb.py (the shard process uses it too, without this
module's server imports). Converters of the server's own request types live beside those types
(server/api/validation.py).
"""

from __future__ import annotations

import dataclasses

from retroserve.v1 import retroserve_pb2 as pb
from retroserve.v1.names import LAYOUT_TO_PB, MODE_TO_PB, SHARD_POLICY_TO_PB
from server.config import Limits, RetrievalDefaults


def limits_to_pb(limits: Limits) -> pb.LimitsInfo:
    """Every Limits field, by name (tests/test_protos.py checks the proto has them all)."""
    return pb.LimitsInfo(**{f.name: getattr(limits, f.name) for f in dataclasses.fields(limits)})


def retrieval_defaults_to_pb(defaults: RetrievalDefaults, available_modes: tuple[str, ...],
                             retriever: str | None = None) -> pb.RetrievalDefaultsInfo:
    """Defaults and bounds; `mode` is what an unspecified request gets on this server, `retriever`
    the method the serving datastore ranks chunks with (default: the configured one)."""
    default_mode = defaults.mode if defaults.mode in available_modes else "none"
    return pb.RetrievalDefaultsInfo(
        mode=MODE_TO_PB[default_mode],
        neighbours=defaults.neighbours,
        max_neighbours=defaults.max_neighbours,
        stride=defaults.stride,
        min_stride=defaults.min_stride,
        max_stride=defaults.max_stride,
        query_tokens=defaults.query_tokens,
        max_query_tokens=defaults.max_query_tokens,
        layout=LAYOUT_TO_PB[defaults.layout],
        available_modes=[MODE_TO_PB[mode] for mode in available_modes],
        shard_policy=SHARD_POLICY_TO_PB[defaults.shard_policy],
        knn_lambda=defaults.knn_lambda,
        knn_k=defaults.knn_k,
        max_knn_k=defaults.max_knn_k,
        knn_temperature=defaults.knn_temperature,
        knn_skip_above_prob=defaults.knn_skip_above_prob,
        knn_pointer_min=defaults.knn_pointer_min,
        keep_same_neighbours=defaults.keep_same_neighbours,
        keep_rank_margin=defaults.keep_rank_margin,
        retriever=retriever or defaults.retriever,
        neighbour_tokens=defaults.neighbour_tokens,
    )


def missing_shard_to_pb(missing) -> pb.MissingShard:
    """A retriever.datastore.MissingShard as the API's MissingShard."""
    return pb.MissingShard(shard_index=missing.index, address=missing.address,
                           reason=pb.ShardFailure.Value(f"SHARD_FAILURE_{missing.reason.upper()}"))


def stop_reason_to_pb(reason: str | None) -> int:
    """server.core.generation.StopReason value ("MAX_TOKENS", ...) -> StopReason enum number."""
    return pb.StopReason.Value(f"STOP_REASON_{reason}") if reason else pb.STOP_REASON_UNSPECIFIED


def datastore_info_to_pb(version, with_path: bool = False) -> pb.DatastoreInfo:
    """A server.core.hot_swap.DatastoreVersion (the chunk datastore serving), or `loaded=False` for None.
    `with_path`: name its directory (Admin replies only; Info discloses no filesystem path)."""
    if version is None:
        return pb.DatastoreInfo(loaded=False)
    return datastore_summary_to_pb(version.retrieval.datastore, with_path=with_path,
                                   manifest_digest=version.digest, serving_since=version.serving_since)


def datastore_summary_to_pb(datastore, with_path: bool = False, **extra) -> pb.DatastoreInfo:
    """The manifest summary of an open datastore: chunk (local or shard fan-out) or token, whose
    manifest has no embedder or chunk length (left empty). `extra`: more DatastoreInfo fields."""
    manifest = datastore.manifest
    dims = manifest.get("dims") or {}
    embedder = manifest.get("embedder") or {}
    return pb.DatastoreInfo(
        loaded=True,
        name=manifest.get("name", ""),
        path=str(datastore.path) if with_path else "",
        shard_addresses=getattr(datastore, "addresses", []),
        mode=manifest.get("mode", "chunk"),
        tokenizer_fingerprint=(manifest.get("tokenizer") or {}).get("fingerprint", ""),
        document_count=(manifest.get("counts") or {}).get("documents", 0),
        entry_count=datastore.ntotal,
        index_factory=(manifest.get("index") or {}).get("factory", ""),
        embedding_dim=dims.get("embedding", 0),
        index_dim=dims.get("index", 0),
        pca_dim=(manifest.get("pca") or {}).get("dim", 0),
        embedder=embedder.get("name", "") if isinstance(embedder, dict) else str(embedder),
        chunk_tokens=manifest.get("chunk_tokens", 0),
        created_at=manifest.get("created_at", ""),
        **extra,
    )
