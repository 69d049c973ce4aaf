"""Sharded search on loopback: 1, 2 and 4 `retroserve retriever serve` processes against the same
datastore searched locally. Not a test; prints a table and writes JSON.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_shards.py --model DIR                  # default corpus
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_shards.py --model DIR --entries 100000 # + synthetic

Measured here is the search as the server's batcher calls it, from query embeddings to merged
neighbours with payloads: `FanoutSearcher.search_embeddings` (gRPC to every shard, each shard's
FAISS search and LMDB reads, top-k merge) against `Datastore.search_embeddings` (FAISS + LMDB in
process). Embedding is left out: the server embeds once whatever the shard count. Each shard
process and the local search get the same FAISS thread count (`--threads`), so "1 shard vs local"
isolates the fan-out's cost; with more shards than cores the shards compete for the CPU.

`--entries N` first grows the datastore to N entries with bench_datastore.augment (each extra
vector a normalised mix of two real chunk embeddings plus noise, its payload the first chunk's,
one document per entry), so search cost rather than the fan-out dominates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

log = logging.getLogger("bench_shards")


def default_datastore(work: Path, model: Path) -> Path:
    """The server's default datastore (pydoc_data.topics), built once under `work`."""
    from datastore_tools.build import BuildConfig, build_datastore

    path = work / "pydoc-topics"
    if not (path / "manifest.json").is_file():
        log.info("building the default datastore into %s (about 2 minutes)", path)
        build_datastore(BuildConfig(output=path, model_dir=model, default_corpus=True, index="Flat", progress=False))
    return path


def augmented_datastore(base: Path, entries: int, work: Path) -> Path:
    """`base` grown to `entries` Flat entries (see the module docstring), built once under `work`."""
    import faiss

    from bench_datastore import augment
    from datastore_tools import index_factory, payloads
    from datastore_tools.manifest import make_manifest, write_manifest
    from retriever import format as fmt
    from retriever.datastore import PayloadReader, read_manifest

    path = work / f"{base.name}-{entries}"
    if (path / "manifest.json").is_file():
        return path
    real = np.load(base / fmt.EMBEDDINGS_FILE).astype(np.float32)
    vectors = augment(real, entries, seed=0)
    rs = np.random.RandomState(0)  # augment's first draw: the chunk each extra entry mostly mixes
    source_of = np.concatenate([np.arange(len(real)), rs.randint(0, len(real), entries - len(real))])
    reader = PayloadReader(base / fmt.PAYLOADS_DIR)
    chunks = dict(reader.iter_chunks())
    docs = dict(reader.iter_docs())
    reader.close()
    chunk_records, doc_records = [], [(i, fmt.dumps(docs[i])) for i in sorted(docs)]
    for entry, source in enumerate(source_of.tolist()):
        record = dict(chunks[source])
        if entry >= len(real):
            doc_id = len(doc_records)
            doc_records.append((doc_id, fmt.dumps({"source": f"synthetic:{entry}", "title": "", "chunks": [entry, 1]})))
            record.update(doc=doc_id, pos=0, next=-1)
        chunk_records.append((entry, fmt.dumps(record)))
    stage = work / f"{path.name}.partial"
    stage.mkdir(parents=True, exist_ok=True)
    index, info = index_factory.build_index(vectors, "Flat")
    faiss.write_index(index, str(stage / fmt.INDEX_FILE))
    payloads.write_encoded_payloads(stage, chunk_records, doc_records)
    np.save(stage / fmt.EMBEDDINGS_FILE, vectors.astype(np.float16))
    manifest = read_manifest(base)
    write_manifest(stage, make_manifest(
        name=path.name, tokenizer=manifest["tokenizer"], model=manifest.get("model"), embedder=manifest["embedder"],
        chunk_tokens=manifest["chunk_tokens"], index_info=info,
        counts={"documents": len(doc_records), "chunks": entries},
        build={"operation": {"augment": {"from": str(base), "entries": entries}}, "seconds": info["seconds"]},
    ))
    os.replace(stage, path)
    return path


def query_vectors(datastore: Path, n: int) -> np.ndarray:
    """Stored chunk embeddings plus noise, normalised: near real queries, never exact duplicates."""
    stored = np.load(datastore / "embeddings.npy").astype(np.float32)
    rs = np.random.RandomState(1)
    picked = stored[rs.randint(0, len(stored), n)] + 0.3 * rs.randn(n, stored.shape[1]).astype(np.float32)
    return picked / np.linalg.norm(picked, axis=1, keepdims=True)


