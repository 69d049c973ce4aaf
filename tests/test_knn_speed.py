"""kNN-LM speed techniques on small seeded data, without vLLM: pointer following (RetoMaton),
greedy-merge pruning, adaptive retrieval, merge-count weighting (server/knn/speed.py,
datastore_tools/token_prune.py). Real FAISS indexes; references are fresh exact searches and
float64 numpy."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from datastore_tools.manifest import write_manifest
from retriever import format as fmt
from retriever import token_datastore as tds
from retriever.token_datastore import TokenDatastore
from server.knn import speed as knn_speed

DIM = 16
LENGTH = 40  # positions per document copy
COPIES = 5


def _store(keys, values, next_ids, factory="Flat", counts=None) -> TokenDatastore:
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
    index.train(keys)
    index.add(keys)
    if "RFlat" in factory:  # re-rank 4k fast-scan candidates from every list with the exact keys
        from retriever.datastore import apply_search_params

        apply_search_params(index, {"nprobe": faiss.try_extract_index_ivf(index).nlist, "k_factor_rf": 4})
    n = len(keys)
    return TokenDatastore(Path("."), {}, index, np.asarray(values, dtype=np.int64), np.asarray(next_ids),
                          np.zeros(n, dtype=np.int32), [], counts)


def _repeated_corpus(seed=0, noise=0.05):
    """COPIES copies of one document: entry copy*LENGTH + t is position t of a copy; the keys of a
    position are one base vector plus small noise per copy, so the COPIES nearest keys of a query at
    position t are the copies of t, and pointers from t-1 lead exactly there."""
    rng = np.random.default_rng(seed)
    base = rng.normal(scale=3.0, size=(LENGTH, DIM)).astype(np.float32)
    keys = np.concatenate([base + rng.normal(scale=noise, size=base.shape).astype(np.float32)
                           for _ in range(COPIES)])
    tokens = rng.integers(0, 50, size=LENGTH + 1)  # the document's tokens; value of position t = token t+1
    values = np.tile(tokens[1:], COPIES)
    next_ids = np.arange(1, COPIES * LENGTH + 1, dtype=np.int64)
    next_ids[LENGTH - 1::LENGTH] = -1
    queries = (base + rng.normal(scale=noise, size=base.shape)).astype(np.float32)
    return keys, values, next_ids, tokens, queries


def _fresh(store, queries, k):
    """Exact search one row at a time (FAISS computes exact differences below its BLAS threshold)."""
    found = [store.search(queries[i:i + 1], k) for i in range(len(queries))]
    return np.concatenate([f.distances for f in found]), np.concatenate([f.ids for f in found])


@pytest.mark.parametrize("factory", ["Flat", "PCA8,Flat", "IVF2,PQ8x4fs,RFlat"])
def test_pointer_following_returns_the_fresh_search_neighbours_when_pointers_are_valid(factory):
    keys, values, next_ids, tokens, queries = _repeated_corpus()
    store = _store(keys, values, next_ids, factory)
    k = COPIES
    fresh_d, fresh_i = _fresh(store, queries, k)
    assert np.array_equal(np.sort(fresh_i, 1), np.arange(COPIES)[None, :] * LENGTH + np.arange(LENGTH)[:, None])
    n = LENGTH
    found = knn_speed.find_neighbours(
        store, queries, k=np.full(n, k), pointer_min=np.full(n, COPIES), chain=np.zeros(n, dtype=int),
        tokens=tokens[:LENGTH], start_ids={}, keys=knn_speed.KeyDistances(store.index), prefetch=1)
    assert found.searched.tolist() == [True] + [False] * (n - 1)  # every later row followed pointers
    assert found.searches == 1
    assert np.array_equal(found.ids, fresh_i)
    np.testing.assert_allclose(found.distances, fresh_d, rtol=1e-5, atol=1e-5)


def test_a_pointer_pool_wider_than_k_keeps_following_where_the_k_nearest_mispredict():
    """Row 10's observed token is mispredicted by the copies of the two nearest neighbours of row 0
    (the ones a pointer set cut to k = 2 follows from row 0 on): nothing survives then and row 10
    searches; seeded with all five copies, the three others survive, and row 10's neighbours are
    the nearest two of their successors."""
    keys, values, next_ids, tokens, queries = _repeated_corpus(seed=4)
    store = _store(keys, values, next_ids)
    k, n = 2, LENGTH
    nearest_at_9 = _fresh(store, queries[0:1], k)[1][0] + 9
    values = values.copy()
    values[nearest_at_9] = 10_000  # these two predicted another token than the one that follows
    store = _store(keys, values, next_ids)
    keys_space = knn_speed.KeyDistances(store.index)

    def run(pool):
        return knn_speed.find_neighbours(
            store, queries, k=np.full(n, k), pointer_min=np.full(n, 2), chain=np.zeros(n, dtype=int),
            tokens=tokens[:LENGTH], start_ids={}, keys=keys_space, prefetch=1, pointer_pool=pool)

    narrow, wide = run(0), run(COPIES)
    assert np.nonzero(narrow.searched)[0].tolist() == [0, 10]
    assert np.nonzero(wide.searched)[0].tolist() == [0]
    assert len(wide.pointer_sets[0]) == COPIES and len(narrow.pointer_sets[0]) == k
    survivors = np.setdiff1d(np.arange(COPIES) * LENGTH + 9, nearest_at_9) + 1
    assert np.array_equal(np.sort(wide.pointer_sets[10]), np.sort(survivors))
    expected_d, expected_i = knn_speed.nearest_of(keys_space, queries[10], survivors, k)
    assert np.array_equal(wide.ids[10], expected_i)
    np.testing.assert_allclose(wide.distances[10], expected_d, rtol=1e-6)
    # up to row 9 every copy is a valid pointer: the wide set gives exactly a fresh search's k nearest
    assert np.array_equal(wide.ids[:10], _fresh(store, queries[:10], k)[1])


def test_the_distance_gate_searches_where_valid_pointers_drifted_away_from_the_query():
    """Row 10's query is made like position 25's while its observed token is still position 10's:
    the pointers (the copies of position 10) are valid by token but far from the query. Without
    the gate they are used; with it (4x the last search's k-th squared distance) row 10 searches
    and gets a fresh search's neighbours; the rows before it follow pointers either way."""
    keys, values, next_ids, tokens, queries = _repeated_corpus(seed=5)
    store = _store(keys, values, next_ids)
    queries = queries.copy()
    queries[10] = queries[25]
    n = LENGTH
    keys_space = knn_speed.KeyDistances(store.index)

    def run(radius):
        return knn_speed.find_neighbours(
            store, queries, k=np.full(n, COPIES), pointer_min=np.full(n, 2), chain=np.zeros(n, dtype=int),
            tokens=tokens[:LENGTH], start_ids={}, keys=keys_space, prefetch=1, pointer_radius=radius)

    ungated, gated = run(0.0), run(4.0)
    assert not ungated.searched[1:11].any()
    assert np.array_equal(np.sort(ungated.ids[10]), np.arange(COPIES) * LENGTH + 10)
    assert gated.searched[:11].tolist() == [True] + [False] * 9 + [True]
    assert np.array_equal(gated.ids[10], _fresh(store, queries[10:11], COPIES)[1][0])
    fresh_radius = float(_fresh(store, queries[10:11], COPIES)[0][0].max())
    assert gated.radii[10] == pytest.approx(fresh_radius, rel=1e-5)


def test_too_few_pointers_searches_again():
    keys, values, next_ids, tokens, queries = _repeated_corpus(seed=1)
    store = _store(keys, values, next_ids)
    observed = tokens[:LENGTH].copy()
    observed[10] = 10_000  # no neighbour of position 9 predicted this token: no pointers at row 10
    n = LENGTH
    found = knn_speed.find_neighbours(
        store, queries, k=np.full(n, COPIES), pointer_min=np.full(n, 2), chain=np.zeros(n, dtype=int),
        tokens=observed, start_ids={}, keys=knn_speed.KeyDistances(store.index), prefetch=8)
    assert np.nonzero(found.searched)[0].tolist() == [0, 10]
    assert found.searches == 2  # row 0's batch prefetched rows 0..7 only
    fresh_d, fresh_i = _fresh(store, queries, COPIES)
    assert np.array_equal(found.ids, fresh_i)
    np.testing.assert_allclose(found.distances, fresh_d, rtol=1e-5, atol=1e-5)


def test_prefetched_rows_are_reused_and_counted_only_when_needed():
    keys, values, next_ids, tokens, queries = _repeated_corpus(seed=2)
    store = _store(keys, values, next_ids)
    observed = tokens[:LENGTH].copy()
    observed[5] = 10_000
    n = LENGTH
    found = knn_speed.find_neighbours(
        store, queries, k=np.full(n, COPIES), pointer_min=np.full(n, 2), chain=np.zeros(n, dtype=int),
        tokens=observed, start_ids={}, keys=knn_speed.KeyDistances(store.index), prefetch=16)
    assert np.nonzero(found.searched)[0].tolist() == [0, 5]
    assert found.searches == 1  # row 5 came with row 0's batch
    assert np.array_equal(found.ids, _fresh(store, queries, COPIES)[1])


def test_chains_start_from_the_previous_steps_neighbours_and_plain_rows_are_searched():
    keys, values, next_ids, tokens, queries = _repeated_corpus(seed=3)
    store = _store(keys, values, next_ids)
    previous = np.arange(COPIES) * LENGTH + 6  # neighbours of position 6, recorded at the last step
    found = knn_speed.find_neighbours(
        store, queries[[7, 7]], k=np.array([COPIES, COPIES]), pointer_min=np.array([COPIES, 0]),
        chain=np.array([0, 1]), tokens=tokens[[7, 7]], start_ids={0: previous},
        keys=knn_speed.KeyDistances(store.index))
    assert found.searched.tolist() == [False, True]
    assert np.array_equal(found.ids[0], found.ids[1])
    np.testing.assert_allclose(found.distances[0], found.distances[1], rtol=1e-5, atol=1e-5)


def test_follow_pointers_keeps_matching_values_and_drops_document_ends():
    values = np.array([5, 6, 5, 5])
    next_ids = np.array([1, 2, -1, 1])
    assert knn_speed.follow_pointers(np.array([0, 1, 2, 3, -1]), values, next_ids, 5).tolist() == [1]
    assert knn_speed.follow_pointers(np.array([1]), values, next_ids, 6).tolist() == [2]
    assert knn_speed.follow_pointers(np.array([1]), values, next_ids, 7).tolist() == []


def test_key_distances_refuses_an_index_without_reconstruction():
    index = faiss.index_factory(DIM, "IDMap,Flat")  # keeps no id -> key map
    index.add_with_ids(np.random.default_rng(0).normal(size=(10, DIM)).astype(np.float32), np.arange(10))
    with pytest.raises(ValueError, match="pointer_min 0"):
        knn_speed.KeyDistances(index)


# -- greedy merge ---------------------------------------------------------------------------------


def _merge_input(seed=0, n=600, vocab=6, k=8):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, DIM)).astype(np.float32)
    values = rng.integers(0, vocab, size=n)
    index = faiss.IndexFlatL2(DIM)
    index.add(keys)
    _, neighbours = index.search(keys, k + 1)
    return keys, values, neighbours


