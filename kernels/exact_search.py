"""Exact (brute-force) k-nearest-neighbour search in torch, for GPUs that FAISS cannot use.

GPU FAISS wheels are tied to one CUDA version; when the installed FAISS has no GPU support the
retriever can still search a token datastore on the device with this: the key matrix lives on the
device (fp16 by default on CUDA, halving memory and bandwidth), scores are a matrix product with
fp32 accumulation and fp32 output, and top-k is merged chunk by chunk so the score buffer stays
bounded (queries x chunk_size) however many keys there are. The default chunk (262144 keys) was
the faster of 65536 and 262144 at every measured size on an H100 (100k and 1M keys x 576, 1 to 256
queries, k=64): fewer chunks mean fewer launches and top-k merges.

Results follow FAISS conventions, so callers can swap this for an `IndexFlat`:
- metric "l2": squared L2 distances, ascending; metric "ip": inner products, descending;
- float32 distances and int64 ids of shape [n, k];
- when k > ntotal, the missing slots hold id -1 and distance +FLT_MAX (l2) / -FLT_MAX (ip),
  exactly what faiss.IndexFlat returns (FLT_MAX, not inf).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Metric = Literal["l2", "ip"]

#: What FAISS writes into result slots it cannot fill (k > ntotal).
FLT_MAX = float(np.finfo(np.float32).max)


def _scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries [n, d] @ keys[m, d].T as fp32 [n, m], accumulated in fp32.

    For fp16/bf16 on CUDA, `torch.mm(..., out_dtype=float32)` keeps the product's fp32
    accumulator instead of rounding it to 16 bits (which would lose ranking precision and can
    overflow fp16 for large hidden-state norms); elsewhere the operands are upcast.
    """
    if keys.dtype in (torch.float16, torch.bfloat16) and keys.is_cuda:
        try:
            return torch.mm(queries, keys.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.mm(queries.float(), keys.t().float())


def exact_search(
    keys: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    metric: Metric = "l2",
    key_sq_norms: torch.Tensor | None = None,
    chunk_size: int = 262144,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `queries` [n, d] against `keys` [m, d] (same device). Returns (D fp32, I int64).

    `key_sq_norms` ([m] fp32, for l2) can be precomputed once per index. L2 uses
    |q|^2 - 2 q.k + |k|^2 clamped at 0, as FAISS's BLAS path does.
    """
    if metric not in ("l2", "ip"):
        raise ValueError(f"{metric=} must be one of 'l2', 'ip'")
    if k < 1:
        raise ValueError(f"{k=} must be >= 1")
    if chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be >= 1")
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be [n, d] and [m, d]")
    n, m = queries.shape[0], keys.shape[0]
    device = keys.device
    largest = metric == "ip"
    fill = -FLT_MAX if largest else FLT_MAX
    best_d = torch.full((n, k), fill, dtype=torch.float32, device=device)
    best_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
    if n == 0 or m == 0:
        return best_d, best_i
    q = queries.to(device=device, dtype=keys.dtype)
    if metric == "l2":
        if key_sq_norms is None:
            key_sq_norms = keys.float().pow(2).sum(dim=1)
        q_sq = q.float().pow(2).sum(dim=1, keepdim=True)
    for start in range(0, m, chunk_size):
        stop = min(m, start + chunk_size)
        s = _scores(q, keys[start:stop])
        if metric == "l2":
            s = (q_sq - 2.0 * s + key_sq_norms[None, start:stop]).clamp_(min=0.0)
        kk = min(k, stop - start)
        d, i = torch.topk(s, kk, dim=1, largest=largest, sorted=False)
        cand_d = torch.cat([best_d, d], dim=1)
        cand_i = torch.cat([best_i, i + start], dim=1)
        best_d, pos = torch.topk(cand_d, k, dim=1, largest=largest, sorted=True)
        best_i = cand_i.gather(1, pos)
    # Slots never filled by a real key keep FAISS's padding (a real FLT_MAX distance is not
    # distinguishable, as in FAISS itself).
    if m < k:
        best_i[:, m:] = -1
        best_d[:, m:] = fill
    return best_d, best_i


class TorchExactIndex:
    """A flat index held on one torch device: `search(queries, k) -> (D, I)` like faiss.IndexFlat.

    Keys are stored once in `dtype` (fp16 on CUDA by default, fp32 on the CPU where half
    matrix products are slow); squared norms for L2 are computed once from the stored keys.
    """

    def __init__(
        self,
        keys,
        metric: Metric = "l2",
        device: str | torch.device = "cuda",
        *,
        dtype: torch.dtype | None = None,
        chunk_size: int = 262144,
    ) -> None:
        if metric not in ("l2", "ip"):
            raise ValueError(f"{metric=} must be one of 'l2', 'ip'")
        if chunk_size < 1:
            raise ValueError(f"{chunk_size=} must be >= 1")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{dtype=} must be float16, bfloat16 or float32")
        keys = torch.as_tensor(keys)
        if keys.dim() != 2:
            raise ValueError(f"keys must be [n, d], got shape {tuple(keys.shape)}")
        self.keys = keys.to(device=device, dtype=dtype).contiguous()
        if not bool(torch.isfinite(self.keys).all()):
            raise ValueError(f"keys overflow {dtype} (or hold NaN/inf); store them as float32")
        self.metric = metric
        self.device = device
        self.chunk_size = chunk_size
        self.key_sq_norms = self.keys.float().pow(2).sum(dim=1) if metric == "l2" else None

    @property
    def ntotal(self) -> int:
        return int(self.keys.shape[0])

    @property
    def d(self) -> int:
        return int(self.keys.shape[1])

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances fp32 [n, k], ids int64 [n, k]) on this index's device, FAISS ordering.

        `queries` may be a numpy array or a tensor on any device; callers that need numpy
        (FAISS-compatible code) call `.cpu().numpy()` on the results.
        """
        q = torch.as_tensor(queries)
        if q.dim() != 2 or q.shape[1] != self.d:
            raise ValueError(f"queries must be [n, {self.d}], got shape {tuple(q.shape)}")
        return exact_search(self.keys, q, k, metric=self.metric, key_sq_norms=self.key_sq_norms,
                            chunk_size=self.chunk_size)
