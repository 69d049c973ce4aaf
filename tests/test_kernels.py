"""Kernels: kNN-LM interpolation (torch reference, sparse torch path, Triton) and the exact torch search path.

- the reference and the sparse path match an independent float64 numpy implementation on odd
  shapes and dtypes, and the sparse path equals the reference bit for bit at every token no
  neighbour names;
- rows that do not use kNN are torch.log_softmax bit for bit, whatever the other rows do;
- the Triton kernels equal the reference under TRITON_INTERPRET=1 on the CPU (in a subprocess,
  because the variable must be set before triton is imported), and on CUDA when there is a GPU;
- exact search matches faiss.IndexFlatIP / IndexFlatL2 (ids up to ties), across chunk
  boundaries and with k > ntotal (FAISS's -1 / FLT_MAX padding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.exact_search import FLT_MAX, TorchExactIndex, exact_search
from kernels.knn_interpolation import (
    BACKEND_ENV,
    knn_interpolate,
    knn_interpolate_reference,
    knn_interpolate_sparse,
    knn_interpolate_triton,
)

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ------------------------------------------------------------------------------------------


def make_case(batch, vocab, k, dtype, *, seed, metric="l2", log_counts=False, pad=True, device="cpu"):
    """Seeded inputs: spread-out logits, neighbour values, ids with forced repeats and padding."""
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(batch, vocab, generator=g)).to(dtype)
    if metric == "l2":
        dist = 40.0 * torch.rand(batch, k, generator=g)
    else:
        dist = 10.0 * torch.randn(batch, k, generator=g)
    ids = torch.randint(0, vocab, (batch, k), generator=g)
    if k >= 3:  # the same next token from several neighbours must be summed
        ids[:, 1] = ids[:, 0]
        ids[:, k - 1] = ids[:, 0]
    if pad and k >= 2 and batch >= 2:
        ids[1, k // 2] = -1  # FAISS padding (k > ntotal) carries no mass
    counts = torch.log(torch.randint(1, 9, (batch, k), generator=g).float()) if log_counts else None
    lam = torch.rand(batch, generator=g) * 0.9 + 0.05
    out = dict(logits=logits, dist=dist, ids=ids, counts=counts, lam=lam)
    return {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in out.items()}


def reference_float64(logits, dist, ids, *, temperature, lam, counts=None, row_mask=None, metric="l2"):
    """Direct float64 transcription of the formula, one row and one token at a time."""
    x = logits.double().cpu().numpy()
    d = dist.double().cpu().numpy()
    t = ids.cpu().numpy()
    c = counts.double().cpu().numpy() if counts is not None else np.zeros_like(d)
    batch, vocab = x.shape
    lam = np.broadcast_to(np.asarray(lam.cpu() if isinstance(lam, torch.Tensor) else lam, np.float64), (batch,))
    mask = np.ones(batch, bool) if row_mask is None else row_mask.cpu().numpy()
    sign = -1.0 if metric == "l2" else 1.0
    out = np.empty_like(x)
    for b in range(batch):
        m = x[b].max()
        lp_lm = x[b] - (m + np.log(np.exp(x[b] - m).sum()))
        valid = t[b] >= 0
        if lam[b] == 0 or not mask[b] or not valid.any():
            out[b] = lp_lm
            continue
        s = sign * d[b] / temperature + c[b]
        s_max = s[valid].max()
        w = s - (s_max + np.log(np.exp(s[valid] - s_max).sum()))
        lp_knn = np.full(vocab, -np.inf)
        for tok in np.unique(t[b][valid]):
            group = w[t[b] == tok]
            g_max = group.max()
            lp_knn[tok] = g_max + np.log(np.exp(group - g_max).sum())
        with np.errstate(divide="ignore"):
            out[b] = np.logaddexp(np.log(lam[b]) + lp_knn, np.log1p(-lam[b]) + lp_lm)
    return out


def assert_logprobs_close(got, want, atol=1e-4, rtol=1e-5):
    got = got.double().cpu().numpy() if isinstance(got, torch.Tensor) else got
    want = want.double().cpu().numpy() if isinstance(want, torch.Tensor) else want
    assert not np.isnan(got).any(), "NaN in output"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg="-inf pattern differs")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------
# Reference vs float64
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [knn_interpolate_reference, knn_interpolate_sparse], ids=["reference", "sparse"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("vocab", [1, 17, 1000, 49152])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_reference_matches_float64(batch, vocab, k, dtype, fn):
    case = make_case(batch, vocab, k, DTYPES[dtype], seed=batch * 1000 + vocab + k)
    lam = case["lam"]
    lam[0] = 0.0 if batch > 1 else lam[0]  # a row that does not use kNN, beside ones that do
    if batch >= 3:
        lam[2] = 1.0  # pure kNN: tokens no neighbour names are -inf
    got = fn(case["logits"], case["dist"], case["ids"], temperature=10.0, lam=lam)
    want = reference_float64(case["logits"], case["dist"], case["ids"], temperature=10.0, lam=lam)
    assert got.dtype == torch.float32 and got.shape == (batch, vocab)
    assert_logprobs_close(got, want)
    if batch >= 3 and vocab > k:
        assert torch.isneginf(got[2]).any()
    # every mixed row is a distribution
    torch.testing.assert_close(got.double().exp().sum(-1), torch.ones(batch, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("log_counts", [False, True])
def test_sparse_path_equals_the_reference_off_the_neighbours_tokens(metric, log_counts):
    """The CPU serving path: bit for bit where no neighbour names the token (log(1-λ) + log p_LM),
    within float32 rounding of the reference at the neighbours' tokens."""
    case = make_case(16, 49152, 64, torch.bfloat16, seed=21, metric=metric, log_counts=log_counts)
    lam = case["lam"]
    lam[3], lam[5] = 0.0, 1.0
    args = dict(temperature=30.0, lam=lam, log_counts=case["counts"], metric=metric, validate=False)
    sparse = knn_interpolate_sparse(case["logits"], case["dist"], case["ids"], **args)
    dense = knn_interpolate_reference(case["logits"], case["dist"], case["ids"], **args)
    named = torch.zeros_like(dense, dtype=torch.bool)
    rows = torch.arange(16)[:, None].expand(16, 64)
    ok = case["ids"] >= 0
    named[rows[ok], case["ids"][ok]] = True
    assert torch.equal(sparse[~named], dense[~named])
    assert_logprobs_close(sparse[named], dense[named], atol=2e-6, rtol=1e-6)