@pytest.mark.parametrize("weighted", [False, True])
def test_greedy_merge_never_merges_different_next_tokens_and_keeps_every_count(weighted):
    from datastore_tools.token_prune import greedy_merge

    keys, values, neighbours = _merge_input()
    counts = np.random.default_rng(1).integers(1, 4, size=len(values)) if weighted else None
    plan = greedy_merge(neighbours, values, counts)
    n = len(values)
    assert 0 < len(plan.keep) < n  # something merged, something kept
    assert np.array_equal(values[plan.representative], values)  # a group shares one next token
    assert np.array_equal(plan.representative[plan.keep], plan.keep)  # representatives are kept
    assert plan.counts.sum() == (n if counts is None else counts.sum())
    expected = np.bincount(plan.representative, weights=np.ones(n) if counts is None else counts, minlength=n)
    assert np.array_equal(plan.counts, expected[plan.keep])
    for j in np.nonzero(plan.representative != np.arange(n))[0]:
        rep = plan.representative[j]
        assert rep < j and j in neighbours[rep]  # merged into an earlier entry that had it as a neighbour


def test_remapped_pointers_lead_to_the_successors_representative():
    from datastore_tools.token_prune import greedy_merge, remap_pointers

    keys, values, neighbours = _merge_input(seed=2)
    next_ids = np.arange(1, len(values) + 1)
    next_ids[99::100] = -1
    plan = greedy_merge(neighbours, values)
    new_next = remap_pointers(next_ids, plan)
    for new, old in enumerate(plan.keep):
        if next_ids[old] < 0:
            assert new_next[new] == -1
        else:
            assert plan.keep[new_next[new]] == plan.representative[next_ids[old]]


