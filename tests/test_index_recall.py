"""Every index type against exact IndexFlat search on seeded synthetic vectors (as faiss contrib does)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from datastore_tools.errors import DatastoreToolError
from datastore_tools.index_factory import build_index, choose_factory
from retriever.datastore import apply_search_params

D = 64


def clustered(n: int, nq: int, d: int = D, spread: float = 1.0, seed: int = 0):
    """Normalised points around 50 centres: structure like real embeddings, neighbours not trivial."""
    rs = np.random.RandomState(seed)
    centres = rs.randn(50, d)
    x = centres[rs.randint(0, 50, n)] + spread * rs.randn(n, d)
    q = centres[rs.randint(0, 50, nq)] + spread * rs.randn(nq, d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x.astype(np.float32), q.astype(np.float32)


@pytest.fixture(scope="module")
def dataset():
    x, q = clustered(6000, 200)
    exact = faiss.IndexFlatIP(D)
    exact.add(x)
    _, truth = exact.search(q, 10)
    return x, q, truth


def recall_at_10(index, q, truth) -> float:
    _, found = index.search(q, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))


# Thresholds: exact and graph/IVF indexes with generous search params must be near-exact. PQ
# compresses 64 floats (256 B) to 16 bytes (16x): quantisation noise reorders close neighbours, and
# on these spread clusters measured recall@10 is ~0.71 (IVF-PQ) / ~0.72 (OPQ), so 0.5 guards against
# breakage (e.g. a wrong metric gives < 0.1) without asserting more than PQ16 can do. PQ32 (8x)
# measured ~0.90.
CASES = [
    ("Flat", {}, 1.0),
    ("HNSW32,Flat", {"efSearch": 64}, 0.95),
    ("IVF64,Flat", {"nprobe": 16}, 0.9),
    ("IVF64,PQ16", {"nprobe": 16}, 0.5),
    ("IVF64,PQ32", {"nprobe": 16}, 0.8),
    ("OPQ16,IVF64,PQ16", {"nprobe": 16}, 0.5),
    # The default above 20k entries (choose_factory): 4-bit fast-scan, one code per dimension
    # (256 B -> 32 B here, 8x; measured ~0.83 on these clusters).
    ("IVF64,PQ64x4fs", {"nprobe": 16}, 0.8),
    ("PQ64x4fs", {}, 0.8),
]


@pytest.mark.parametrize("factory,params,threshold", CASES, ids=[case[0] for case in CASES])
def test_recall_against_flat(dataset, factory, params, threshold):
    x, q, truth = dataset
    index, info = build_index(x, factory, seed=1, search_params=params)
    assert info["index"]["search_params"] == {**info["index"]["search_params"], **params}
    apply_search_params(index, info["index"]["search_params"])
    recall = recall_at_10(index, q, truth)
    print(f"{factory}: recall@10 = {recall:.3f}")
    assert index.ntotal == len(x)
    assert recall >= threshold


def test_same_seed_gives_identical_bytes(dataset):
    x, _, _ = dataset
    first, _ = build_index(x, "IVF32,PQ8", seed=5)
    second, _ = build_index(x, "IVF32,PQ8", seed=5)
    assert faiss.serialize_index(first).tobytes() == faiss.serialize_index(second).tobytes()


def test_pca_round_trip_on_low_rank_data():
    rs = np.random.RandomState(3)
    basis = np.linalg.qr(rs.randn(D, 12))[0].T  # 12 orthonormal directions in 64-d
    x = (rs.randn(3000, 12) @ basis).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, info = build_index(x, "Flat", pca_dim=16, seed=0)
    assert info["pca"]["dim"] == 16 and info["dims"] == {"embedding": D, "index": 16}
    assert info["pca"]["variance_kept"] > 0.999
    pca = faiss.downcast_VectorTransform(index.chain.at(0))
    reconstructed = pca.reverse_transform(pca.apply(x))
    assert float(np.abs(reconstructed - x).max()) < 1e-4
    # Search through the chain with raw vectors equals exact search.
    exact = faiss.IndexFlatIP(D)
    exact.add(x)
    _, truth = exact.search(x[:50], 10)
    assert recall_at_10(index, x[:50], truth) >= 0.99


def test_pca_variance_kept_is_partial_for_full_rank(dataset):
    x, _, _ = dataset
    _, info = build_index(x, "Flat", pca_dim=8)
    assert 0.05 < info["pca"]["variance_kept"] < 0.9


def test_choose_factory_by_size():
    assert choose_factory(1000, 384) == "Flat"
    assert choose_factory(19_999, 384) == "Flat"
    big = choose_factory(40_000, 384)
    assert big.startswith("IVF") and big.endswith("PQ384x4fs")
    nlist = int(big[3:].split(",")[0])
    assert 40_000 >= 39 * nlist
    assert choose_factory(40_000, 128).endswith("PQ128x4fs")
    assert choose_factory(40_000, 127).endswith("SQ8")


@pytest.mark.parametrize("factory,pca,n,needle", [
    ("IVF9x,Flat", None, 500, "unknown or invalid FAISS index factory"),
    ("IVF1024,Flat", None, 500, "IVF1024 needs at least 1024"),
    ("PQ8", None, 100, "needs at least 256 training vectors"),
    ("Flat", 384, 500, "--pca 384 must be between 1 and 383"),
    ("Flat", 500, 500, "--pca 500 must be between"),
])
def test_bad_index_requests(factory, pca, n, needle):
    x, _ = clustered(n, 1, d=384)
    with pytest.raises(DatastoreToolError, match=needle.replace("[", r"\[")):
        build_index(x, factory, pca_dim=pca)
