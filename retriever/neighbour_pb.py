"""The API's protobuf Neighbour (retroserve.proto) from a retriever.datastore.Neighbour.

One converter for the server's Retrieve/Generate replies (server/api/service.py) and the shard
process's ShardNeighbour (retriever/shard_wire.py). It imports only the generated protobuf module,
so a shard process does not load the server's config or validation to answer a search.
"""

from __future__ import annotations

from retroserve.v1 import retroserve_pb2 as pb


def to_pb(neighbour) -> pb.Neighbour:
    """A retriever.datastore.Neighbour (or anything with its attributes) as the API's Neighbour;
    its token ids are not part of it (ShardNeighbour carries them beside it)."""
    return pb.Neighbour(
        chunk_id=neighbour.chunk_id,
        doc_id=neighbour.doc_id,
        source=neighbour.source,
        title=neighbour.title,
        text=neighbour.text,
        continuation_text=neighbour.continuation_text,
        score=neighbour.score,
        continuation_id=getattr(neighbour, "continuation_id", -1),
    )