def _write_token_datastore(path: Path, keys, values, next_ids, factory="Flat", doc_ids=None):
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
    index.train(keys)
    index.add(keys)
    doc_ids = np.zeros(len(keys), dtype=np.int32) if doc_ids is None else np.asarray(doc_ids, dtype=np.int32)
    path.mkdir(parents=True)
    faiss.write_index(index, str(path / fmt.INDEX_FILE))
    np.save(path / tds.VALUES_FILE, np.asarray(values, dtype=np.int32))
    np.save(path / tds.NEXT_FILE, np.asarray(next_ids, dtype=np.int64))
    np.save(path / tds.DOC_IDS_FILE, doc_ids)
    (path / tds.DOCS_FILE).write_text(json.dumps([{"source": f"synthetic-{d}", "title": "synthetic"}
                                                  for d in range(int(doc_ids.max()) + 1)]))
    write_manifest(path, {
        "schema_version": fmt.SCHEMA_VERSION, "mode": tds.MODE, "name": path.name,
        "tokenizer": {"fingerprint": "t"}, "model": {"fingerprint": "m"},
        "dims": {"embedding": keys.shape[1], "index": keys.shape[1]}, "pca": None,
        "index": {"factory": factory, "metric": "l2", "search_params": {}},
        "counts": {"documents": int(doc_ids.max()) + 1, "entries": len(keys)},
    })


