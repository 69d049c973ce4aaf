"""Search a sharded datastore: one batched search fanned out to every shard, top-k merged.

`FanoutSearcher` has the search interface of a local Datastore (`encoder`, `search_embeddings`,
`search_texts`, `manifest`, `ntotal`, `close`), so the query cache, the cross-request batcher and
the metrics in front of it work unchanged. Queries are embedded once, here, and the embeddings go
to the shards (shards then never load the encoder, and N shards cost one embedding, not N).

Every shard gets the same request at once with its own deadline (`timeout_s`); the merge waits for
each until its answer or its deadline, so a batch takes at most the deadline however many shards
hang. Shards of one split share a trained index and keep global chunk ids
(datastore_tools/shard.py), so their scores compare directly: the merge is faiss.ResultHeap, the
heap FAISS itself uses, and the merged top-k equals the unsharded top-k, ties included. A shard
that does not answer is left out of the merge and reported in each row (NeighbourRow), counted
in metrics by reason; `enforce_shard_policy` then applies the request's policy. Rows never raise
for a missing shard: the batcher would otherwise retry the batch query by query, waiting out the
deadline once per query.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence

import faiss
import grpc
import numpy as np

from retroserve.v1 import retriever_pb2 as rpb
from retroserve.v1 import retriever_pb2_grpc
from retriever import shard_wire
from retriever.datastore import (
    BatchResults, DatastoreError, MissingShard, NeighbourRow, Timing, query_batch, require_fingerprint,
)

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # A restarted shard is used again within seconds (gRPC's default backoff grows to 2 minutes).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 30_000),
)
REASONS = {grpc.StatusCode.DEADLINE_EXCEEDED: "timeout", grpc.StatusCode.UNAVAILABLE: "unavailable"}


class ShardSetError(DatastoreError):
    """The configured shards cannot serve together (unreachable at start, or not one split)."""


class ShardsUnavailable(RuntimeError):
    """A request's shard policy refuses the shards that answered (the server answers UNAVAILABLE)."""


def enforce_shard_policy(row: Sequence, policy: str) -> tuple[MissingShard, ...]:
    """The shards missing from `row` if `policy` accepts the row; raise ShardsUnavailable if not.

    "partial" accepts any row that at least one shard answered; "require_all" only complete rows."""
    missing = tuple(getattr(row, "missing_shards", ()))
    if not missing:
        return ()
    names = ", ".join(f"shard {m.index} at {m.address} ({m.reason})" for m in missing)
    if len(missing) >= getattr(row, "shard_count", len(missing)):
        raise ShardsUnavailable(f"no datastore shard answered: {names}; retry when the shards are back")
    if policy == "require_all":
        raise ShardsUnavailable(
            f"{names} did not answer and the request's shard_policy is REQUIRE_ALL; retry, or use "
            "SHARD_POLICY_PARTIAL to accept the other shards' neighbours"
        )
    return missing


class _Shard:
    """One shard's channel, stub and description."""

    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = retriever_pb2_grpc.RetrieverServiceStub(self.channel)
        self.info: rpb.DescribeResponse | None = None

    @property
    def index(self) -> int:
        return self.info.shard_index


