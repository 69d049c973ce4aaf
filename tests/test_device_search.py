"""The retriever's exact search on a CUDA device without GPU FAISS (retriever/device_search.py).

The wrapper runs on the CPU here (the torch kernel supports any device), so its results are
checked against FAISS IndexFlat on this machine; the CUDA tests repeat that through
Datastore.open / TokenDatastore.open and are skipped where no GPU is visible.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from retriever import device_search
from retriever.datastore import Datastore, DatastoreError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _flat(metric: int, n: int = 3000, d: int = 48, seed: int = 0):
    rs = np.random.RandomState(seed)
    x = rs.randn(n, d).astype(np.float32)
    q = rs.randn(37, d).astype(np.float32)
    index = faiss.IndexFlat(d, metric)
    index.add(x)
    return index, q


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT], ids=["l2", "ip"])
def test_device_flat_search_equals_index_flat(metric):
    index, q = _flat(metric)
    wrapped = device_search.DeviceFlatSearch(index, device="cpu")
    want_d, want_i = index.search(q, 10)
    got_d, got_i = wrapped.search(q, 10)
    assert got_i.dtype == np.int64 and got_d.dtype == np.float32
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-3)
    # k larger than the index: FAISS's padding (-1 ids) in the same places
    small, _ = _flat(metric, n=5)
    np.testing.assert_array_equal(device_search.DeviceFlatSearch(small, "cpu").search(q[:3], 8)[1],
                                  small.search(q[:3], 8)[1])


def test_only_exact_indexes_are_moved():
    index, _ = _flat(faiss.METRIC_L2)
    assert device_search.exact_flat_metric(index) == "l2"
    ivf = faiss.index_factory(48, "IVF4,Flat")
    assert device_search.exact_flat_metric(ivf) is None
    with pytest.raises(ValueError, match="not a plain Flat index"):
        device_search.DeviceFlatSearch(ivf, "cpu")
    # "cpu" never moves anything; without a GPU "auto" keeps the FAISS index too.
    assert device_search.device_searcher(index, "cpu") is index
    if not torch.cuda.is_available():
        assert device_search.device_searcher(index, "auto") is index


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_cuda_requested_without_a_gpu_names_the_fix(small_datastore):
    with pytest.raises(DatastoreError, match="device 'cuda' requested.*use device 'cpu'"):
        Datastore.open(small_datastore, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_flat_datastore_searches_on_cuda_like_faiss(small_datastore):
    with Datastore.open(small_datastore, device="cpu") as cpu, Datastore.open(small_datastore, device="cuda") as gpu:
        assert gpu.on_gpu and gpu.searcher is not gpu.index
        queries = cpu.index.reconstruct_n(0, 16)
        want = cpu.search_embeddings(queries, 5)
        got = gpu.search_embeddings(queries, 5)
        assert [[n.chunk_id for n in row] for row in got] == [[n.chunk_id for n in row] for row in want]
