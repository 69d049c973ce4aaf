"""The `retroserve.v1.RetrieverService` servicer: one datastore shard searched over gRPC.

Protobuf in, one batched Datastore search off the event loop, protobuf out. Requests are checked
before any work (BadShardRequest, which the server's error interceptor turns into
INVALID_ARGUMENT). The server sends embeddings, so a shard never loads the query encoder unless a
client sends texts (grpcurl, debugging), and then only once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

from retroserve.v1 import retriever_pb2 as rpb
from retroserve.v1 import retriever_pb2_grpc
from retroserve.v1 import retroserve_pb2 as pb
from retriever import shard_wire
from retriever.datastore import Datastore


class BadShardRequest(ValueError):
    """A Search request outside the shard's bounds; the message names the field and the bound."""


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    """Serves one opened Datastore (a shard, or a whole datastore as shard 0 of 1)."""

    def __init__(self, datastore: Datastore, executor: Executor, max_queries: int = 1024, max_k: int = 1024,
                 max_query_chars: int = 8192, metrics=None):
        self.datastore = datastore
        self.executor = executor
        self.max_queries = max_queries
        self.max_k = max_k
        self.max_query_chars = max_query_chars
        self.metrics = metrics
        self.description = shard_wire.describe(datastore.manifest, max_queries, max_k)

    def _queries(self, request: rpb.SearchRequest):
        """("texts", list[str]) or ("embeddings", float32 [n, dim]), checked against the bounds."""
        which = request.WhichOneof("queries")
        if which is None:
            raise BadShardRequest("queries is empty: set texts or embeddings")
        if which == "texts":
            queries = list(request.texts.texts)
            for i, text in enumerate(queries):
                if not text.strip() or len(text) > self.max_query_chars:
                    raise BadShardRequest(f"texts.texts[{i}] must have 1..{self.max_query_chars} characters, "
                                          "not all whitespace")
        else:
            try:
                queries = shard_wire.unpack_embeddings(request.embeddings)
            except ValueError as error:
                raise BadShardRequest(str(error)) from None
            if queries.shape[1] != self.datastore.dim:
                raise BadShardRequest(f"embeddings.dim={queries.shape[1]} must be {self.datastore.dim}, the "
                                      "width this shard's index takes")
        if not 1 <= len(queries) <= self.max_queries:
            raise BadShardRequest(f"{which} has {len(queries)} queries; send 1..{self.max_queries}")
        if not 1 <= request.k <= self.max_k:
            raise BadShardRequest(f"k={request.k} must be in [1, {self.max_k}]")
        return which, queries

    def _search(self, which: str, queries, k: int):
        if which == "texts":
            return self.datastore.search_texts(queries, k)
        return self.datastore.search_embeddings(queries, k)

    async def Search(self, request: rpb.SearchRequest, context) -> rpb.SearchResponse:
        started = time.perf_counter()
        which, queries = self._queries(request)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.executor, self._search, which, queries, request.k)
        if self.metrics is not None:
            self.metrics.observe_timing(results.timing)
        timing = results.timing
        response = rpb.SearchResponse(
            results=[rpb.QueryNeighbours(neighbours=[shard_wire.neighbour_to_pb(n) for n in row]) for row in results],
            shard_index=self.description.shard_index,
        )
        response.timing.CopyFrom(pb.RetrieveTiming(
            embed_ms=timing.embed * 1e3, search_ms=timing.search * 1e3, payload_ms=timing.payload * 1e3,
            total_ms=(time.perf_counter() - started) * 1e3,
        ))
        return response

    async def Describe(self, request: rpb.DescribeRequest, context) -> rpb.DescribeResponse:
        return self.description
