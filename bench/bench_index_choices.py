"""Which compressed index keeps recall@10 >= 0.9 at <= 1/8 of Flat's bytes, and how fast is it?

Uses a built datastore's stored embeddings (embeddings.npy: real MiniLM vectors of real chunks),
extended to `--entries` vectors the way bench_datastore.py does (normalised mixes of two real
vectors plus noise), and queries embedded from held-out text (never in the datastore). Every
candidate is built with the datastore builder's own code (datastore_tools.index_factory) and
measured against exact search (FAISS IndexFlatIP). Not a test; prints a table and writes JSON.

    .venv/bin/python bench/bench_index_choices.py --datastore DIR --queries-from FILE...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_datastore import augment, exact_top10, recall_at_10, search_latency  # noqa: E402
from datastore_tools.index_factory import build_index  # noqa: E402

CANDIDATES = [
    # (label, factory, pca, nprobe values to try). Flat stores 1536 B/entry, so 8x fewer is <= 192 B,
    # and at 100k entries IVF1024's centroids (15.7 B/entry at 384-d) and ids (8 B) count too.
    ("IVF1024,PQ96", "IVF1024,PQ96", None, (32, 64)),
    ("IVF1024,PQ128", "IVF1024,PQ128", None, (32, 64)),
    ("IVF1024,PQ192", "IVF1024,PQ192", None, (16, 32, 64)),
    ("IVF1024,SQ4", "IVF1024,SQ4", None, (32, 64)),
    ("PCA192+IVF1024,SQ8", "IVF1024,SQ8", 192, (32, 64)),
    ("OPQ128+IVF1024,PQ128", "OPQ128,IVF1024,PQ128", None, (16, 32, 64)),
    # PCA first, then 2-d sub-quantizers: fewer, finer codes per byte.
    ("PCA256+IVF1024,PQ128", "IVF1024,PQ128", 256, (16, 32, 64)),
    ("PCA320+IVF1024,PQ160", "IVF1024,PQ160", 320, (16, 32, 64)),
    # 4-bit fast-scan PQ (SIMD in-register lookups): the latency candidates.
    ("IVF1024,PQ192x4fs", "IVF1024,PQ192x4fs", None, (16, 32, 64)),
    ("PCA256+IVF1024,PQ256x4fs", "IVF1024,PQ256x4fs", 256, (16, 32, 64)),
    ("PCA320+IVF1024,PQ320x4fs", "IVF1024,PQ320x4fs", 320, (16, 32, 64)),
    # One 4-bit code per dimension (16 trained levels each), fast-scan. Fewer, larger IVF lists lose
    # less recall to the coarse step; at 100k entries ids (8 B) and centroids still count, so 8x
    # needs PCA to ~336 dims or no IVF at all (an exhaustive fast-scan, no ids stored).
    ("IVF256,PQ384x4fs", "IVF256,PQ384x4fs", None, (8, 16, 32)),
    ("PCA336+IVF256,PQ336x4fs", "IVF256,PQ336x4fs", 336, (8, 16, 32)),
    ("PCA320+IVF256,PQ320x4fs", "IVF256,PQ320x4fs", 320, (8, 16, 32)),
    ("PQ384x4fs", "PQ384x4fs", None, (None,)),
    ("PCA320+PQ320x4fs", "PQ320x4fs", 320, (None,)),
]


def query_vectors(files: list[Path], count: int, model_dir: Path | None, backend: str) -> np.ndarray:
    """`count` 64-token chunks of held-out files, embedded with the datastore's embedder."""
    from datastore_tools import chunking, ingest
    from retriever.encoder import QueryEncoder

    documents, _ = ingest.read_documents(files)
    tokenizer = chunking.load_tokenizer(model_dir)
    chunks = chunking.chunk_documents(documents, tokenizer, 64)
    picked = np.random.RandomState(0).choice(len(chunks), min(count, len(chunks)), replace=False)
    return QueryEncoder(backend=backend).encode([chunks[i].text for i in sorted(picked)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datastore", type=Path, required=True)
    parser.add_argument("--queries-from", type=Path, nargs="+", required=True, help="held-out files")
    parser.add_argument("--model", type=Path, required=True, help="model dir whose tokenizer cuts the queries")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all)")
    parser.add_argument("--only", nargs="+", default=None, help="labels of CANDIDATES to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "index_choices.json")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    real = np.load(args.datastore / "embeddings.npy").astype(np.float32)
    db = augment(real, args.entries) if args.entries > len(real) else real[: args.entries]
    manifest = args.datastore / "manifest.json"
    backend = json.loads(manifest.read_text())["embedder"]["backend"] if manifest.is_file() else "auto"
    queries = query_vectors(args.queries_from, args.queries, args.model, backend).astype(np.float32)
    truth = exact_top10(db, queries)
    flat_bytes = db.shape[1] * 4
    rows = []
    print(f"{len(real)} real vectors extended to {len(db)}; {len(queries)} held-out queries; Flat {flat_bytes} B/entry")
    print(f"{'index':26s} {'nprobe':>6s} {'B/entry':>8s} {'x fewer':>7s} {'recall@10':>9s} {'b1 p50':>7s} "
          f"{'b32 p50':>8s} {'b32 p99':>8s}")
    for label, factory, pca, probes in CANDIDATES:
        if args.only and label not in args.only:
            continue
        started = time.perf_counter()
        index, _ = build_index(db, factory, pca)
        build_s = time.perf_counter() - started
        size = len(faiss.serialize_index(index)) / len(db)
        for nprobe in probes:
            if nprobe is not None:
                faiss.extract_index_ivf(index).nprobe = nprobe
            recall = recall_at_10(index.search(queries, 10)[1], truth)
            p50_1, _ = search_latency(index, queries, 1, 100)
            p50_32, p99_32 = search_latency(index, queries, 32, 40)
            row = {"index": label, "factory": factory, "pca": pca, "nprobe": nprobe, "bytes_per_entry": size,
                   "compression": flat_bytes / size, "recall_at_10": recall, "p50_ms_batch1": p50_1,
                   "p50_ms_batch32": p50_32, "p99_ms_batch32": p99_32, "build_s": build_s}
            rows.append(row)
            print(f"{label:26s} {nprobe or 0:6d} {size:8.1f} {flat_bytes / size:7.1f} {recall:9.3f} {p50_1:7.2f} "
                  f"{p50_32:8.2f} {p99_32:8.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"entries": len(db), "real": len(real), "queries": len(queries), "rows": rows},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
