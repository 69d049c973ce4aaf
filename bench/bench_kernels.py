"""Kernel benchmark (needs a CUDA GPU): kNN-LM interpolation (Triton vs torch reference) and
exact search (fp16 keys vs a float32 torch matmul baseline). Not a test; prints a table and
writes JSON. `--cpu`: the interpolation on the CPU instead (the sparse torch path the engine uses
there vs the dense reference), single-threaded like vLLM's CPU engine process, medians of
perf_counter times.

    PYTHONPATH=. python bench/bench_kernels.py --out runs/bench_kernels.json   # from the repo root
    PYTHONPATH=. python bench/bench_kernels.py --cpu --batches 1 16 64 --ks 16 64 --out runs/bench_kernels_cpu.json

Times are medians from triton.testing.do_bench (CUDA events, L2 flushed between runs).
Interpolation is timed two ways: the public wrapper (argument checks, one host round trip,
the launches) and the three launches alone. Each shape also records the largest difference
between the two implementations. Floors: bytes that must move over a measured device-to-device
copy bandwidth; for search also 2·n·m·d flops over a measured fp16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

import torch

from kernels.exact_search import TorchExactIndex
from kernels.knn_interpolation import (
    _score_scale,
    knn_interpolate_reference,
    knn_interpolate_sparse,
    knn_interpolate_triton,
    launch_interpolation,
)

log = logging.getLogger("bench_kernels")
VOCAB = 49152  # SmolLM2's vocabulary
DIM = 576  # SmolLM2's hidden size (token-datastore key width)


def bench(fn) -> float:
    """Median milliseconds of fn() (do_bench flushes L2 before each run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and fp16 matmul rate."""
    src = torch.randn(256 * 1024 * 1024 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 4 / (ms * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms_mm = bench(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": bw / 1e9, "fp16_mm_TFLOPs": 2 * 8192**3 / (ms_mm * 1e-3) / 1e12}


def bench_interpolation(batches, ks, ceilings) -> list[dict]:
    rows_out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch in batches:
        for k in ks:
            logits = (3 * torch.randn(batch, VOCAB, device="cuda", generator=g)).to(torch.bfloat16)
            dist = 40 * torch.rand(batch, k, device="cuda", generator=g)
            ids = torch.randint(0, VOCAB, (batch, k), device="cuda", generator=g)
            counts = torch.log(torch.randint(1, 9, (batch, k), device="cuda", generator=g).float())
            lam = torch.full((batch,), 0.25, device="cuda")
            args = dict(temperature=30.0, lam=lam, log_counts=counts, validate=False)
            tri = knn_interpolate_triton(logits, dist, ids, **args)
            ref = knn_interpolate_reference(logits, dist, ids, **args)
            finite = torch.isfinite(ref)
            max_diff = float((tri[finite] - ref[finite]).abs().max())
            same_inf = bool(torch.equal(torch.isinf(tri), torch.isinf(ref)))
            out = torch.empty(batch, VOCAB, device="cuda")
            scale = _score_scale("l2", 30.0)
            t_ref = bench(lambda: knn_interpolate_reference(logits, dist, ids, **args))
            t_tri = bench(lambda: knn_interpolate_triton(logits, dist, ids, **args))
            t_launch = bench(lambda: launch_interpolation(logits, dist, ids, counts, lam, scale, out))
            # logits read twice (stats pass, output pass) + fp32 output written once
            nbytes = batch * VOCAB * (2 + 2 + 4) + batch * k * (4 + 8 + 4)
            floor_ms = nbytes / (ceilings["copy_GBps"] * 1e9) * 1e3
            rows_out.append(dict(B=batch, V=VOCAB, K=k, reference_ms=t_ref, triton_ms=t_tri,
                                 triton_launch_only_ms=t_launch, speedup=t_ref / t_tri,
                                 floor_ms=floor_ms, launch_GBps=nbytes / (t_launch * 1e-3) / 1e9,
                                 max_abs_diff=max_diff, same_inf_pattern=same_inf))
            log.info("interp %s", rows_out[-1])
    return rows_out


def bench_interpolation_cpu(batches, ks, repeats: int = 30) -> list[dict]:
    """Dense reference vs sparse path on one CPU thread (median ms), and their largest difference."""
    import statistics
    import time

    torch.set_num_threads(1)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1e3 * statistics.median(times)

    rows_out = []
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        for k in ks:
            logits = (3 * torch.randn(batch, VOCAB, generator=g)).to(torch.bfloat16)
            dist = 40 * torch.rand(batch, k, generator=g)
            ids = torch.randint(0, VOCAB, (batch, k), generator=g)
            lam = torch.full((batch,), 0.25)
            args = dict(temperature=30.0, lam=lam, validate=False)
            ref = knn_interpolate_reference(logits, dist, ids, **args)
            sparse = knn_interpolate_sparse(logits, dist, ids, **args)
            finite = torch.isfinite(ref)
            row = dict(B=batch, V=VOCAB, K=k,
                       reference_ms=median_ms(lambda: knn_interpolate_reference(logits, dist, ids, **args)),
                       sparse_ms=median_ms(lambda: knn_interpolate_sparse(logits, dist, ids, **args)),
                       log_softmax_ms=median_ms(lambda: torch.log_softmax(logits, -1, dtype=torch.float32)),
                       max_abs_diff=float((sparse[finite] - ref[finite]).abs().max()))
            row["speedup"] = row["reference_ms"] / row["sparse_ms"]
            rows_out.append(row)
            log.info("interp cpu %s", row)
    return rows_out


def cpu_main(args) -> None:
    result = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "python": platform.python_version(), "threads": 1,
              "interpolation_cpu": bench_interpolation_cpu(args.batches, args.ks)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("\nkNN-LM interpolation on one CPU thread, V=49152, bf16 logits (ms, median)")
    print(f"{'B':>4} {'K':>5} {'dense ref':>10} {'sparse':>8} {'log_softmax':>12} {'speedup':>8} {'max|diff|':>10}")
    for r in result["interpolation_cpu"]:
        print(f"{r['B']:>4} {r['K']:>5} {r['reference_ms']:>10.2f} {r['sparse_ms']:>8.2f} {r['log_softmax_ms']:>12.2f} "
              f"{r['speedup']:>7.1f}x {r['max_abs_diff']:>10.2e}")
    print(f"\nwrote {args.out}")


def bench_search(sizes, n_queries, k, ceilings) -> list[dict]:
    rows_out = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for ntotal in sizes:
        keys32 = torch.randn(ntotal, DIM, device="cuda", generator=g)
        variants = {
            "fp16-l2": TorchExactIndex(keys32, "l2", "cuda", dtype=torch.float16),
            "fp16-ip": TorchExactIndex(keys32, "ip", "cuda", dtype=torch.float16),
            "fp16-l2-chunk65536": TorchExactIndex(keys32, "l2", "cuda", dtype=torch.float16, chunk_size=65536),
            "fp32-l2": TorchExactIndex(keys32, "l2", "cuda", dtype=torch.float32),
        }
        for nq in n_queries:
            queries = torch.randn(nq, DIM, device="cuda", generator=g)
            base_d, base_i = variants["fp32-l2"].search(queries, k)
            for name, index in variants.items():
                d, i = index.search(queries, k)
                agree = float((i == base_i).float().mean()) if "l2" in name else None
                ms = bench(lambda: index.search(queries, k))
                key_bytes = ntotal * DIM * index.keys.element_size()
                floor_ms = max(key_bytes / (ceilings["copy_GBps"] * 1e9),
                               2 * nq * ntotal * DIM / (ceilings["fp16_mm_TFLOPs"] * 1e12)) * 1e3
                rows_out.append(dict(ntotal=ntotal, queries=nq, k=k, variant=name, ms=ms,
                                     floor_ms=floor_ms, qps=nq / (ms * 1e-3),
                                     id_agreement_vs_fp32=agree))
                log.info("search %s", rows_out[-1])
        del variants, keys32
        torch.cuda.empty_cache()
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernels.json"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 1024])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--cpu", action="store_true", help="interpolation on the CPU (sparse vs dense reference)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cpu:
        return cpu_main(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    import triton

    ceilings = measure_ceilings()
    try:  # does exact search get fp32 accumulation+output from fp16 operands without upcasting?
        a = torch.randn(4, 8, device="cuda", dtype=torch.float16)
        mm_out_dtype = torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        mm_out_dtype = False
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "ceilings": ceilings,
        "mm_out_dtype_fp32": mm_out_dtype,
        "interpolation": bench_interpolation(args.batches, args.ks, ceilings),
        "search": bench_search(args.sizes, args.queries, args.k, ceilings),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  "
          f"copy {ceilings['copy_GBps']:.0f} GB/s  fp16 mm {ceilings['fp16_mm_TFLOPs']:.0f} TFLOP/s  "
          f"mm(out_dtype=fp32) {'yes' if mm_out_dtype else 'no (upcast)'}")
    print("\nkNN-LM interpolation, V=49152, bf16 logits (ms, median)")
    print(f"{'B':>4} {'K':>5} {'torch ref':>10} {'triton':>8} {'launches':>9} {'floor':>7} {'speedup':>8} {'max|diff|':>10}")
    for r in result["interpolation"]:
        print(f"{r['B']:>4} {r['K']:>5} {r['reference_ms']:>10.4f} {r['triton_ms']:>8.4f} "
              f"{r['triton_launch_only_ms']:>9.4f} {r['floor_ms']:>7.4f} {r['speedup']:>7.1f}x {r['max_abs_diff']:>10.2e}")
    print(f"\nexact search, d={DIM}, k={args.k} (ms, median)")
    print(f"{'ntotal':>8} {'nq':>4} {'variant':>20} {'ms':>8} {'floor':>7} {'ids = fp32':>10}")
    for r in result["search"]:
        agree = "" if r["id_agreement_vs_fp32"] is None else f"{r['id_agreement_vs_fp32']:.4f}"
        print(f"{r['ntotal']:>8} {r['queries']:>4} {r['variant']:>20} {r['ms']:>8.3f} {r['floor_ms']:>7.3f} {agree:>10}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
