"""BM25 and fusion retrieval (retriever/sparse.py) against exact references.

BM25 is checked against the Lucene formula written out in numpy over the same tokens; fusion
against reciprocal rank fusion computed by hand from the dense (IndexFlat) and BM25 rankings;
the datastore, CLI and serving paths against those searches.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from datastore_copies import copy_without_bm25

from retriever import sparse
from retriever.datastore import Datastore, DatastoreError


def lucene_bm25(corpus_tokens, query_tokens, k1=1.5, b=0.75) -> np.ndarray:
    """Score of every document: sum over query words of idf * tf / (tf + k1 (1 - b + b dl / avgdl))."""
    n = len(corpus_tokens)
    lengths = np.array([len(doc) for doc in corpus_tokens], dtype=np.float64)
    average = lengths.mean()
    scores = np.zeros(n)
    for word in query_tokens:
        df = sum(word in doc for doc in corpus_tokens)
        if df == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, doc in enumerate(corpus_tokens):
            tf = doc.count(word)
            if tf:
                scores[i] += idf * tf / (tf + k1 * (1 - b + b * lengths[i] / average))
    return scores


def random_corpus(seed: int, documents: int = 60, vocabulary: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}{'x' * (i % 3)}" for i in range(vocabulary)]
    return [" ".join(rng.choice(words, size=rng.integers(3, 20))) for _ in range(documents)]


def test_bm25_scores_and_ranks_equal_the_lucene_formula(tmp_path):
    from datastore_tools.sparse_build import write_sparse_index

    corpus = random_corpus(0)
    ids = np.arange(100, 100 + len(corpus))  # rows map to chunk ids
    write_sparse_index(tmp_path / "bm25", corpus, ids)
    index = sparse.SparseIndex.open(tmp_path / "bm25")
    queries = random_corpus(1, documents=8, vocabulary=45)  # some words are in no document
    found_ids, found_scores = index.search(queries, 5)
    tokens = sparse.tokenize(corpus)
    for query, row_ids, row_scores in zip(queries, found_ids, found_scores):
        reference = lucene_bm25(tokens, sparse.tokenize([query])[0])
        expected = np.sort(reference)[::-1][:5]
        assert row_scores == pytest.approx(expected, rel=1e-5)
        for chunk, score in zip(row_ids, row_scores):
            assert reference[chunk - 100] == pytest.approx(score, rel=1e-5)


def test_chunks_that_share_no_word_with_the_query_are_no_neighbours(tmp_path):
    from datastore_tools.sparse_build import write_sparse_index

    write_sparse_index(tmp_path / "bm25", ["alpha beta", "gamma delta", "alpha epsilon"], [0, 1, 2])
    index = sparse.SparseIndex.open(tmp_path / "bm25")
    ids, scores = index.search(["alpha", "unknownword", ""], 3)
    assert sorted(ids[0][:2].tolist()) == [0, 2] and ids[0][2] == -1 and scores[0][2] == 0
    assert ids[1].tolist() == [-1, -1, -1] and ids[2].tolist() == [-1, -1, -1]


def test_reciprocal_rank_fusion_sums_reciprocal_ranks():
    dense = np.array([[7, 3, 5, -1]])
    bm25 = np.array([[3, 9, 7, 5]])
    ids, scores = sparse.reciprocal_rank_fusion([dense, bm25], 3)
    k = sparse.RRF_K
    expected = {7: 1 / (k + 1) + 1 / (k + 3), 3: 1 / (k + 2) + 1 / (k + 1), 5: 1 / (k + 3) + 1 / (k + 4),
                9: 1 / (k + 2)}
    best = sorted(expected, key=lambda chunk: -expected[chunk])[:3]
    assert ids[0].tolist() == best == [3, 7, 5]
    assert scores[0] == pytest.approx([expected[c] for c in best])
    # a tie keeps the earlier method's order
    ids, _ = sparse.reciprocal_rank_fusion([np.array([[1, 2]]), np.array([[2, 1]])], 2)
    assert ids[0].tolist() == [1, 2]


@pytest.fixture(scope="module")
def bm25_datastore(small_datastore):
    return small_datastore  # `datastore build` indexes chunk texts with BM25 by default


def chunk_texts(datastore: Datastore) -> tuple[list[int], list[str]]:
    records = list(datastore.payloads.iter_chunks())
    return [i for i, _ in records], [r["text"] for _, r in records]


QUERIES = ["assert statements are a convenient way to insert debugging assertions",
           "the global statement is a declaration which holds for the entire current code block",
           "continue may only occur syntactically nested in a for or while loop"]


def test_a_datastore_searched_with_bm25_returns_the_formula_ranking(bm25_datastore):
    with Datastore.open(bm25_datastore, device="cpu", method="bm25") as datastore:
        ids, texts = chunk_texts(datastore)
        found = datastore.search_texts(QUERIES, 4)
        tokens = sparse.tokenize(texts)
        for query, row in zip(QUERIES, found):
            reference = lucene_bm25(tokens, sparse.tokenize([query])[0])
            assert [n.score for n in row] == pytest.approx(np.sort(reference)[::-1][:4].tolist(), rel=1e-5)
            # (the corpus holds a duplicate document, so equal scores are expected: compare by score)
            for neighbour in row:
                position = ids.index(neighbour.chunk_id)
                assert reference[position] == pytest.approx(neighbour.score, rel=1e-5)
                assert neighbour.text == texts[position]


def test_fusion_fuses_the_exact_dense_ranking_with_bm25(bm25_datastore):
    with Datastore.open(bm25_datastore, device="cpu", method="fusion") as datastore:
        assert datastore.manifest["index"]["factory"] == "Flat"  # dense ranking is exact
        fused = datastore.search_texts(QUERIES, 3)
        depth = min(sparse.FUSION_DEPTH, datastore.ntotal)
        dense = [[n.chunk_id for n in row] for row in datastore.search_texts(QUERIES, depth, method="dense")]
        bm25 = [[n.chunk_id for n in row] for row in datastore.search_texts(QUERIES, depth, method="bm25")]
    for row, dense_row, bm25_row in zip(fused, dense, bm25):
        score = {}
        for ranking in (dense_row, bm25_row):
            for rank, chunk in enumerate(ranking, start=1):
                score[chunk] = score.get(chunk, 0.0) + 1 / (sparse.RRF_K + rank)
        top = sorted(score.values(), reverse=True)[:3]
        assert [n.score for n in row] == pytest.approx(top, rel=1e-6)
        assert all(n.score == pytest.approx(score[n.chunk_id], rel=1e-6) for n in row)


def test_bm25_on_a_datastore_without_its_index_names_the_command_that_adds_it(bm25_datastore, tmp_path, capsys):
    from datastore_tools.cli import main as datastore_main
    from datastore_tools.verify import verify_datastore

    copy = copy_without_bm25(bm25_datastore, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert verify_datastore(copy) == []
    with pytest.raises(DatastoreError, match=r"no BM25 index.*retroserve datastore bm25"):
        Datastore.open(copy, device="cpu", method="fusion")
    with Datastore.open(copy, device="cpu") as datastore, pytest.raises(DatastoreError, match="no BM25 index"):
        datastore.search_texts(["assert"], 2, method="bm25")

    assert datastore_main(["bm25", str(copy)]) == 0
    assert f"({manifest['counts']['chunks']} chunks" in capsys.readouterr().out
    assert verify_datastore(copy) == []
    assert {k for k in json.loads((copy / "manifest.json").read_text())["files"] if k.startswith("bm25/")}
    assert not list(copy.glob("bm25.*"))  # no staging folder left
    with Datastore.open(copy, device="cpu", method="bm25") as added, \
            Datastore.open(bm25_datastore, device="cpu", method="bm25") as built:
        assert [[n.chunk_id for n in row] for row in added.search_texts(QUERIES, 5)] == \
               [[n.chunk_id for n in row] for row in built.search_texts(QUERIES, 5)]
    assert datastore_main(["bm25", str(copy)]) == 2
    assert "already has a BM25 index" in capsys.readouterr().err
    with pytest.raises(DatastoreError, match="unknown retriever"):
        Datastore.open(copy, device="cpu", method="tf-idf")


def test_auto_serves_bm25_where_the_datastore_has_its_index_and_dense_where_not(bm25_datastore, tmp_path):
    assert sparse.resolve("auto", True) == sparse.AUTO_SPARSE == "bm25"
    assert sparse.resolve("auto", False) == "dense" and sparse.resolve("fusion", True) == "fusion"
    with Datastore.open(bm25_datastore, device="cpu", method="auto") as datastore:
        assert datastore.method == "bm25"
    copy = copy_without_bm25(bm25_datastore, tmp_path / "dense-only")
    with Datastore.open(copy, device="cpu", method="auto") as datastore:
        assert datastore.method == "dense" and datastore.sparse is None


def test_the_serving_search_path_uses_the_configured_retriever(bm25_datastore, tokenizer_dir):
    """open_datastore_for_serving with --retriever bm25: cache and batcher in front, the same rows
    as the datastore's own BM25 search, and a repeated query answered from the exact cache."""
    from retriever.api import open_datastore_for_serving
    from server.config import EngineConfig, RetrievalDefaults, ServerConfig

    config = ServerConfig(engine=EngineConfig(model_dir=tokenizer_dir),
                          retrieval=RetrievalDefaults(datastore_dir=bm25_datastore, retriever="bm25"))
    serving = open_datastore_for_serving(bm25_datastore, config, device="cpu")
    try:
        first = serving.search(QUERIES, 3)
        again = serving.search(QUERIES, 3)
        expected = serving.datastore.search_texts(QUERIES, 3)
        assert serving.datastore.method == "bm25"
        for rows in (first, again):
            assert [[n.chunk_id for n in row] for row in rows] == [[n.chunk_id for n in row] for row in expected]
        assert again.timing.search == 0  # every row came from the cache
    finally:
        serving.datastore.close()
    with pytest.raises(ValueError, match="retriever"):
        RetrievalDefaults(retriever="sparse")


