"""Protobuf forms of what travels between the server and its shards (protos retriever.proto).

Kept beside the domain types (retriever.datastore) but out of them, so the datastore reader does
not depend on the gRPC API. Embeddings travel as raw little-endian float32 bytes: a batch of 32
MiniLM queries is 48 KiB, and packing and unpacking is a memory copy rather than per-float parsing.
"""

from __future__ import annotations

import json

import numpy as np

from retroserve.v1 import retriever_pb2 as rpb
from retriever import format as fmt
from retriever import neighbour_pb
from retriever.datastore import Neighbour

FLOAT32 = np.dtype("<f4")


def pack_embeddings(vectors: np.ndarray) -> rpb.QueryEmbeddings:
    vectors = np.ascontiguousarray(vectors, dtype=FLOAT32)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be [n, dim], got shape {list(vectors.shape)}")
    return rpb.QueryEmbeddings(dim=vectors.shape[1], values=vectors.tobytes())


def unpack_embeddings(message: rpb.QueryEmbeddings) -> np.ndarray:
    """float32 [n, dim]; ValueError naming the field when the byte count does not fit `dim`."""
    row_bytes = message.dim * FLOAT32.itemsize
    if message.dim == 0 or len(message.values) % row_bytes:
        raise ValueError(
            f"embeddings.values has {len(message.values)} bytes, not a whole number of rows of "
            f"embeddings.dim={message.dim} float32 values"
        )
    return np.frombuffer(message.values, dtype=FLOAT32).reshape(-1, message.dim)


def neighbour_to_pb(neighbour: Neighbour) -> rpb.ShardNeighbour:
    return rpb.ShardNeighbour(
        neighbour=neighbour_pb.to_pb(neighbour),
        chunk_tokens=neighbour.chunk_tokens,
        continuation_tokens=neighbour.continuation_tokens,
    )


def neighbour_from_pb(message: rpb.ShardNeighbour) -> Neighbour:
    n = message.neighbour
    return Neighbour(
        chunk_id=n.chunk_id,
        score=n.score,
        doc_id=n.doc_id,
        source=n.source,
        title=n.title,
        chunk_tokens=tuple(message.chunk_tokens),
        continuation_tokens=tuple(message.continuation_tokens),
        text=n.text,
        continuation_text=n.continuation_text,
        continuation_id=n.continuation_id,
    )


def describe(manifest: dict, max_queries: int, max_k: int) -> rpb.DescribeResponse:
    """A shard's DescribeResponse from its manifest; an unsharded datastore is shard 0 of 1 and
    its own parent."""
    shard = manifest.get("shard") or {}
    parent = shard.get("parent") or {}
    counts = manifest.get("counts") or {}
    embedder = manifest.get("embedder") or {}
    own_index = ((manifest.get("files") or {}).get(fmt.INDEX_FILE) or {}).get("sha256", "")
    first, end = shard.get("chunk_ids") or (0, counts.get("chunks", 0))
    return rpb.DescribeResponse(
        shard_index=shard.get("index", 0),
        shard_count=shard.get("count", 1),
        name=manifest.get("name", ""),
        parent_name=parent.get("name") or manifest.get("name", ""),
        parent_index_sha256=parent.get("index_sha256") or own_index,
        trained_index_sha256=shard.get("trained_index_sha256", ""),
        tokenizer_fingerprint=(manifest.get("tokenizer") or {}).get("fingerprint", ""),
        embedder=embedder.get("name", ""),
        embedder_backend=embedder.get("backend", ""),
        embedding_dim=(manifest.get("dims") or {}).get("embedding", 0),
        index_factory=(manifest.get("index") or {}).get("factory", ""),
        chunk_count=counts.get("chunks", 0),
        document_count=counts.get("documents", 0),
        first_chunk_id=first,
        end_chunk_id=end,
        manifest_json=json.dumps(manifest, sort_keys=True),
        max_queries=max_queries,
        max_k=max_k,
    )
