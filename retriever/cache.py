"""Query caches in front of a Datastore: exact LRU, and an opt-in approximate (embedding) cache.

Generation retrieves every `stride` tokens with the last `query_tokens` tokens as the query, so
identical queries recur (same prompt, retries, n>1 sampling); those hit the exact cache without
embedding or searching. The approximate cache goes further: a query whose embedding has cosine
>= `threshold` with a cached query's reuses that query's neighbours (it still pays the embedding,
not the search or payload fetch). It trades exactness for latency and is therefore off by default.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from retriever.datastore import BatchResults, Datastore, Neighbour, Timing, missing_shards


@dataclass
class CacheStats:
    hits: int = 0
    approximate_hits: int = 0
    misses: int = 0


class QueryCache:
    """LRU of (key, k) -> neighbours; a cached entry for a larger k also answers a smaller k."""

    def __init__(self, capacity: int = 4096, approximate_threshold: float | None = None,
                 approximate_capacity: int = 1024):
        if capacity < 0:
            raise ValueError(f"{capacity=} must be >= 0")
        if approximate_threshold is not None and not 0.0 < approximate_threshold <= 1.0:
            raise ValueError(f"{approximate_threshold=} must be a cosine in (0, 1]")
        self.capacity = capacity
        self.approximate_threshold = approximate_threshold
        self.approximate_capacity = approximate_capacity
        self.stats = CacheStats()
        self._entries: collections.OrderedDict[Hashable, tuple[int, list[Neighbour]]] = collections.OrderedDict()
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._vector_results: list[tuple[int, list[Neighbour]]] = []
        self._lock = threading.Lock()

    def get(self, key: Hashable, k: int) -> list[Neighbour] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < k:
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[1][:k]

    def put(self, key: Hashable, k: int, neighbours: list[Neighbour]) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[key] = (k, list(neighbours))
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get_approximate(self, vector: np.ndarray, k: int) -> list[Neighbour] | None:
        if self.approximate_threshold is None:
            return None
        with self._lock:
            if not len(self._vector_results):
                return None
            similarities = self._vectors @ vector
            best = int(np.argmax(similarities))
            cached_k, neighbours = self._vector_results[best]
            if similarities[best] < self.approximate_threshold or cached_k < k:
                return None
            self.stats.approximate_hits += 1
            return neighbours[:k]

    def put_approximate(self, vector: np.ndarray, k: int, neighbours: list[Neighbour]) -> None:
        if self.approximate_threshold is None:
            return
        with self._lock:
            row = np.asarray(vector, dtype=np.float32)[None, :]
            self._vectors = row if not len(self._vector_results) else np.vstack([self._vectors, row])
            self._vector_results.append((k, list(neighbours)))
            if len(self._vector_results) > self.approximate_capacity:  # FIFO eviction
                self._vectors = self._vectors[1:]
                self._vector_results.pop(0)

    def count_misses(self, n: int) -> None:
        with self._lock:
            self.stats.misses += n

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._vectors = np.zeros((0, 0), dtype=np.float32)
            self._vector_results.clear()


class CachedSearcher:
    """`search_texts` with a QueryCache in front of a Datastore (or a retriever.fanout.FanoutSearcher,
    which has the same search interface); misses go to ONE batched search. Partial rows (a shard
    did not answer) are returned but never cached, so a recovered shard is asked again."""

    def __init__(self, datastore: Datastore, cache: QueryCache):
        self.datastore = datastore
        self.cache = cache

    def search_texts(self, texts: Sequence[str], k: int, keys: Sequence[Hashable] | None = None) -> BatchResults:
        """Like Datastore.search_texts. `keys` (e.g. token-id tuples) default to the texts themselves."""
        texts = list(texts)
        keys = list(keys) if keys is not None else texts
        timing = Timing(queries=len(texts))
        results: list[list[Neighbour] | None] = [self.cache.get(key, k) for key in keys]
        missing = [i for i, row in enumerate(results) if row is None]
        if not missing:
            return BatchResults(results, timing)
        method = getattr(self.datastore, "method", "dense")
        vectors = None
        if method != "bm25":  # BM25 ranks by words: no query embedding at all
            encoder = self.datastore.encoder
            started = time.perf_counter()
            vectors = encoder.encode([texts[i] for i in missing])
            timing.embed = time.perf_counter() - started
        # A near-duplicate embedding is evidence of the same answer only when the embedding alone
        # ranks: BM25 and fusion results answer exact keys only.
        approximate = method == "dense"
        to_search = []
        for row, i in enumerate(missing):
            hit = self.cache.get_approximate(vectors[row], k) if approximate else None
            if hit is not None:
                results[i] = hit
                self.cache.put(keys[i], k, hit)
            else:
                to_search.append(row)
        if to_search:
            self.cache.count_misses(len(to_search))
            found = self.datastore.search_queries([texts[missing[row]] for row in to_search],
                                                  None if vectors is None else vectors[to_search], k)
            timing.search, timing.payload = found.timing.search, found.timing.payload
            for row, neighbours in zip(to_search, found):
                i = missing[row]
                results[i] = neighbours
                if not missing_shards(neighbours):
                    self.cache.put(keys[i], k, neighbours)
                    if approximate:
                        self.cache.put_approximate(vectors[row], k, neighbours)
        return BatchResults(results, timing)
