"""Sparse (BM25) retrieval over a chunk datastore's chunk texts, and its fusion with dense search.

In-Context RALM (Ram et al. 2023) found BM25 over the last query tokens a better retriever for
language modelling than dense encoders: the text to predict shares rare words (here: identifiers,
option names) with the chunks that help. The index is bm25s's (Lucene BM25, k1 1.5, b 0.75) over the
same chunks as the FAISS index, stored in the datastore's `bm25/` folder with a `chunk_ids.npy`
that maps its rows to chunk ids. `tokenize` is the one tokenizer of build and query.

Fusion is reciprocal rank fusion (Cormack et al. 2009): each method ranks its top `FUSION_DEPTH`
chunks, a chunk scores the sum of 1 / (RRF_K + rank) over the methods, ties keep dense order first.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from retriever import format as fmt

METHODS = ("dense", "bm25", "fusion")
"""How a chunk datastore ranks chunks for a query: MiniLM + FAISS, BM25, or both fused by RRF."""
SPARSE_METHODS = ("bm25", "fusion")
CHOICES = ("auto", *METHODS)
"""What an operator may ask for; "auto" resolves per datastore (`resolve`)."""
AUTO_SPARSE = "bm25"
"""What "auto" serves from a datastore with a BM25 index: the method that measured best on the
dev half of the Python-docs split (README, "Better neighbours")."""


def resolve(method: str, has_sparse_index: bool) -> str:
    """The method a datastore is searched with: `method`, or for "auto" AUTO_SPARSE when the
    datastore has a BM25 index and dense when it has none."""
    if method != "auto":
        return method
    return AUTO_SPARSE if has_sparse_index else "dense"
RRF_K = 60
"""Reciprocal rank fusion's constant (Cormack et al. use 60; it damps the top ranks' weight)."""
FUSION_DEPTH = 32
"""Candidates each method contributes to a fusion (at least k)."""
STOPWORDS = "english"
CHUNK_IDS_FILE = "chunk_ids.npy"


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased words of two or more characters, English stopwords removed (bm25s's defaults).

    Identifiers split at punctuation: `os.path.join` gives os, path, join."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


def index_info(index) -> dict:
    """What the manifest records about a BM25 index (its parameters and vocabulary size)."""
    import bm25s

    return {"library": "bm25s", "version": bm25s.__version__, "method": index.method, "k1": index.k1,
            "b": index.b, "stopwords": STOPWORDS, "vocabulary": len(index.vocab_dict)}


class SparseIndex:
    """A BM25 index opened read-only (memory-mapped). `search` is thread-safe."""

    def __init__(self, index, chunk_ids: np.ndarray):
        self.index = index
        self.chunk_ids = chunk_ids
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> "SparseIndex":
        import bm25s

        index = bm25s.BM25.load(str(path), mmap=True, show_progress=False, verbosity=0)
        return cls(index, np.load(path / CHUNK_IDS_FILE))

    def search(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, scores), each [len(texts), k], best first; -1 / 0 where fewer than k chunks
        share a word with the query (a chunk that shares none is no neighbour)."""
        ids = np.full((len(texts), k), -1, dtype=np.int64)
        scores = np.zeros((len(texts), k), dtype=np.float32)
        if not texts:
            return ids, scores
        k_eff = min(k, len(self.chunk_ids))
        queries = tokenize(texts)
        with self._lock:
            rows, found = self.index.retrieve(queries, k=k_eff, show_progress=False, n_threads=0)
        hit = found > 0
        ids[:, :k_eff] = np.where(hit, self.chunk_ids[rows], -1)
        scores[:, :k_eff] = np.where(hit, found, 0.0)
        return ids, scores


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-method rankings (each [n, depth] chunk ids, best first, -1 = none) into the top `k`
    (ids, RRF scores) per row. Ties go to the chunk ranked first by the earlier method."""
    n = len(rankings[0])
    ids = np.full((n, k), -1, dtype=np.int64)
    scores = np.zeros((n, k), dtype=np.float32)
    for row in range(n):
        fused: dict[int, float] = {}
        order: dict[int, tuple[int, int]] = {}
        for method, ranking in enumerate(rankings):
            for rank, chunk in enumerate(ranking[row].tolist()):
                if chunk < 0:
                    continue
                fused[chunk] = fused.get(chunk, 0.0) + 1.0 / (RRF_K + rank + 1)
                order.setdefault(chunk, (method, rank))
        best = sorted(fused, key=lambda chunk: (-fused[chunk], order[chunk]))[:k]
        ids[row, : len(best)] = best
        scores[row, : len(best)] = [fused[chunk] for chunk in best]
    return ids, scores


def sparse_dir(datastore_path: Path) -> Path:
    return Path(datastore_path) / fmt.SPARSE_DIR