def test_dispatch_on_the_cpu_is_the_sparse_path_and_the_env_forces_the_reference(monkeypatch):
    case = make_case(4, 3000, 16, torch.bfloat16, seed=22)
    args = dict(temperature=30.0, lam=case["lam"], validate=False)
    sparse = knn_interpolate_sparse(case["logits"], case["dist"], case["ids"], **args)
    dense = knn_interpolate_reference(case["logits"], case["dist"], case["ids"], **args)
    assert torch.equal(knn_interpolate(case["logits"], case["dist"], case["ids"], **args), sparse)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert torch.equal(knn_interpolate(case["logits"], case["dist"], case["ids"], **args), dense)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_reference_metric_and_log_counts(metric):
    case = make_case(5, 300, 32, torch.bfloat16, seed=7, metric=metric, log_counts=True)
    args = dict(temperature=3.0, lam=case["lam"], metric=metric)
    got = knn_interpolate_reference(case["logits"], case["dist"], case["ids"], log_counts=case["counts"], **args)
    want = reference_float64(case["logits"], case["dist"], case["ids"], counts=case["counts"], **args)
    assert_logprobs_close(got, want)


def test_log_counts_equal_duplicated_neighbours():
    """A merged entry with count c weighs exactly as c copies of it (greedy-merge pruning)."""
    logits = torch.randn(1, 50)
    dist, ids = torch.tensor([[1.0, 2.0]]), torch.tensor([[4, 9]])
    merged = knn_interpolate_reference(logits, dist, ids, temperature=1.0, lam=0.5,
                                       log_counts=torch.log(torch.tensor([[3.0, 1.0]])))
    copies = knn_interpolate_reference(logits, torch.tensor([[1.0, 1.0, 1.0, 2.0]]),
                                       torch.tensor([[4, 4, 4, 9]]), temperature=1.0, lam=0.5)
    torch.testing.assert_close(merged, copies)