def test_prune_tool_publishes_a_merged_datastore_with_counts(tmp_path):
    from server.cli.main import main

    keys, values, _ = _merge_input(seed=3, n=400)
    next_ids = np.arange(1, len(values) + 1)
    next_ids[-1] = -1
    _write_token_datastore(tmp_path / "src", keys, values, next_ids)
    assert TokenDatastore.open(tmp_path / "src").counts is None  # old datastores: count 1 each
    assert main(["datastore", "prune", "--mode", "token", "--merge-k", "8",
                 str(tmp_path / "src"), str(tmp_path / "merged")]) == 0
    merged = TokenDatastore.open(tmp_path / "merged")
    assert merged.ntotal < len(values) and merged.counts.sum() == len(values)
    assert merged.manifest["merge"]["entries_before"] == len(values)
    # The kept keys are the representatives' own keys: each finds itself.
    found = merged.search(merged.index.reconstruct_n(0, 20), 1)
    assert np.array_equal(found.ids[:, 0], np.arange(20))
    # Merging again only merges further; counts still sum to the original entries.
    assert main(["datastore", "prune", str(tmp_path / "merged"), str(tmp_path / "again")]) == 0
    assert TokenDatastore.open(tmp_path / "again").counts.sum() == len(values)


def test_subset_keeps_the_first_documents_entries_with_their_keys_and_renumbered_pointers(tmp_path):
    """The nested datastores of `eval sweep --token-datastore`: the first N documents' entries, the
    source's own keys (read back exactly from IVF-Flat), values, and pointers renumbered so each
    kept entry still points to the entry that follows it in its document."""
    from datastore_tools.errors import DatastoreToolError
    from datastore_tools.token_prune import subset_token_datastore

    keys, values, _ = _merge_input(seed=7, n=300)
    doc_ids = np.repeat([0, 1, 2], [90, 130, 80])
    next_ids = np.arange(1, len(values) + 1)
    next_ids[np.cumsum([90, 130, 80]) - 1] = -1  # each document's last position has no successor
    _write_token_datastore(tmp_path / "src", keys, values, next_ids, factory="IVF4,Flat", doc_ids=doc_ids)
    subset_token_datastore(tmp_path / "src", tmp_path / "two", 2)
    two = TokenDatastore.open(tmp_path / "two")
    assert two.ntotal == 220 and two.manifest["counts"] == {"documents": 2, "entries": 220, "original_entries": 220}
    assert [d["source"] for d in two.docs] == ["synthetic-0", "synthetic-1"]
    np.testing.assert_array_equal(two.index.reconstruct_n(0, 220), keys[:220])
    np.testing.assert_array_equal(two.values, values[:220])
    np.testing.assert_array_equal(two.doc_ids, doc_ids[:220])
    np.testing.assert_array_equal(two.next_ids, next_ids[:220])  # the first documents keep their numbering
    found = two.search(keys[:20], 3)
    np.testing.assert_array_equal(found.ids, faiss.knn(keys[:20], keys[:220], 3)[1])

    # A later document's pointers are renumbered with it: keep documents 0 and 1 of a reordered
    # source whose document 1 comes first in id order.
    order = np.concatenate([np.arange(90, 220), np.arange(0, 90), np.arange(220, 300)])
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    moved_next = np.where(next_ids[order] >= 0, position[np.clip(next_ids[order], 0, None)], -1)
    _write_token_datastore(tmp_path / "moved", keys[order], values[order], moved_next, doc_ids=doc_ids[order])
    subset_token_datastore(tmp_path / "moved", tmp_path / "moved-two", 2)
    moved = TokenDatastore.open(tmp_path / "moved-two")
    kept = order[:220]
    for new, old in enumerate(kept):
        expected = -1 if next_ids[old] < 0 else int(np.flatnonzero(kept == next_ids[old])[0])
        assert moved.next_ids[new] == expected
    for documents in (0, 4):
        with pytest.raises(DatastoreToolError, match="3 documents"):
            subset_token_datastore(tmp_path / "src", tmp_path / f"bad-{documents}", documents)
    assert not (tmp_path / "bad-0").exists()


