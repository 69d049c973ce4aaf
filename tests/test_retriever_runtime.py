"""Query cache and async batcher: identical results to uncached search, own results per caller."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from retriever.batcher import RetrievalBatcher
from retriever.cache import CachedSearcher, QueryCache
from retriever.datastore import Datastore

QUERIES = ["assert statement", "del statement deletes names", "global declaration", "return leaves a function",
           "nonlocal binds outer variables", "break out of a loop"]


@pytest.fixture(scope="module")
def datastore(small_datastore, encoder):
    with Datastore.open(small_datastore, encoder=encoder) as opened:
        yield opened


def ids(rows):
    return [[(n.chunk_id, round(n.score, 5)) for n in row] for row in rows]


def test_cache_matches_uncached_search_and_counts_hits(datastore):
    cached = CachedSearcher(datastore, QueryCache(capacity=16))
    expected = datastore.search_texts(QUERIES, 4)
    first = cached.search_texts(QUERIES, 4)
    assert ids(first) == ids(expected)
    assert cached.cache.stats.misses == len(QUERIES) and cached.cache.stats.hits == 0
    second = cached.search_texts(QUERIES[:3] + ["something new"], 3)
    assert ids(second[:3]) == [row[:3] for row in ids(expected[:3])]  # a k=4 entry answers k=3
    assert cached.cache.stats.hits == 3 and cached.cache.stats.misses == len(QUERIES) + 1
    assert second.timing.search > 0  # the one miss searched
    third = cached.search_texts(QUERIES[:2], 4)
    assert third.timing.search == 0 and third.timing.embed == 0  # all hits: no encoder, no FAISS
    # Token-tuple keys work the same way.
    keyed = cached.search_texts(["x", "y"], 2, keys=[(1, 2, 3), (4, 5)])
    again = cached.search_texts(["ignored", "ignored"], 2, keys=[(1, 2, 3), (4, 5)])
    assert ids(keyed) == ids(again)


def test_lru_evicts_oldest():
    cache = QueryCache(capacity=2)
    for key in ("a", "b", "c"):
        cache.put(key, 1, [])
    assert cache.get("a", 1) is None and cache.get("c", 1) == []


def test_approximate_cache_reuses_close_queries_only(datastore, encoder):
    a, b, far = encoder.encode(["the assert statement", "the assert statement in python",
                                "how do generators yield values"])
    close = float(a @ b)
    assert float(a @ far) < close - 0.05
    cached = CachedSearcher(datastore, QueryCache(capacity=16, approximate_threshold=close - 1e-3))
    base = cached.search_texts(["the assert statement"], 3)
    near = cached.search_texts(["the assert statement in python"], 3)
    assert cached.cache.stats.approximate_hits == 1 and ids(near) == ids(base)
    cached.search_texts(["how do generators yield values"], 3)
    assert cached.cache.stats.approximate_hits == 1 and cached.cache.stats.misses == 2
    off = CachedSearcher(datastore, QueryCache(capacity=16))
    off.search_texts(["the assert statement"], 3)
    off.search_texts(["the assert statement in python"], 3)
    assert off.cache.stats.approximate_hits == 0 and off.cache.stats.misses == 2


def test_batcher_gives_each_caller_its_own_results_and_coalesces(datastore):
    calls = []
    lock = threading.Lock()

    def search(texts, k):
        with lock:
            calls.append(len(texts))
        return datastore.search_texts(texts, k)

    expected = {q: ids(datastore.search_texts([q], 3))[0] for q in QUERIES}

    async def main():
        batcher = RetrievalBatcher(search, max_batch=64, window_s=0.005)
        queries = [QUERIES[i % len(QUERIES)] for i in range(120)]
        ks = [1 + i % 3 for i in range(120)]
        results = await asyncio.gather(*(batcher.retrieve(q, k) for q, k in zip(queries, ks)))
        await batcher.close()
        return queries, ks, results, batcher.stats

    queries, ks, results, stats = asyncio.run(main())
    for query, k, row in zip(queries, ks, results):
        assert len(row) == k
        assert [(n.chunk_id, round(n.score, 5)) for n in row] == expected[query][:k]
    assert stats.calls == 120 and stats.searches == len(calls) and len(calls) <= 120 // 16
    assert max(calls) <= 64


def test_batcher_propagates_errors_to_the_right_caller():
    def search(texts, k):
        if "boom" in texts:
            raise ValueError("bad query: boom")
        return [[f"{text}:{k}"] for text in texts]

    async def main():
        batcher = RetrievalBatcher(search, window_s=0.01)
        outcomes = await asyncio.gather(
            batcher.retrieve("a", 1), batcher.retrieve("boom", 1), batcher.retrieve("c", 1),
            return_exceptions=True,
        )
        with pytest.raises(ValueError, match="k=0"):
            await batcher.retrieve("a", 0)
        await batcher.close()
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.retrieve("a", 1)
        return outcomes, batcher.stats

    outcomes, stats = asyncio.run(main())
    assert outcomes[0] == ["a:1"] and outcomes[2] == ["c:1"]
    assert isinstance(outcomes[1], ValueError) and "boom" in str(outcomes[1])
    assert stats.searches == 4  # one failed batch, then one search per query


def test_batcher_survives_cancelled_callers():
    started = threading.Event()

    def search(texts, k):
        started.set()
        return [[text] for text in texts]

    async def main():
        batcher = RetrievalBatcher(search, window_s=0.02)
        doomed = asyncio.ensure_future(batcher.retrieve("gone", 1))
        kept = asyncio.ensure_future(batcher.retrieve("kept", 1))
        await asyncio.sleep(0)
        doomed.cancel()
        result = await kept
        await batcher.close()
        return result

    assert asyncio.run(main()) == ["kept"]


def test_encoder_output_is_normalised(encoder):
    vectors = encoder.encode(["one", "two words", ""])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, rtol=1e-5)
