"""kNN-LM interpolation: log(λ·p_kNN + (1-λ)·p_LM) over the vocabulary, per decoding row.

One FAISS search serves a whole vLLM batch; this module turns its neighbours into next-token
log-probs. For row b with logits x, neighbour scores d_j, next-token ids t_j and optional
log-count weights c_j (greedy-merge pruning):

    s_j        = -d_j / T + c_j      (metric "l2": squared distances, lower is closer)
               = +d_j / T + c_j      (metric "ip": inner-product scores, higher is closer)
    w_j        = s_j - logsumexp_j(s)                        log-softmax over the neighbours
    log p_kNN  = logsumexp_{j: t_j = v} w_j                  (-inf for tokens no neighbour names)
    log p_LM   = log_softmax(x)
    out[v]     = logaddexp(log λ + log p_kNN[v], log(1-λ) + log p_LM[v])

Everything stays in log space, so a token with no kNN mass gets exactly log(1-λ) + log p_LM and a
tiny kNN weight is not flushed to zero by exp() underflow.

Rows that do not use kNN (λ = 0, row mask False, or no valid neighbour) are returned as
`torch.log_softmax(lm_logits, -1, dtype=torch.float32)` (what vLLM's sampler computes for
log-probs): the model's own log-probs bit for bit, by construction (the kernels never write those
rows) rather than by hoping the mixture's arithmetic rounds the same way. Neighbour ids < 0 are
padding (FAISS returns -1 when k > ntotal) and carry no mass.

Neither implementation synchronises with the GPU when `validate=False` (the serving path, whose
caller checks λ on the host); `validate=True` (default) also rejects λ outside [0, 1] and ids >= V.

`knn_interpolate_reference` is the torch implementation (any device); `knn_interpolate_sparse`
computes the same in torch but touches the vocabulary only through log_softmax and one add,
working out the kNN part at the K neighbours' tokens alone (the CPU serving path: 1.5-3 ms instead
of ~45 ms for 16 rows x 49,152 tokens x k 64 on one core); `knn_interpolate_triton` runs the
Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1); `knn_interpolate` picks Triton for
CUDA tensors and the sparse path elsewhere, unless RETROSERVE_KNN_KERNEL says otherwise.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Metric = Literal["l2", "ip"]

#: Environment variable that forces a backend: "auto" (default), "triton", "sparse" or "torch"
#: (the dense reference).
BACKEND_ENV = "RETROSERVE_KNN_KERNEL"
_BACKENDS = ("auto", "triton", "sparse", "torch")


# --------------------------------------------------------------------------------------------
# Argument handling shared by both implementations
# --------------------------------------------------------------------------------------------


def _score_scale(metric: str, temperature: float) -> float:
    """The factor that turns a raw neighbour value into a softmax logit (sign and temperature)."""
    if metric not in ("l2", "ip"):
        raise ValueError(f"{metric=} must be one of 'l2' (squared distance) or 'ip' (inner product)")
    if not temperature > 0:
        raise ValueError(f"{temperature=} must be > 0")
    return (-1.0 if metric == "l2" else 1.0) / float(temperature)


def _prepare(lm_logits, distances, token_ids, log_counts, lam, row_mask, validate):
    """Check shapes; return the effective λ per row, [B] fp32 on the logits' device.

    The effective λ is 0 for rows that do not use kNN: λ = 0, row mask False, or no valid
    neighbour id (ids outside [0, V) carry no mass). Computed on the device without a host
    round trip. `validate` also checks values (λ in [0, 1], no id >= V), which reads them on
    the host: free when they are CPU tensors (FAISS output), one sync when they are on the GPU.
    """
    if lm_logits.dim() != 2:
        raise ValueError(f"lm_logits must be [B, V], got shape {tuple(lm_logits.shape)}")
    if lm_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"lm_logits dtype {lm_logits.dtype} must be float32, bfloat16 or float16")
    batch, vocab = lm_logits.shape
    if distances.dim() != 2 or distances.shape[0] != batch:
        raise ValueError(f"distances must be [B={batch}, K], got {tuple(distances.shape)}")
    if token_ids.shape != distances.shape:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} != distances shape {tuple(distances.shape)}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids dtype {token_ids.dtype} must be int64 or int32")
    if log_counts is not None and log_counts.shape != distances.shape:
        raise ValueError(f"log_counts shape {tuple(log_counts.shape)} != distances shape {tuple(distances.shape)}")
    if isinstance(lam, torch.Tensor):
        if lam.shape not in ((batch,), ()):
            raise ValueError(f"lam must be a float or a [B={batch}] tensor, got shape {tuple(lam.shape)}")
        if validate and not bool(((lam >= 0) & (lam <= 1)).all()):
            raise ValueError(f"lam must lie in [0, 1], got {lam.tolist()}")
        lam_t = lam.to(dtype=torch.float32).expand(batch)
    else:
        if validate and not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"{lam=} must lie in [0, 1]")
        lam_t = torch.full((batch,), float(lam), dtype=torch.float32)
    if row_mask is not None and row_mask.shape != (batch,):
        raise ValueError(f"row_mask must be [B={batch}], got {tuple(row_mask.shape)}")
    if validate and bool((token_ids >= vocab).any()):
        raise ValueError(f"token_ids must be < vocabulary size {vocab} (ids < 0 mark padding)")
    device = lm_logits.device
    valid = ((token_ids >= 0) & (token_ids < vocab)).any(dim=1).to(device, non_blocking=True)
    use = valid if row_mask is None else valid & row_mask.to(device=device, dtype=torch.bool, non_blocking=True)
    lam_t = lam_t.to(device, non_blocking=True)
    return torch.where(use, lam_t, torch.zeros_like(lam_t))


def _neighbour_log_weights(distances, token_ids, log_counts, scale: float, vocab: int, active: torch.Tensor):
    """(ids int64, valid [B, K], w [B, K]) on `active`'s device: w_j = log_softmax_j(s_j) over each row's
    valid neighbours (-inf at padding); rows not `active` get w from all-zero scores, so a row with
    no valid neighbour yields no NaN."""
    device = active.device
    ids = token_ids.to(device=device, dtype=torch.int64)
    valid = (ids >= 0) & (ids < vocab)
    scores = distances.to(device=device, dtype=torch.float32) * scale
    if log_counts is not None:
        scores = scores + log_counts.to(device=device, dtype=torch.float32)
    scores = torch.where(valid, scores, torch.tensor(float("-inf"), device=device))
    scores = torch.where(active[:, None], scores, torch.zeros_like(scores))
    return ids, valid, torch.log_softmax(scores, dim=-1)


# --------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------


def knn_interpolate_reference(
    lm_logits: torch.Tensor,
    distances: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float,
    lam: float | torch.Tensor,
    log_counts: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    metric: Metric = "l2",
    validate: bool = True,
) -> torch.Tensor:
    """kNN-LM mixture in plain torch ops (fp32), on any device. Returns log-probs [B, V] fp32.

    The scatter of neighbour weights onto the vocabulary is a log-space segmented logsumexp:
    a scatter-amax gives each token's largest weight, then a scatter-add sums exp(w - max).
    Padding ids (< 0) go to a spare column V that is dropped at the end.
    """
    scale = _score_scale(metric, temperature)
    lam_t = _prepare(lm_logits, distances, token_ids, log_counts, lam, row_mask, validate)
    active = lam_t > 0
    lp_lm = torch.log_softmax(lm_logits, dim=-1, dtype=torch.float32)
    batch, vocab = lm_logits.shape
    device = lm_logits.device
    ids, valid, w = _neighbour_log_weights(distances, token_ids, log_counts, scale, vocab, active)
    ids = torch.where(valid, ids, torch.full_like(ids, vocab))
    neg_inf = torch.tensor(float("-inf"), device=device)
    peak = torch.full((batch, vocab + 1), float("-inf"), device=device)
    peak = peak.scatter_reduce(1, ids, w, reduce="amax", include_self=True)
    peak_j = peak.gather(1, ids)
    shift = torch.where(torch.isfinite(peak_j), w - peak_j, neg_inf)
    total = torch.zeros((batch, vocab + 1), device=device).scatter_add(1, ids, torch.exp(shift))
    lp_knn = (torch.where(torch.isfinite(peak), peak, neg_inf) + torch.log(total))[:, :vocab]
    mixed = torch.logaddexp(torch.log(lam_t)[:, None] + lp_knn, torch.log1p(-lam_t)[:, None] + lp_lm)
    return torch.where(active[:, None], mixed, lp_lm)


def knn_interpolate_sparse(
    lm_logits: torch.Tensor,
    distances: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float,
    lam: float | torch.Tensor,
    log_counts: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    metric: Metric = "l2",
    validate: bool = True,
) -> torch.Tensor:
    """Same contract as `knn_interpolate_reference`, without [B, V] scatters.

    A token no neighbour names gets logaddexp(-inf, log(1-λ) + log p_LM) = log(1-λ) + log p_LM, so
    a mixed row is log_softmax plus log(1-λ) (the reference's values bit for bit) except at the
    neighbours' tokens; there log p_kNN is a logsumexp over the neighbours naming the same token
    (a [B, K, K] equality mask) and the mixture is written in place. Reads which rows mix on the
    host (one sync on a GPU: use the Triton kernels there).
    """
    scale = _score_scale(metric, temperature)
    lam_t = _prepare(lm_logits, distances, token_ids, log_counts, lam, row_mask, validate)
    out = torch.log_softmax(lm_logits, dim=-1, dtype=torch.float32)
    active = lam_t > 0
    rows = torch.nonzero(active).squeeze(1)
    if rows.numel() == 0 or distances.shape[1] == 0:
        return out
    ids, valid, w = _neighbour_log_weights(distances[rows], token_ids[rows],
                                           None if log_counts is None else log_counts[rows], scale, out.shape[1],
                                           torch.ones_like(rows, dtype=torch.bool))
    neg_inf = torch.tensor(float("-inf"), device=out.device)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]
    lp_knn = torch.logsumexp(torch.where(same, w[:, None, :], neg_inf), dim=-1)  # [R, K]: of each neighbour's token
    lam_r = lam_t[rows]
    log_rest = torch.log1p(-lam_r)[:, None]
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
    mixed = torch.logaddexp(torch.log(lam_r)[:, None] + lp_knn, log_rest + out[rows].gather(1, safe_ids))
    # In place, every row at once: rows that do not mix add exactly 0 (x + 0.0 == x for x <= 0, -inf).
    out.add_(torch.where(active, torch.log1p(-lam_t), torch.zeros_like(lam_t))[:, None])
    keep = valid.nonzero(as_tuple=True)
    out[rows[keep[0]], ids[keep]] = mixed[keep]  # neighbours naming one token write equal values
    return out


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

try:  # Triton is optional: the reference serves wherever it is missing.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has triton (vllm pulls it)
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _logaddexp(a, b):
        """log(exp(a) + exp(b)) that returns -inf (not NaN) when both are -inf."""
        m = tl.maximum(a, b)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        return m + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe))

    @triton.jit
    def _neighbour_logits(dist_ptr, ids_ptr, logcnt_ptr, row, ks, in_k, K, V, scale, HAS_LOGCNT: tl.constexpr):
        """(token ids, softmax logits) of neighbours `ks` of `row`; padding gets id -1, logit -inf."""
        tok = tl.load(ids_ptr + row * K + ks, mask=in_k, other=-1)
        ok = in_k & (tok >= 0) & (tok < V)
        s = tl.load(dist_ptr + row * K + ks, mask=ok, other=0.0) * scale
        if HAS_LOGCNT:
            s += tl.load(logcnt_ptr + row * K + ks, mask=ok, other=0.0)
        return tl.where(ok, tok, -1), tl.where(ok, s, float("-inf"))

    @triton.jit
    def _row_stats_kernel(
        logits_ptr,  # [B, V] fp32/bf16/fp16 LM logits, row stride `logits_stride`, unit column stride
        dist_ptr,  # [B, K] fp32 neighbour distances or scores, contiguous
        ids_ptr,  # [B, K] int32/int64 neighbour next-token ids, contiguous; outside [0, V) = padding
        logcnt_ptr,  # [B, K] fp32 log-count weights, contiguous (ignored unless HAS_LOGCNT)
        lam_ptr,  # [B] fp32 effective λ per row; 0 = row not in kNN mode, skipped
        lse_lm_ptr,  # [B] fp32 out: logsumexp of each row's logits
        lse_knn_ptr,  # [B] fp32 out: logsumexp of each row's neighbour logits
        logits_stride,  # elements between consecutive logits rows
        V,  # vocabulary size
        K,  # neighbours per row
        scale,  # -1/T for L2 distances, +1/T for inner products
        HAS_LOGCNT: tl.constexpr,  # whether logcnt_ptr holds per-neighbour weights
        BLOCK_V: tl.constexpr,  # vocabulary elements per loop step (power of two)
        BLOCK_K: tl.constexpr,  # neighbours per loop step (power of two)
    ):
        """Per row: the two normalisers, by an online (max, sum) pass over V and over K.

        Kept apart from the output pass so that pass can spread one row over many programs.
        Rows with λ = 0 load nothing (every mask is off) and store nothing.
        """
        row = tl.program_id(0).to(tl.int64)
        on = tl.load(lam_ptr + row) > 0
        v_lim = tl.where(on, V, 0)  # skipped rows see an empty vocabulary: every mask is off
        k_lim = tl.where(on, K, 0)
        base = logits_ptr + row * logits_stride
        offs_v = tl.arange(0, BLOCK_V)
        run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs_v
            x = tl.load(base + cols, mask=cols < v_lim, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, x)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        row_safe = tl.where(row_max == float("-inf"), 0.0, row_max)
        lse_lm = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_safe), axis=0))
        tl.store(lse_lm_ptr + row, lse_lm, mask=on)

        offs_k = tl.arange(0, BLOCK_K)
        k_max = tl.full([BLOCK_K], float("-inf"), tl.float32)
        k_sum = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + offs_k
            _, s = _neighbour_logits(dist_ptr, ids_ptr, logcnt_ptr, row, ks, ks < k_lim, K, V, scale, HAS_LOGCNT)
            new_max = tl.maximum(k_max, s)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            k_sum = k_sum * tl.exp(k_max - safe) + tl.exp(s - safe)
            k_max = new_max
        kk_max = tl.max(k_max, axis=0)
        kk_safe = tl.where(kk_max == float("-inf"), 0.0, kk_max)
        lse_knn = kk_max + tl.log(tl.sum(k_sum * tl.exp(k_max - kk_safe), axis=0))
        tl.store(lse_knn_ptr + row, lse_knn, mask=on)

    @triton.jit
    def _mix_dense_kernel(
        logits_ptr,  # [B, V] LM logits, row stride `logits_stride`
        out_ptr,  # [B, V] fp32 log-probs (pre-filled with log_softmax), row stride `out_stride`
        lam_ptr,  # [B] fp32 effective λ per row; 0 = leave the row as it is
        lse_lm_ptr,  # [B] fp32 logsumexp of each row's logits (from _row_stats_kernel)
        logits_stride,  # elements between consecutive logits rows
        out_stride,  # elements between consecutive output rows
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary elements per program (power of two)
    ):
        """out = log(1-λ) + log p_LM for every token: the value of tokens that no neighbour names.

        Grid (B, cdiv(V, BLOCK_V)): a row's vocabulary is spread over programs so small batches
        still fill the GPU. The kNN kernels then overwrite the tokens that have kNN mass.
        """
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        lam = tl.load(lam_ptr + row)
        keep = cols < tl.where(lam > 0, V, 0)
        x = tl.load(logits_ptr + row * logits_stride + cols, mask=keep, other=0.0).to(tl.float32)
        lse = tl.load(lse_lm_ptr + row, mask=lam > 0, other=0.0)
        tl.store(out_ptr + row * out_stride + cols, tl.log(1.0 - lam) + (x - lse), mask=keep)

    @triton.jit
    def _knn_group_max_kernel(
        dist_ptr,  # [B, K] fp32 neighbour distances or scores, contiguous
        ids_ptr,  # [B, K] int32/int64 neighbour next-token ids, contiguous; outside [0, V) = padding
        logcnt_ptr,  # [B, K] fp32 log-count weights, contiguous (ignored unless HAS_LOGCNT)
        lam_ptr,  # [B] fp32 effective λ per row; 0 = row skipped
        gmax_ptr,  # [B, K] fp32 out: largest logit among the neighbours naming the same token
        term_ptr,  # [B, K] fp32 out: exp(own logit - that group maximum), in (0, 1]
        K,  # neighbours per row
        V,  # vocabulary size
        scale,  # -1/T for L2 distances, +1/T for inner products
        HAS_LOGCNT: tl.constexpr,  # whether logcnt_ptr holds per-neighbour weights
        BLOCK_J: tl.constexpr,  # neighbours handled by one program (power of two)
        BLOCK_K: tl.constexpr,  # neighbours compared against per loop step (power of two)
    ):
        """First half of the scatter: each neighbour finds its token group's maximum logit.

        The K x K comparison does only compares and maxima (no exp), and the one exp per
        neighbour is shifted by its group's maximum, so no group's sum can underflow to 0.
        """
        row = tl.program_id(0).to(tl.int64)
        k_lim = tl.where(tl.load(lam_ptr + row) > 0, K, 0)  # 0 for skipped rows: every mask is off
        js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        in_j = js < k_lim
        tok_j, s_j = _neighbour_logits(dist_ptr, ids_ptr, logcnt_ptr, row, js, in_j, K, V, scale, HAS_LOGCNT)
        offs_k = tl.arange(0, BLOCK_K)
        gmax = tl.full([BLOCK_J], float("-inf"), tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + offs_k
            tok_k, s_k = _neighbour_logits(dist_ptr, ids_ptr, logcnt_ptr, row, ks, ks < k_lim, K, V, scale, HAS_LOGCNT)
            same = (tok_j[:, None] == tok_k[None, :]) & (tok_k[None, :] >= 0)
            gmax = tl.maximum(gmax, tl.max(tl.where(same, s_k[None, :], float("-inf")), axis=1))
        safe = tl.where(gmax == float("-inf"), 0.0, gmax)
        tl.store(gmax_ptr + row * K + js, gmax, mask=in_j)
        tl.store(term_ptr + row * K + js, tl.exp(s_j - safe), mask=in_j)

    @triton.jit
    def _mix_knn_kernel(
        logits_ptr,  # [B, V] LM logits, row stride `logits_stride`
        out_ptr,  # [B, V] fp32 log-probs (dense part already written), row stride `out_stride`
        ids_ptr,  # [B, K] int32/int64 neighbour next-token ids, contiguous; outside [0, V) = padding
        gmax_ptr,  # [B, K] fp32 group maximum logit per neighbour (from _knn_group_max_kernel)
        term_ptr,  # [B, K] fp32 exp(logit - group maximum) per neighbour; 0 for padding
        lam_ptr,  # [B] fp32 effective λ per row; 0 = row skipped
        lse_lm_ptr,  # [B] fp32 logsumexp of each row's logits
        lse_knn_ptr,  # [B] fp32 logsumexp of each row's neighbour logits
        logits_stride,  # elements between consecutive logits rows
        out_stride,  # elements between consecutive output rows
        K,  # neighbours per row
        V,  # vocabulary size
        BLOCK_J: tl.constexpr,  # neighbours handled by one program (power of two)
        BLOCK_K: tl.constexpr,  # neighbours compared against per loop step (power of two)
    ):
        """Second half of the scatter, without atomics: sum each token group and write it once.

        Each neighbour j adds the terms of all neighbours naming its token (compares and adds,
        no exp) and counts those before it; only the first neighbour naming a token writes,
        so every output element has exactly one writer and the result is deterministic.
        """
        row = tl.program_id(0).to(tl.int64)
        lam = tl.load(lam_ptr + row)
        on = lam > 0
        k_lim = tl.where(on, K, 0)  # 0 for skipped rows: every mask is off
        js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        in_j = js < k_lim
        tok_j = tl.load(ids_ptr + row * K + js, mask=in_j, other=-1)
        tok_j = tl.where((tok_j >= 0) & (tok_j < V), tok_j, -1)
        offs_k = tl.arange(0, BLOCK_K)
        total = tl.zeros([BLOCK_J], tl.float32)
        earlier = tl.zeros([BLOCK_J], tl.int32)
        for start in range(0, K, BLOCK_K):
            ks = start + offs_k
            in_k = ks < k_lim
            tok_k = tl.load(ids_ptr + row * K + ks, mask=in_k, other=-1)
            tok_k = tl.where((tok_k >= 0) & (tok_k < V), tok_k, -1)
            t_k = tl.load(term_ptr + row * K + ks, mask=in_k & (tok_k >= 0), other=0.0)
            same = (tok_j[:, None] == tok_k[None, :]) & (tok_k[None, :] >= 0)
            total += tl.sum(tl.where(same, t_k[None, :], 0.0), axis=1)
            earlier += tl.sum((same & (ks[None, :] < js[:, None])).to(tl.int32), axis=1)
        writer = (tok_j >= 0) & (earlier == 0)
        gmax = tl.load(gmax_ptr + row * K + js, mask=writer, other=0.0)
        lse_knn = tl.load(lse_knn_ptr + row, mask=on, other=0.0)
        lp_knn = gmax + tl.log(total) - lse_knn
        tok_safe = tl.where(writer, tok_j, 0)
        x = tl.load(logits_ptr + row * logits_stride + tok_safe, mask=writer, other=0.0).to(tl.float32)
        lp_lm = x - tl.load(lse_lm_ptr + row, mask=on, other=0.0)
        mixed = _logaddexp(tl.log(lam) + lp_knn, tl.log(1.0 - lam) + lp_lm)
        tl.store(out_ptr + row * out_stride + tok_safe, mixed, mask=writer)


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def launch_interpolation(
    lm_logits: torch.Tensor,
    dist: torch.Tensor,
    ids: torch.Tensor,
    log_counts: torch.Tensor | None,
    lam_eff: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """The four launches alone, no checks, no host sync: overwrites the rows with λ > 0 of `out`.

    `dist`/`ids`/`log_counts` are contiguous [B, K] on the logits' device and `lam_eff` [B] fp32
    is 0 for rows to leave alone. Split out so benchmarks can time the kernels by themselves.
    """
    device = lm_logits.device
    batch, vocab = lm_logits.shape
    k = ids.shape[1]
    has_cnt = log_counts is not None
    cnt = log_counts if has_cnt else dist
    lse_lm = torch.empty(batch, dtype=torch.float32, device=device)
    lse_knn = torch.empty(batch, dtype=torch.float32, device=device)
    gmax = torch.empty((batch, k), dtype=torch.float32, device=device)
    term = torch.empty((batch, k), dtype=torch.float32, device=device)
    _row_stats_kernel[(batch,)](
        lm_logits, dist, ids, cnt, lam_eff, lse_lm, lse_knn, lm_logits.stride(0), vocab, k, scale,
        HAS_LOGCNT=has_cnt, BLOCK_V=_pow2(vocab, 16, 4096), BLOCK_K=_pow2(k, 16, 128), num_warps=8,
    )
    block_v = _pow2(vocab, 16, 2048)
    _mix_dense_kernel[(batch, triton.cdiv(vocab, block_v))](
        lm_logits, out, lam_eff, lse_lm, lm_logits.stride(0), out.stride(0), vocab,
        BLOCK_V=block_v, num_warps=4,
    )
    block_j, block_k = _pow2(k, 16, 32), _pow2(k, 16, 128)
    _knn_group_max_kernel[(batch, triton.cdiv(k, block_j))](
        dist, ids, cnt, lam_eff, gmax, term, k, vocab, scale,
        HAS_LOGCNT=has_cnt, BLOCK_J=block_j, BLOCK_K=block_k, num_warps=4,
    )
    _mix_knn_kernel[(batch, triton.cdiv(k, block_j))](
        lm_logits, out, ids, gmax, term, lam_eff, lse_lm, lse_knn, lm_logits.stride(0), out.stride(0), k, vocab,
        BLOCK_J=block_j, BLOCK_K=block_k, num_warps=4,
    )


def knn_interpolate_triton(
    lm_logits: torch.Tensor,
    distances: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float,
    lam: float | torch.Tensor,
    log_counts: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    metric: Metric = "l2",
    validate: bool = True,
) -> torch.Tensor:
    """Same contract as `knn_interpolate_reference`, computed by Triton kernels.

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was
    imported (how CI checks it). The output starts as torch's log_softmax of every row; the
    kernels then overwrite only rows with λ > 0, so the others are the model's own log-probs
    exactly, with no host round trip to find out which rows those are.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use knn_interpolate_reference")
    scale = _score_scale(metric, temperature)
    lam_eff = _prepare(lm_logits, distances, token_ids, log_counts, lam, row_mask, validate)
    device = lm_logits.device
    if lm_logits.stride(-1) != 1:
        lm_logits = lm_logits.contiguous()
    out = torch.log_softmax(lm_logits, dim=-1, dtype=torch.float32)
    if distances.shape[1] == 0:
        return out
    dist = distances.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
    ids = token_ids.to(device, non_blocking=True).contiguous()
    cnt = None
    if log_counts is not None:
        cnt = log_counts.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
    launch_interpolation(lm_logits, dist, ids, cnt, lam_eff, scale, out)
    return out


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def kernel_backend() -> str:
    """The backend forced by RETROSERVE_KNN_KERNEL ("auto" when unset)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} must be one of {', '.join(_BACKENDS)}")
    return value


def knn_interpolate(
    lm_logits: torch.Tensor,
    distances: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float,
    lam: float | torch.Tensor,
    log_counts: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    metric: Metric = "l2",
    validate: bool = True,
) -> torch.Tensor:
    """kNN-LM log-probs [B, V] fp32: the Triton kernels on CUDA, the sparse torch path elsewhere.

    RETROSERVE_KNN_KERNEL=torch forces the dense reference (a debugging escape hatch), =sparse the
    sparse path, =triton the kernels (on the CPU that needs TRITON_INTERPRET=1).
    """
    backend = kernel_backend()
    if backend == "triton" or (backend == "auto" and lm_logits.is_cuda and triton is not None):
        fn = knn_interpolate_triton
    else:
        fn = knn_interpolate_reference if backend == "torch" else knn_interpolate_sparse
    return fn(lm_logits, distances, token_ids, temperature=temperature, lam=lam,
              log_counts=log_counts, row_mask=row_mask, metric=metric, validate=validate)
