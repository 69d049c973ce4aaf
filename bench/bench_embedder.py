"""Embedder speed and quality: chunks/s of each backend and batch size, recall@10 against float32.

Real 64-token chunks of the Python 3.11 docs (Debian python3.11-doc), cut with the serving
tokenizer; `--corpus` chunks are embedded by each (backend, batch size) side by side in one
process, and `--queries` other chunks search them exactly. Recall@10 and the smallest cosine are
measured against the float32 torch backend at batch 32. Not a test; prints a table, writes JSON.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_embedder.py --model DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_datastore import SOURCES, exact_top10, recall_at_10  # noqa: E402
from datastore_tools import chunking, ingest  # noqa: E402
from retriever.encoder import QueryEncoder  # noqa: E402

# ("torch", 256) is the configuration ../shared/FACTS.md timed as "plain sentence-transformers" (~30 chunks/s).
RUNS = [("torch", 256), ("torch", 32), ("torch", 16), ("torch-bf16", 128), ("torch-bf16", 32), ("torch-bf16", 16),
        ("torch-bf16", 8)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model dir whose tokenizer cuts the chunks")
    parser.add_argument("--sources", type=Path, default=SOURCES)
    parser.add_argument("--corpus", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embedder.json")
    args = parser.parse_args()

    documents, _ = ingest.read_documents(sorted(args.sources.rglob("*.txt"))[:200])
    chunks = chunking.chunk_documents(documents, chunking.load_tokenizer(args.model), 64)
    picked = np.random.RandomState(0).choice(len(chunks), args.corpus + args.queries, replace=False)
    corpus = [chunks[i].text for i in picked[: args.corpus]]
    queries = [chunks[i].text for i in picked[args.corpus :]]

    encoders: dict[str, QueryEncoder] = {}
    results = []
    for backend, batch in RUNS:
        encoder = encoders.setdefault(backend, QueryEncoder(backend=backend))
        encoder.encode(corpus[:64], batch_size=batch)  # warm-up: kernels for this batch shape
        started = time.perf_counter()
        db = encoder.encode(corpus, batch_size=batch)
        seconds = time.perf_counter() - started
        results.append((backend, batch, len(corpus) / seconds, db, encoder.encode(queries, batch_size=batch)))

    reference = next(r for r in results if r[0] == "torch" and r[1] == 32)
    truth = exact_top10(reference[3], reference[4])
    rows = []
    print(f"{'backend':12s} {'batch':>5s} {'chunks/s':>9s} {'vs fp32 b32':>11s} {'recall@10':>9s} {'min cos':>8s}")
    for backend, batch, rate, db, q in results:
        row = {"backend": backend, "batch": batch, "chunks_per_s": rate, "speedup_vs_fp32_b32": rate / reference[2],
               "recall_at_10_vs_fp32": recall_at_10(exact_top10(db, q), truth),
               "min_cosine_vs_fp32": float((db * reference[3]).sum(1).min())}
        rows.append(row)
        print(f"{backend:12s} {batch:5d} {rate:9.1f} {row['speedup_vs_fp32_b32']:10.2f}x "
              f"{row['recall_at_10_vs_fp32']:9.3f} {row['min_cosine_vs_fp32']:8.5f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"corpus": len(corpus), "queries": len(queries), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