def test_keys_computed_in_another_dtype_than_the_served_one_are_named_with_the_fix():
    from retriever.token_datastore import key_dtype_mismatch

    manifest = {"name": "small", "build": {"key_dtype": "float32"}}
    warning = key_dtype_mismatch(manifest, "bfloat16")
    assert "float32" in warning and "bfloat16" in warning and "--key-dtype auto" in warning
    assert key_dtype_mismatch(manifest, "float32") is None
    assert key_dtype_mismatch({"name": "old", "build": {}}, "bfloat16") is None  # built before the record


def test_reduce_tool_reindexes_token_keys_with_pca_and_keeps_every_entry(tmp_path):
    """`datastore reduce` of a token datastore: same values, pointers and documents; the index is
    PCA + the source factory over the source's own keys, searched with full-size queries."""
    from datastore_tools.index_factory import build_index
    from retriever.datastore import apply_search_params
    from server.cli.main import main

    keys, values, _ = _merge_input(seed=4, n=400)
    next_ids = np.arange(1, len(values) + 1)
    next_ids[-1] = -1
    _write_token_datastore(tmp_path / "src", keys, values, next_ids, factory="IVF4,Flat")
    assert main(["datastore", "reduce", "--pca", "8", str(tmp_path / "src"), str(tmp_path / "pca")]) == 0
    source, reduced = TokenDatastore.open(tmp_path / "src"), TokenDatastore.open(tmp_path / "pca")
    assert reduced.manifest["pca"]["dim"] == 8 and reduced.manifest["index"]["factory"] == "IVF4,Flat"
    assert reduced.dim == keys.shape[1] and reduced.ntotal == source.ntotal
    for name in ("values", "next_ids", "doc_ids"):
        np.testing.assert_array_equal(getattr(reduced, name), getattr(source, name))
    reference, _ = build_index(keys, "IVF4,Flat", 8, metric="l2")
    apply_search_params(reference, reduced.manifest["index"]["search_params"])
    found = reduced.search(keys[:50], 5)
    np.testing.assert_array_equal(found.ids, reference.search(keys[:50], 5)[1])
    np.testing.assert_array_equal(found.values, values[found.ids])