def measure(search, queries: np.ndarray, batch: int, repeats: int, k: int) -> dict:
    """Closed loop, one call at a time: p50/p99 latency and queries per second."""
    for warm in range(3):
        search(queries[warm * batch : (warm + 1) * batch], k)
    times, overheads = [], []
    for r in range(repeats):
        start = (r * batch) % (len(queries) - batch)
        block = queries[start : start + batch]
        t = time.perf_counter()
        results = search(block, k)
        elapsed = time.perf_counter() - t
        times.append(elapsed)
        shard_seconds = getattr(results, "shard_seconds", None)
        if shard_seconds:
            overheads.append(elapsed - max(shard_seconds.values()))
    ms = np.asarray(times) * 1e3
    out = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "queries_per_s": batch * len(times) / float(np.sum(times))}
    if overheads:
        out["merge_p50_ms"] = float(np.percentile(np.asarray(overheads) * 1e3, 50))
    return out


def same_results(local, sharded, queries: np.ndarray, k: int) -> bool:
    want, got = local(queries, k), sharded(queries, k)
    return all(list(a) == list(b) for a, b in zip(want, got))


def run(datastore: Path, shard_counts: list[int], work: Path, args) -> dict:
    import faiss

    from datastore_tools.shard import shard_datastore, shard_dir
    from loopback import RetrieverProcess
    from retriever.datastore import Datastore
    from retriever.fanout import FanoutSearcher

    faiss.omp_set_num_threads(args.threads)
    queries = query_vectors(datastore, max(2000, 64 * 32))
    report = {"datastore": str(datastore), "threads": args.threads, "k": args.k, "rows": {}}
    with Datastore.open(datastore, device="cpu") as local:
        report["entries"] = local.ntotal
        local_search = local.search_embeddings
        report["rows"]["local"] = {f"batch{b}": measure(local_search, queries, b, args.repeats[i], args.k)
                                   for i, b in enumerate(args.batches)}
        log.info("local: %s", report["rows"]["local"])
        for count in shard_counts:
            output = work / f"{datastore.name}-shards-{count}"
            if not output.exists():
                shard_datastore(datastore, output, count)
            processes = [RetrieverProcess(shard_dir(output, i), omp_threads=args.threads) for i in range(count)]
            try:
                searcher = FanoutSearcher.connect([p.address for p in processes], timeout_s=args.timeout_s)
                try:
                    equal = same_results(local_search, searcher.search_embeddings, queries[:32], args.k)
                    row = {f"batch{b}": measure(searcher.search_embeddings, queries, b, args.repeats[i], args.k)
                           for i, b in enumerate(args.batches)}
                    row["equal_to_local"] = equal
                    report["rows"][f"{count} shard{'s' * (count > 1)}"] = row
                    log.info("%d shards: %s", count, row)
                finally:
                    searcher.close()
            finally:
                for process in processes:
                    process.terminate()
    return report


def table(report: dict, batches: list[int]) -> str:
    local = report["rows"]["local"]
    lines = [f"datastore {report['datastore']} ({report['entries']} entries, Flat), k={report['k']}, "
             f"{report['threads']} FAISS thread(s) per process",
             "| setup | " + " | ".join(f"b{b} p50 ms | b{b} p99 ms | b{b} q/s | b{b} p50 vs local" for b in batches)
             + " | merge+wait p50 ms (b32) | equal |",
             "| --- |" + " ---: |" * (4 * len(batches) + 2)]
    for name, row in report["rows"].items():
        cells = []
        for b in batches:
            m = row[f"batch{b}"]
            ratio = m["p50_ms"] / local[f"batch{b}"]["p50_ms"]
            cells += [f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}", f"{m['queries_per_s']:.0f}", f"{ratio:.2f}x"]
        last = row[f"batch{batches[-1]}"]
        merge = f"{last['merge_p50_ms']:.2f}" if "merge_p50_ms" in last else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {merge} | {row.get('equal_to_local', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="prepared model dir (its tokenizer cuts the corpus)")
    parser.add_argument("--datastore", type=Path, default=None, help="datastore to shard (default: the default corpus)")
    parser.add_argument("--entries", type=int, default=None, help="grow the datastore to this many entries first")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, nargs="+", default=[300, 60], help="calls per batch size")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads per process (shards and local)")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retroserve-bench-shards")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench_shards.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.datastore is None:
        from artefacts import paths

        args.datastore = default_datastore(args.work, args.model or paths.default_model_dir())
    datastore = augmented_datastore(args.datastore, args.entries, args.work) if args.entries else args.datastore
    report = run(datastore, args.shards, args.work, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report, args.batches))


if __name__ == "__main__":
    main()
