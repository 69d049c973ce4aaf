"""The retrieval side of a running server: open the datastore, put the cache and batcher in front.

`open_for_serving` is what `retroserve serve` calls once the engine is up (after
datastore_tools.build.ensure_default_datastore has built the default datastore on a fresh
machine). It refuses a datastore built with another tokenizer, warms
the query encoder so the first request does not pay for loading it, and wires metrics into the
one search function every retrieval goes through. With `--retriever-shards` the datastore is a
retriever.fanout.FanoutSearcher over the shard processes instead: same search interface, so the
cache, batcher and metrics in front of it are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retriever import fingerprints
from retriever.batcher import RetrievalBatcher
from retriever.cache import CachedSearcher, QueryCache
from retriever.datastore import BatchResults, Datastore, DatastoreError

log = logging.getLogger(__name__)


@dataclass
class ServingRetrieval:
    """The datastore, the one metered and cached search every retrieval goes through, and the
    batcher that coalesces the generation loop's calls to it."""

    datastore: Datastore
    """A local Datastore, or a retriever.fanout.FanoutSearcher over datastore shards."""
    search: Callable[[Sequence[str], int], BatchResults]
    batcher: RetrievalBatcher

    async def close(self) -> None:
        await self.batcher.close()
        self.datastore.close()


def metered_search(searcher: CachedSearcher, metrics=None):
    """The batcher's search function: a cached batched search that reports phases and cache use."""

    def search(texts, k):
        before = _cache_counts(searcher.cache)
        results = searcher.search_texts(texts, k)
        if metrics is not None:
            after = _cache_counts(searcher.cache)
            metrics.observe_cache(
                hits=after[0] - before[0], approximate_hits=after[1] - before[1], misses=after[2] - before[2]
            )
            metrics.observe_timing(results.timing)
        return results

    return search


def _cache_counts(cache: QueryCache) -> tuple[int, int, int]:
    stats = cache.stats
    return stats.hits, stats.approximate_hits, stats.misses


def open_for_serving(config, metrics=None, device: str = "auto") -> ServingRetrieval:
    """Open the configured datastore for a server whose model is `config.engine.model_dir`."""
    model_dir = Path(config.engine.model_dir)
    expected = fingerprints.tokenizer_fingerprint(model_dir)
    shards = config.shards
    if shards.addresses and config.retrieval.retriever not in ("auto", "dense"):
        raise DatastoreError(
            f"retriever {config.retrieval.retriever!r} is not served over datastore shards (shards search "
            "their FAISS index only); serve the whole datastore, or use --retriever dense")
    if not shards.addresses:
        path = Path(config.retrieval.datastore_dir)
        if not (path / "manifest.json").is_file():
            raise DatastoreError(
                f"no datastore at {path}: build one with `retroserve datastore build FILES... -o {path}`, "
                "or serve with --no-datastore")
        return open_datastore_for_serving(path, config, metrics, device)
    from retriever.fanout import FanoutSearcher

    datastore = FanoutSearcher.connect(
        shards.addresses, timeout_s=shards.shard_timeout_ms / 1000.0,
        connect_timeout_s=shards.shard_connect_timeout_s, expected_tokenizer_fingerprint=expected,
        metrics=metrics,
    )
    return _behind_cache_and_batcher(datastore, config, metrics)


def open_datastore_for_serving(path: Path, config, metrics=None, device: str = "auto",
                               encoder=None) -> ServingRetrieval:
    """Open the datastore at `path` (which must exist) behind a fresh cache and batcher.

    `encoder`: a loaded query encoder to share (a hot swap to a datastore with the same embedder
    reuses the one already serving instead of loading a second copy)."""
    model_dir = Path(config.engine.model_dir)
    datastore = Datastore.open(
        path, expected_tokenizer_fingerprint=fingerprints.tokenizer_fingerprint(model_dir), device=device,
        encoder=encoder, method=config.retrieval.retriever,
    )
    if datastore.method == "dense" and config.retrieval.retriever == "auto":
        log.warning("datastore %s has no BM25 index, so chunk retrieval ranks by MiniLM embeddings; "
                    "`retroserve datastore bm25 %s` adds one (BM25 gave lower bits per byte: README)", path, path)
    return _behind_cache_and_batcher(datastore, config, metrics)


def _behind_cache_and_batcher(datastore, config, metrics) -> ServingRetrieval:
    """A local datastore or a shard fan-out, warmed up, behind the query cache and the batcher."""
    try:
        datastore.encode(["warm-up"])  # loads MiniLM now rather than in the first request
    except BaseException:
        datastore.close()
        raise
    cache = QueryCache(capacity=config.retrieval.cache_size)
    search = metered_search(CachedSearcher(datastore, cache), metrics)
    batcher = RetrievalBatcher(search, window_s=config.retrieval.batch_window_ms / 1000.0)
    return ServingRetrieval(datastore, search, batcher)