class FanoutSearcher:
    """The datastore as the union of its shards (see the module docstring)."""

    def __init__(self, shards: list[_Shard], timeout_s: float, metrics=None, encoder=None):
        self.shards = sorted(shards, key=lambda shard: shard.index)
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        first = self.shards[0].info
        self.manifest = _parent_manifest([shard.info for shard in self.shards])
        self.path = ""
        self.dim = first.embedding_dim
        self.ntotal = sum(shard.info.chunk_count for shard in self.shards)
        if metrics is not None:
            metrics.init_shards(len(self.shards))

    @classmethod
    def connect(cls, addresses: Sequence[str], timeout_s: float, connect_timeout_s: float = 60.0,
                expected_tokenizer_fingerprint: str | None = None, metrics=None, encoder=None) -> "FanoutSearcher":
        """Describe every shard (waiting up to `connect_timeout_s` for each to come up) and check
        that together they are exactly one split of one datastore, for this tokenizer."""
        if not addresses:
            raise ShardSetError("no shard addresses: pass --retriever-shards HOST:PORT,...")
        shards = [_Shard(address) for address in addresses]
        try:
            futures = [shard.stub.Describe.future(rpb.DescribeRequest(), timeout=max(connect_timeout_s, 0.001),
                                                  wait_for_ready=True) for shard in shards]
            for shard, future in zip(shards, futures):
                try:
                    shard.info = future.result()
                except grpc.RpcError as error:
                    raise ShardSetError(
                        f"datastore shard at {shard.address} did not answer Describe within "
                        f"{connect_timeout_s:g} s ({error.code().name}: {error.details()}); start it with "
                        "`retroserve retriever serve --datastore-dir SHARD --address HOST:PORT` or fix "
                        "--retriever-shards"
                    ) from None
            check_shard_set([(shard.address, shard.info) for shard in shards], expected_tokenizer_fingerprint)
        except BaseException:
            for shard in shards:
                shard.channel.close()
            raise
        searcher = cls(shards, timeout_s, metrics=metrics, encoder=encoder)
        log.info("datastore %s: %d shards, %d chunks (%s)", searcher.manifest.get("name"), len(shards),
                 searcher.ntotal, ", ".join(searcher.addresses))
        return searcher

    # -- what a Datastore offers -------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """Shard addresses in shard order."""
        return [shard.address for shard in self.shards]

    @property
    def encoder(self):
        with self._encoder_lock:
            if self._encoder is None:
                from retriever.encoder import QueryEncoder

                self._encoder = QueryEncoder(backend=self.shards[0].info.embedder_backend or "torch")
            return self._encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(texts))

    def search_texts(self, texts: Sequence[str], k: int) -> BatchResults:
        timing = Timing()
        encoder = self.encoder
        started = time.perf_counter()
        vectors = encoder.encode(list(texts))
        timing.embed = time.perf_counter() - started
        return self.search_embeddings(vectors, k, timing)

    method = "dense"
    """Shards search their FAISS index only (BM25 over shards is not supported)."""

    def search_queries(self, texts: Sequence[str], embeddings: np.ndarray, k: int,
                       timing: Timing | None = None) -> BatchResults:
        """Datastore.search_queries for dense retrieval: the texts are not needed."""
        return self.search_embeddings(embeddings, k, timing)

    def search_embeddings(self, embeddings: np.ndarray, k: int, timing: Timing | None = None) -> BatchResults:
        """Neighbours of each row, merged over the shards that answered in time.

        `timing.search` is the whole fan-out (network, the shards' search and payload reads, merge);
        `timing.payload` stays 0 (payloads are read on the shards). The result's `shard_seconds`
        maps each answering shard to its round trip as seen here."""
        timing = timing or Timing()
        embeddings = query_batch(embeddings, self.dim, k)
        n = len(embeddings)
        timing.queries = n
        if n == 0:
            return BatchResults([], timing)
        request = rpb.SearchRequest(embeddings=shard_wire.pack_embeddings(embeddings), k=k)
        started = time.perf_counter()
        done_at: dict[int, float] = {}
        calls = []
        for shard in self.shards:
            future = shard.stub.Search.future(request, timeout=self.timeout_s)
            future.add_done_callback(lambda _, index=shard.index: done_at.setdefault(index, time.perf_counter()))
            calls.append((shard, future))
        answers, missing, shard_seconds = [], [], {}
        for shard, future in calls:
            try:
                response = future.result()
                if len(response.results) != n:
                    raise ValueError(f"answered {len(response.results)} rows for {n} queries")
            except grpc.RpcError as error:
                missing.append(self._failed(shard, REASONS.get(error.code(), "error"), error.details()))
                continue
            except ValueError as error:
                missing.append(self._failed(shard, "error", str(error)))
                continue
            seconds = done_at.get(shard.index, time.perf_counter()) - started
            shard_seconds[shard.index] = seconds
            if self.metrics is not None:
                self.metrics.observe_shard_search(shard.index, seconds)
            answers.append(response)
        rows = merge_top_k(answers, n, k)
        timing.search = time.perf_counter() - started
        results = BatchResults([NeighbourRow(row, missing, len(self.shards)) for row in rows], timing)
        results.shard_seconds = shard_seconds
        return results

    def _failed(self, shard: _Shard, reason: str, details: str) -> MissingShard:
        log.warning("datastore shard %d at %s missing from a search (%s: %s)", shard.index, shard.address,
                    reason, details)
        if self.metrics is not None:
            self.metrics.observe_shard_failure(shard.index, reason)
        return MissingShard(shard.index, shard.address, reason)

    def close(self) -> None:
        for shard in self.shards:
            shard.channel.close()