def test_reduce_without_pca_reindexes_under_fast_scan_codes_re_ranked_with_the_exact_keys(tmp_path):
    """`datastore reduce --index IVF..,PQ..x4fs,RFlat`: the same entries; the search scans 4-bit
    codes and returns exact distances of exact keys; re-ranking every candidate equals Flat."""
    from retriever.datastore import apply_search_params
    from server.cli.main import main

    keys, values, _ = _merge_input(seed=5, n=400)
    next_ids = np.arange(1, len(values) + 1)
    next_ids[-1] = -1
    _write_token_datastore(tmp_path / "src", keys, values, next_ids, factory="IVF4,Flat")
    factory = f"IVF4,PQ{DIM // 2}x4fs,RFlat"
    assert main(["datastore", "reduce", "--index", factory, str(tmp_path / "src"), str(tmp_path / "fs")]) == 0
    source, reduced = TokenDatastore.open(tmp_path / "src"), TokenDatastore.open(tmp_path / "fs")
    assert reduced.manifest["pca"] is None and reduced.manifest["index"]["factory"] == factory
    assert reduced.manifest["index"]["search_params"] == {"k_factor_rf": 4, "nprobe": 4}
    for name in ("values", "next_ids", "doc_ids"):
        np.testing.assert_array_equal(getattr(reduced, name), getattr(source, name))
    queries = np.random.default_rng(6).normal(size=(50, DIM)).astype(np.float32)
    found = reduced.search(queries, 5)
    exact = ((queries[:, None, :].astype(np.float64) - keys[found.ids].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(found.distances, exact, rtol=1e-4)  # exact distances of the stored keys
    truth_d, truth_i = faiss.knn(queries, keys, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found.ids, truth_i)])
    assert recall >= 0.9  # measured 0.952 (seeded build): 4-bit codes must put the 5 nearest among 20
    apply_search_params(reduced.index, {"k_factor_rf": len(keys)})  # every entry re-ranked: exact search
    np.testing.assert_array_equal(reduced.search(queries, 5).ids, truth_i)
    # Pointer following reads keys back from the refined index: the distances a search reports.
    key_distances = knn_speed.KeyDistances(reduced.index)
    np.testing.assert_allclose(key_distances.distances(queries[0], found.ids[0]), found.distances[0], rtol=1e-5)