def test_lambda_zero_rows_are_log_softmax_bit_exact():
    case = make_case(6, 1000, 16, torch.bfloat16, seed=3)
    lam = torch.tensor([0.0, 0.3, 0.0, 1.0, 0.7, 0.0])
    row_mask = torch.tensor([True, True, True, True, False, True])  # row 4: λ set but not in kNN mode
    own = torch.log_softmax(case["logits"], dim=-1, dtype=torch.float32)  # vLLM's log-probs
    for fn, validate in ((knn_interpolate_reference, True), (knn_interpolate_sparse, False),
                         (knn_interpolate, False)):
        out = fn(case["logits"], case["dist"], case["ids"], temperature=5.0, lam=lam, row_mask=row_mask,
                 validate=validate)
        for row in (0, 2, 4, 5):
            assert torch.equal(out[row], own[row]), f"row {row} differs from log_softmax"
        assert not torch.equal(out[1], own[1])
    # all rows off: the whole output is the model's own log-probs
    out = knn_interpolate(case["logits"], case["dist"], case["ids"], temperature=5.0, lam=0.0)
    assert torch.equal(out, own)


def test_mixed_batch_leaves_other_rows_unchanged():
    """A row's output does not depend on what the other rows of the batch ask for."""
    case = make_case(4, 500, 8, torch.float32, seed=11)
    lam_a = torch.tensor([0.0, 0.4, 0.0, 0.2])
    lam_b = torch.tensor([0.0, 0.9, 0.0, 0.0])
    a = knn_interpolate_reference(case["logits"], case["dist"], case["ids"], temperature=5.0, lam=lam_a)
    b = knn_interpolate_reference(case["logits"], case["dist"], case["ids"], temperature=5.0, lam=lam_b)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_rows_without_valid_neighbours_fall_back_to_lm():
    logits = torch.randn(2, 20)
    ids = torch.tensor([[-1, -1, -1], [3, 3, -1]])
    out = knn_interpolate_reference(logits, torch.rand(2, 3), ids, temperature=1.0, lam=0.5)
    own = torch.log_softmax(logits, -1)
    assert torch.equal(out[0], own[0])
    assert out[1, 3] > own[1, 3]