def merge_top_k(answers: Sequence[rpb.SearchResponse], n: int, k: int) -> list[list]:
    """The k best neighbours per query over the shards' answers, with FAISS's own heap (so ties
    break as in the unsharded index). Payloads are converted for the winners only."""
    heap = faiss.ResultHeap(n, k, keep_max=True)
    by_id: list[dict[int, rpb.ShardNeighbour]] = [{} for _ in range(n)]
    for response in answers:
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        for q, row in enumerate(response.results):
            for rank, item in enumerate(row.neighbours[:k]):
                scores[q, rank] = item.neighbour.score
                ids[q, rank] = item.neighbour.chunk_id
                by_id[q][item.neighbour.chunk_id] = item
        heap.add_result(scores, ids)
    heap.finalize()
    return [[shard_wire.neighbour_from_pb(by_id[q][int(i)]) for i in heap.I[q] if i >= 0] for q in range(n)]


def check_shard_set(described: Sequence[tuple[str, rpb.DescribeResponse]],
                    expected_tokenizer_fingerprint: str | None = None) -> None:
    """Raise ShardSetError unless the shards are exactly shards 0..N-1 of one split, one index,
    one tokenizer and embedder (and FingerprintMismatch for another tokenizer than the model's)."""
    count = len(described)
    for address, info in described:
        if info.shard_count != count:
            raise ShardSetError(
                f"shard at {address} is shard {info.shard_index} of {info.shard_count}, but --retriever-shards "
                f"names {count} addresses; list every shard of one split, once"
            )
    by_index: dict[int, list[str]] = {}
    for address, info in described:
        by_index.setdefault(info.shard_index, []).append(address)
    duplicated = {index: where for index, where in by_index.items() if len(where) > 1}
    if duplicated:
        absent = sorted(set(range(count)) - set(by_index))
        raise ShardSetError(
            "; ".join(f"shard {index} is served at {', '.join(where)}" for index, where in sorted(duplicated.items()))
            + f"; shard(s) {absent} are not served: serve each shard of the split once"
        )
    for field, what in (("parent_index_sha256", "parent datastore"), ("trained_index_sha256", "trained index"),
                        ("tokenizer_fingerprint", "tokenizer"), ("embedder", "embedder"),
                        ("embedding_dim", "embedding width")):
        values = {getattr(info, field) for _, info in described}
        if len(values) > 1:
            listing = ", ".join(f"{address}: {getattr(info, field)}" for address, info in described)
            raise ShardSetError(f"the shards disagree on the {what} ({listing}); serve shards of one "
                                "`retroserve datastore shard` run")
    first_info = described[0][1]
    require_fingerprint("tokenizer", first_info.tokenizer_fingerprint, expected_tokenizer_fingerprint,
                        what=f"datastore {first_info.parent_name} (served as shards)",
                        fix="rebuild the datastore with `retroserve datastore build ... --model DIR` "
                            "and shard it again")


def _parent_manifest(infos: Sequence[rpb.DescribeResponse]) -> dict:
    """The manifest summary of the datastore the shards were cut from (for Info and logs)."""
    manifest = json.loads(infos[0].manifest_json)
    parent = (manifest.pop("shard", None) or {}).get("parent") or {}
    for key in ("files", "build", "derived_from"):
        manifest.pop(key, None)
    manifest["name"] = infos[0].parent_name
    manifest["created_at"] = parent.get("created_at", manifest.get("created_at"))
    manifest["counts"] = {"documents": sum(info.document_count for info in infos),
                          "chunks": sum(info.chunk_count for info in infos)}
    return manifest