def test_reduce_needs_pca_or_an_index(tmp_path, capsys):
    from server.cli.main import main

    keys, values, _ = _merge_input(seed=5, n=100)
    _write_token_datastore(tmp_path / "src", keys, values, np.full(len(values), -1))
    assert main(["datastore", "reduce", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "needs --pca DIM, --index FACTORY" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- adaptive retrieval and count weighting --------------------------------------------------------


def test_adaptive_threshold_skips_exactly_the_confident_rows():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=generator) * torch.linspace(0.5, 12, 64)[:, None]
    thresholds = torch.rand(64, generator=generator) * 0.9 + 0.05
    thresholds[:4] = 1.0  # "off": never skip
    reference = torch.softmax(logits.double(), -1).amax(-1)
    assert ((reference - thresholds.double()).abs() > 1e-6).all()  # no row on the edge
    skip = knn_speed.confident_rows(logits, thresholds)
    assert torch.equal(skip, reference > thresholds.double())
    assert 0 < int(skip.sum()) < 60 and not skip[:4].any()
    assert torch.allclose(knn_speed.max_probability(logits).double(), reference, atol=1e-6)


def test_count_weighting_matches_a_float64_reference():
    from kernels.knn_interpolation import knn_interpolate_reference

    rng = np.random.default_rng(4)
    batch, vocab, k, temperature, lam = 5, 37, 9, 3.0, 0.3
    logits = rng.normal(size=(batch, vocab)).astype(np.float32)
    distances = rng.uniform(0, 20, size=(batch, k)).astype(np.float32)
    ids = rng.integers(-1, 50, size=(batch, k))  # entry ids, -1 padding
    ids[:, 0] = 0  # every row has a valid neighbour
    counts = rng.integers(1, 9, size=50)
    tokens = rng.integers(0, vocab, size=50)
    token_ids = np.where(ids >= 0, tokens[np.clip(ids, 0, None)], -1)
    out = knn_interpolate_reference(
        torch.from_numpy(logits), torch.from_numpy(distances), torch.from_numpy(token_ids),
        temperature=temperature, lam=lam, log_counts=torch.from_numpy(knn_speed.log_counts(counts, ids)))
    weight = np.where(ids >= 0, counts[np.clip(ids, 0, None)] * np.exp(-distances.astype(np.float64) / temperature), 0)
    p_knn = np.zeros((batch, vocab))
    for b in range(batch):
        for j in range(k):
            if ids[b, j] >= 0:
                p_knn[b, token_ids[b, j]] += weight[b, j]
    p_knn /= p_knn.sum(1, keepdims=True)
    x = logits.astype(np.float64)
    p_lm = np.exp(x - x.max(1, keepdims=True))
    p_lm /= p_lm.sum(1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), np.log(lam * p_knn + (1 - lam) * p_lm), rtol=1e-5, atol=1e-5)
    assert knn_speed.log_counts(None, ids) is None  # no counts file: the unweighted mixture, unchanged


# -- request fields ----------------------------------------------------------------------------------


def test_speed_fields_are_validated_and_resolved_to_server_defaults():
    from retroserve.v1 import retroserve_pb2 as pb
    from server.config import RetrievalDefaults
    from server.errors import InvalidArgument
    from server.api.validation import ValidationContext, generation_params_from_pb

    context = ValidationContext(retrieval=RetrievalDefaults(knn_pointer_min=4), has_token_datastore=True)

    def request(**retrieval):
        return pb.GenerateRequest(prompt="x", retrieval=pb.RetrievalParameters(mode=pb.RETRIEVAL_MODE_TOKEN,
                                                                              **retrieval))

    resolved = generation_params_from_pb(request(), context)
    assert resolved.knn_skip_above_prob == 1.0 and resolved.knn_pointer_min == 4
    resolved = generation_params_from_pb(request(knn_skip_above_prob=0.8, knn_pointer_min=0), context)
    assert resolved.knn_skip_above_prob == 0.8 and resolved.knn_pointer_min == 0
    settings = resolved.knn_settings()
    assert settings.skip_above_prob == 0.8 and settings.pointer_min == 0
    for bad, field in [({"knn_skip_above_prob": 0.0}, "knn_skip_above_prob"),
                       ({"knn_skip_above_prob": 1.5}, "knn_skip_above_prob"),
                       ({"knn_pointer_min": 10_000}, "knn_pointer_min")]:
        with pytest.raises(InvalidArgument, match=field):
            generation_params_from_pb(request(**bad), context)