def test_bad_arguments_raise():
    case = make_case(2, 10, 3, torch.float32, seed=0)
    call = lambda **kw: knn_interpolate_reference(  # noqa: E731
        case["logits"], case["dist"], kw.pop("ids", case["ids"]), **{"temperature": 1.0, "lam": 0.5, **kw})
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="metric"):
        call(metric="cosine")
    with pytest.raises(ValueError, match="lam"):
        call(lam=1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        call(ids=torch.full((2, 3), 10))
    # without validation (the sync-free serving path) out-of-range ids are treated as padding
    out = call(ids=torch.full((2, 3), 10), validate=False)
    assert torch.equal(out, torch.log_softmax(case["logits"], -1))
    out = knn_interpolate_sparse(case["logits"], case["dist"], torch.full((2, 3), 10), temperature=1.0, lam=0.5,
                                 validate=False)
    assert torch.equal(out, torch.log_softmax(case["logits"], -1))
    with pytest.raises(ValueError, match=BACKEND_ENV):
        os.environ[BACKEND_ENV] = "cuda-please"
        try:
            knn_interpolate(case["logits"], case["dist"], case["ids"], temperature=1.0, lam=0.5)
        finally:
            del os.environ[BACKEND_ENV]


# ------------------------------------------------------------------------------------------
# Triton vs reference
# ------------------------------------------------------------------------------------------

# (batch, vocab, k, dtype, metric, log_counts, temperature): small odd shapes for the
# interpreter; vocab 5000 > BLOCK_V (4096) and k 70/200 > the K tiles cover the loops' tails.
INTERPRET_CASES = [
    (1, 1, 1, "fp32", "l2", False, 1.0),
    (3, 17, 5, "bf16", "l2", True, 10.0),
    (7, 1000, 64, "fp16", "ip", False, 2.0),
    (2, 5000, 70, "bf16", "l2", True, 30.0),
    (3, 33, 200, "fp32", "ip", True, 0.5),
]


def check_triton_against_reference(device: str, cases=INTERPRET_CASES) -> list[dict]:
    """Run each case through Triton and the reference; raise AssertionError on a mismatch."""
    report = []
    for i, (batch, vocab, k, dtype, metric, counts, temp) in enumerate(cases):
        case = make_case(batch, vocab, k, DTYPES[dtype], seed=100 + i, metric=metric,
                         log_counts=counts, device=device)
        lam = case["lam"]
        if batch >= 3:
            lam[0], lam[2] = 0.0, 1.0
        args = dict(temperature=temp, lam=lam, log_counts=case["counts"], metric=metric)
        tri = knn_interpolate_triton(case["logits"], case["dist"], case["ids"], **args)
        ref = knn_interpolate_reference(case["logits"], case["dist"], case["ids"], **args)
        want = reference_float64(case["logits"], case["dist"], case["ids"], temperature=temp, lam=lam,
                                 counts=case["counts"], metric=metric)
        assert_logprobs_close(tri, ref)
        assert_logprobs_close(tri, want)
        if batch >= 3:
            assert torch.equal(tri[0], torch.log_softmax(case["logits"], -1, dtype=torch.float32)[0])
        finite = torch.isfinite(ref)
        report.append(dict(case=[batch, vocab, k, dtype, metric], max_abs_vs_reference=float(
            (tri[finite] - ref[finite]).abs().max()) if finite.any() else 0.0))
    return report


def _version(module) -> tuple[int, int]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


def test_triton_interpreter_matches_reference():
    """The Triton kernels on the CPU through TRITON_INTERPRET=1, in a fresh interpreter."""
    import triton

    if _version(triton) < (3, 9) and _version(np) >= (2, 5):
        pytest.skip(f"triton {triton.__version__}'s interpreter calls int() on 1-element arrays for loop "
                    f"bounds, which numpy {np.__version__} refuses (fixed by triton 3.9)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--interpret-check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == len(INTERPRET_CASES)


@gpu
@needs_cuda
def test_triton_cuda_matches_reference():
    cases = INTERPRET_CASES + [
        (64, 49152, 1024, "bf16", "l2", True, 30.0),
        (16, 49152, 64, "fp16", "ip", False, 1.0),
        (5, 151936, 16, "fp32", "l2", False, 10.0),
    ]
    check_triton_against_reference("cuda", cases)


@gpu
@needs_cuda
def test_dispatch_uses_triton_on_cuda_and_lambda_zero_is_exact():
    case = make_case(8, 49152, 64, torch.bfloat16, seed=5, device="cuda")
    lam = case["lam"]
    lam[::2] = 0.0
    out = knn_interpolate(case["logits"], case["dist"], case["ids"], temperature=10.0, lam=lam)
    tri = knn_interpolate_triton(case["logits"], case["dist"].cpu(), case["ids"].cpu(), temperature=10.0,
                                 lam=lam.cpu(), validate=False)
    assert torch.equal(out, tri)
    own = torch.log_softmax(case["logits"], -1, dtype=torch.float32)
    assert torch.equal(out[::2], own[::2])


# ------------------------------------------------------------------------------------------
# Exact search
# ------------------------------------------------------------------------------------------


def brute_force64(keys, queries, k, metric):
    """float64 brute force, FAISS conventions (for the GPU box, which has no faiss)."""
    kd, qd = keys.double(), queries.double()
    if metric == "ip":
        s = qd @ kd.T
    else:
        s = (qd * qd).sum(1, keepdim=True) - 2 * qd @ kd.T + (kd * kd).sum(1)[None]
    kk = min(k, keys.shape[0])
    d, i = torch.topk(s, kk, dim=1, largest=metric == "ip")
    return d.cpu().numpy(), i.cpu().numpy()


def assert_same_neighbours(D, I, D_ref, I_ref, keys, queries, metric, tol):
    """Distances close; where ids differ, the two answers are tied (the true distances agree)."""
    D, I = np.asarray(D), np.asarray(I)
    np.testing.assert_allclose(D, D_ref, rtol=tol, atol=tol * max(1.0, float(np.abs(D_ref).max())))
    diff = np.argwhere(I != I_ref)
    assert len(diff) <= max(1, I.size // 50), f"{len(diff)} of {I.size} ids differ"
    kd, qd = keys.double().cpu(), queries.double().cpu()
    for row, col in diff:
        a, b = kd[I[row, col]], kd[I_ref[row, col]]
        da = float(qd[row] @ a) if metric == "ip" else float(((qd[row] - a) ** 2).sum())
        db = float(qd[row] @ b) if metric == "ip" else float(((qd[row] - b) ** 2).sum())
        assert abs(da - db) <= tol * max(1.0, abs(db)), (row, col, da, db)


def seeded_vectors(n, d, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("chunk_size", [1, 100, 1037, 4096])
def test_exact_search_matches_faiss(metric, chunk_size):
    faiss = pytest.importorskip("faiss")
    keys, queries = seeded_vectors(1037, 24, 1), seeded_vectors(13, 24, 2)
    index = TorchExactIndex(keys, metric, "cpu", chunk_size=chunk_size)
    assert index.ntotal == 1037
    D, I = index.search(queries, 10)
    assert D.dtype == torch.float32 and I.dtype == torch.int64 and D.shape == (13, 10)
    flat = faiss.IndexFlatL2(24) if metric == "l2" else faiss.IndexFlatIP(24)
    flat.add(keys.numpy())
    D_ref, I_ref = flat.search(queries.numpy(), 10)
    assert_same_neighbours(D.numpy(), I.numpy(), D_ref, I_ref, keys, queries, metric, tol=1e-5)
    order = np.diff(D.numpy(), axis=1)
    assert (order >= 0).all() if metric == "l2" else (order <= 0).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_exact_search_k_larger_than_ntotal_matches_faiss_padding(metric):
    faiss = pytest.importorskip("faiss")
    keys, queries = seeded_vectors(7, 8, 3), seeded_vectors(4, 8, 4)
    D, I = TorchExactIndex(keys, metric, "cpu", chunk_size=3).search(queries, 10)
    flat = faiss.IndexFlatL2(8) if metric == "l2" else faiss.IndexFlatIP(8)
    flat.add(keys.numpy())
    D_ref, I_ref = flat.search(queries.numpy(), 10)
    np.testing.assert_array_equal(I.numpy(), I_ref)
    np.testing.assert_array_equal(D.numpy()[:, 7:], D_ref[:, 7:])
    assert D_ref[0, -1] == (FLT_MAX if metric == "l2" else -FLT_MAX)
    np.testing.assert_allclose(D.numpy()[:, :7], D_ref[:, :7], rtol=1e-5, atol=1e-5)


def test_exact_search_fp16_keys_match_faiss_on_rounded_data():
    faiss = pytest.importorskip("faiss")
    keys, queries = seeded_vectors(500, 32, 5), seeded_vectors(9, 32, 6)
    index = TorchExactIndex(keys, "l2", "cpu", dtype=torch.float16, chunk_size=128)
    D, I = index.search(queries, 5)
    flat = faiss.IndexFlatL2(32)
    flat.add(keys.half().float().numpy())
    D_ref, I_ref = flat.search(queries.half().float().numpy(), 5)
    assert_same_neighbours(D.numpy(), I.numpy(), D_ref, I_ref, keys.half(), queries.half(), "l2", tol=1e-4)


def test_exact_search_edges():
    keys = seeded_vectors(5, 4, 7)
    D, I = exact_search(keys, seeded_vectors(0, 4, 8), 3)
    assert D.shape == (0, 3) and I.shape == (0, 3)
    with pytest.raises(ValueError, match="metric"):
        TorchExactIndex(keys, "cosine", "cpu")
    with pytest.raises(ValueError, match="queries"):
        TorchExactIndex(keys, "ip", "cpu").search(seeded_vectors(2, 5, 9), 1)
    with pytest.raises(ValueError, match="overflow"):
        TorchExactIndex(keys * 1e6, "l2", "cpu", dtype=torch.float16)


@gpu
@needs_cuda
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_exact_search_cuda_fp16_matches_float64(metric):
    keys, queries = seeded_vectors(20011, 576, 10), seeded_vectors(37, 576, 11)
    index = TorchExactIndex(keys, metric, "cuda", chunk_size=4096)
    assert index.keys.dtype == torch.float16
    D, I = index.search(queries.cuda(), 64)
    D_ref, I_ref = brute_force64(keys.half(), queries.half(), 64, metric)
    assert_same_neighbours(D.cpu().numpy(), I.cpu().numpy(), D_ref, I_ref, keys.half(), queries.half(),
                           metric, tol=1e-4)
    D, I = TorchExactIndex(keys[:50], metric, "cuda").search(queries.cuda(), 64)  # k > ntotal
    assert (I[:, 50:] == -1).all() and (D[:, 50:].abs() == FLT_MAX).all()


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-check"]:
    # Run by test_triton_interpreter_matches_reference with TRITON_INTERPRET=1 in the environment.
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy's log(0) inside the interpreter
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps(check_triton_against_reference("cpu")))
