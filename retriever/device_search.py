"""Exact search on a CUDA device without GPU FAISS: a FAISS-shaped wrapper over kernels/exact_search.

GPU FAISS wheels are tied to one CUDA version, so a CUDA machine often has CPU-only FAISS. For a
plain `Flat` index the retriever then searches the same vectors on the GPU with the torch
brute-force kernel (fp16 keys, fp32 accumulation, FAISS's result conventions). Only exact indexes
are moved: an approximate index's results depend on its own quantisers, which the kernel does not
reproduce. The FAISS index stays the datastore's `index` (for reconstruct, transforms, params);
only `search` goes to the device.
"""

from __future__ import annotations

import faiss
import numpy as np

_FLAT_METRICS = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def exact_flat_metric(index) -> str | None:
    """"ip" / "l2" when `index` is a plain flat index (searchable exactly by the torch kernel), else None."""
    plain = faiss.downcast_index(index)
    if type(plain).__name__ in ("IndexFlat", "IndexFlatIP", "IndexFlatL2"):
        return _FLAT_METRICS.get(plain.metric_type)
    return None


class DeviceFlatSearch:
    """`search(queries, k) -> (distances, ids)` as numpy, like faiss.IndexFlat, computed on `device`."""

    def __init__(self, index, device: str = "cuda"):
        from kernels.exact_search import TorchExactIndex

        metric = exact_flat_metric(index)
        if metric is None:
            raise ValueError(f"{type(faiss.downcast_index(index)).__name__} is not a plain Flat index; only exact "
                             "indexes can be searched by the torch kernel")
        keys = index.reconstruct_n(0, index.ntotal)
        self.exact = TorchExactIndex(keys, metric=metric, device=device)
        self.ntotal = int(index.ntotal)
        self.d = int(index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = self.exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return distances.cpu().numpy(), ids.cpu().numpy()


def device_searcher(index, device: str):
    """The object whose `search` serves queries: a DeviceFlatSearch on CUDA when `device` asks for it
    ("auto" or "cuda"), a GPU is visible and the index is exact; otherwise the FAISS index itself."""
    if device in ("auto", "cuda") and cuda_visible() and exact_flat_metric(index) is not None:
        return DeviceFlatSearch(index, "cuda")
    return index