def test_the_default_datastore_built_before_bm25_gets_its_index_on_server_start(bm25_datastore, tmp_path,
                                                                                monkeypatch):
    """ensure_default_datastore (the server's first step with the default datastore) adds the
    BM25 index to a default datastore that lacks it, so "auto" serves BM25 after an upgrade;
    any other datastore is left as it is."""
    from artefacts import paths
    from datastore_tools.build import ensure_default_datastore
    from datastore_tools.verify import verify_datastore

    monkeypatch.setenv("RETROSERVE_HOME", str(tmp_path / "home"))
    for target in (paths.default_datastore_dir(), tmp_path / "elsewhere"):
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_without_bm25(bm25_datastore, target)
        ensure_default_datastore(target, tmp_path / "unused-model")
    default = json.loads((paths.default_datastore_dir() / "manifest.json").read_text())
    assert default["sparse"]["bm25"]["chunks"] == default["counts"]["chunks"]
    assert verify_datastore(paths.default_datastore_dir()) == []
    assert "sparse" not in json.loads((tmp_path / "elsewhere" / "manifest.json").read_text())


@pytest.mark.parametrize("method", ["dense", "bm25", "fusion"])
def test_only_the_dense_ranking_reuses_a_near_duplicate_query_from_the_approximate_cache(bm25_datastore, method):
    """The approximate cache matches query embeddings, so it may answer only for the ranking that
    follows them: a BM25 or fused ranking answers exact keys only (the same text under a new key
    is searched again and gives the datastore's own rows)."""
    from retriever.cache import CachedSearcher, QueryCache

    with Datastore.open(bm25_datastore, device="cpu", method=method) as datastore:
        cached = CachedSearcher(datastore, QueryCache(capacity=16, approximate_threshold=0.99))
        first = cached.search_texts(QUERIES[:1], 3, keys=["first"])
        again = cached.search_texts(QUERIES[:1], 3, keys=["second"])  # cosine 1 with the first
        expected = [[n.chunk_id for n in row] for row in datastore.search_texts(QUERIES[:1], 3)]
    assert [[n.chunk_id for n in row] for row in first] == expected
    assert [[n.chunk_id for n in row] for row in again] == expected
    stats = cached.cache.stats
    assert (stats.approximate_hits, stats.misses) == ((1, 1) if method == "dense" else (0, 2))
