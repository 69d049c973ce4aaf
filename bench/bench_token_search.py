"""How fast can one engine step's kNN-LM search be, and what does a compressed index change in p_kNN?

kNN-LM searches the token datastore once per engine step for every token-mode row (server/knn/model.py),
inside vLLM's engine process, on the one core vLLM's CPU backend gives it. This measures that search
alone, single-threaded, for a batch of `--batch` queries (16: the concurrency of the issue's target),
for index candidates built with the datastore builder's own code (datastore_tools.index_factory):
- queries: the served model's hidden states over held-out text (token_build.document_keys on the
  given files, the same function that computes the keys; never in the datastore);
- reference: exact squared-L2 search (faiss.knn over the keys, no index);
- per candidate: search ms per batch (median and p90), bytes per entry, recall@k of the exact
  k nearest, and the total variation distance between the exact and the candidate's p_kNN
  (softmax(-d/T) over each neighbour's next token, as the server mixes it; 0 = identical).
`--entries` above the datastore's size extends the real keys with mixes of two of them plus noise
(for timing at a larger datastore than this machine can build; recall there is indicative only).

    .venv/bin/python bench/bench_token_search.py --token-datastore runs/pydocs/token-small \\
        --queries-from $(cat runs/pydocs/test_docs.txt) --output runs/bench_token_search.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datastore_tools.index_factory import build_index  # noqa: E402
from server.knn.settings import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE  # noqa: E402

log = logging.getLogger("bench_token_search")

CANDIDATES = [
    # (factory, search params to try); RFlat re-ranks the fast-scan short list with the exact keys.
    ("IVF{nlist},Flat", [{"nprobe": 32}, {"nprobe": 8}]),
    ("IVF{nlist},PQ{half}x4fs,RFlat", [{"nprobe": 32, "k_factor_rf": 4}, {"nprobe": 16, "k_factor_rf": 4},
                                      {"nprobe": 8, "k_factor_rf": 4}, {"nprobe": 32, "k_factor_rf": 2}]),
    ("IVF{nlist},PQ{quarter}x4fs,RFlat", [{"nprobe": 32, "k_factor_rf": 4}, {"nprobe": 16, "k_factor_rf": 8}]),
    ("HNSW32,Flat", [{"efSearch": 128}]),
]


def held_out_queries(files: list[Path], model_dir: Path, max_chars: int, cache: Path | None) -> np.ndarray:
    """Hidden states [n, hidden] over the first `max_chars` of each file (cached in `cache`)."""
    if cache is not None and cache.is_file():
        return np.load(cache)
    from artefacts.tokenizer import document_start_ids
    from datastore_tools import chunking
    from datastore_tools.token_build import document_keys, key_dtype, load_key_model

    tokenizer = chunking.load_tokenizer(model_dir)
    model = load_key_model(model_dir, key_dtype(model_dir))
    start = document_start_ids(tokenizer)
    states = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")[:max_chars]
        ids = start + tokenizer(text, add_special_tokens=False)["input_ids"]
        states.append(document_keys(model, ids, window=512, stride=448))
    queries = np.ascontiguousarray(np.concatenate(states), dtype=np.float32)
    if cache is not None:
        np.save(cache, queries)
    return queries


def extend(keys: np.ndarray, values: np.ndarray, entries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`entries` keys: the real ones, then mixes of two real keys plus noise at 5% of the keys' spread
    (each mix takes the value of its heavier parent)."""
    extra = entries - len(keys)
    if extra <= 0:
        return keys[:entries], values[:entries]
    rs = np.random.RandomState(seed)
    a, b = rs.randint(0, len(keys), extra), rs.randint(0, len(keys), extra)
    w = rs.uniform(0.6, 1.0, (extra, 1)).astype(np.float32)
    spread = float(keys.std())
    out = np.empty((entries, keys.shape[1]), dtype=np.float32)
    out[: len(keys)] = keys
    for start in range(0, extra, 262_144):
        s = slice(start, min(extra, start + 262_144))
        out[len(keys) + s.start: len(keys) + s.stop] = (
            w[s] * keys[a[s]] + (1 - w[s]) * keys[b[s]]
            + 0.05 * spread * rs.randn(s.stop - s.start, keys.shape[1]).astype(np.float32))
    return out, np.concatenate([values, values[a]])


def p_knn(distances: np.ndarray, ids: np.ndarray, values: np.ndarray, temperature: float) -> list[dict]:
    """Per row: {token: probability} of softmax(-d/T) over the neighbours' next tokens."""
    out = []
    for d, i in zip(distances, ids):
        keep = i >= 0
        logits = -d[keep].astype(np.float64) / temperature
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        row: dict[int, float] = {}
        for token, weight in zip(values[i[keep]], weights):
            row[int(token)] = row.get(int(token), 0.0) + float(weight)
        out.append(row)
    return out


def total_variation(p: list[dict], q: list[dict]) -> np.ndarray:
    return np.array([0.5 * sum(abs(a.get(t, 0.0) - b.get(t, 0.0)) for t in set(a) | set(b)) for a, b in zip(p, q)])


def time_search(index, queries: np.ndarray, k: int, batch: int, repeats: int) -> tuple[float, float]:
    """Median and p90 ms of one search of `batch` queries (consecutive batches over `queries`)."""
    times = []
    for r in range(repeats):
        start = (r * batch) % max(1, len(queries) - batch)
        q = queries[start: start + batch]
        began = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - began)
    return 1e3 * float(np.median(times)), 1e3 * float(np.percentile(times, 90))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token-datastore", type=Path, required=True)
    parser.add_argument("--queries-from", type=Path, nargs="+", required=True, help="held-out text files")
    parser.add_argument("--model", type=Path, default=None, help="prepared model (default: the cache's)")
    parser.add_argument("--max-chars", type=int, default=2000, help="characters of each file turned into queries")
    parser.add_argument("--query-cache", type=Path, default=None, help="keep the queries' hidden states here (.npy)")
    parser.add_argument("--entries", type=int, default=None, help="extend the keys to this many (timing)")
    parser.add_argument("--train-sample", type=int, default=None,
                        help="train each index on this many random keys (FAISS directly; for extended runs, where "
                             "k-means over every key would take longer than the searches measured)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4 sqrt(entries), a power of 2)")
    parser.add_argument("--k", type=int, default=DEFAULT_KNN_K)
    parser.add_argument("--temperature", type=float, default=DEFAULT_KNN_TEMPERATURE)
    parser.add_argument("--batch", type=int, default=16, help="queries per search (rows of one engine step)")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--quality-queries", type=int, default=1024, help="queries scored for recall and p_kNN")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (the engine process has 1 core)")
    parser.add_argument("--only", nargs="*", default=None, help="factories (as in CANDIDATES) to run")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from artefacts import paths
    from datastore_tools.token_prune import read_keys
    from retriever.token_datastore import TokenDatastore

    store = TokenDatastore.open(args.token_datastore, device="cpu")
    keys, _ = read_keys(store.index)
    values = np.asarray(store.values)
    real_entries = len(keys)
    if args.entries:
        keys, values = extend(keys, values, args.entries)
    model_dir = args.model or paths.default_model_dir()
    queries = held_out_queries(args.queries_from, model_dir, args.max_chars, args.query_cache)
    faiss.omp_set_num_threads(args.threads)
    rs = np.random.RandomState(1)
    scored = queries[np.sort(rs.choice(len(queries), min(args.quality_queries, len(queries)), replace=False))]
    n = len(keys)
    nlist = args.nlist or 2 ** round(np.log2(4 * np.sqrt(n)))
    log.info("%d keys (%d real), %d queries (%d scored), nlist %d", n, real_entries, len(queries), len(scored), nlist)

    started = time.perf_counter()
    exact_d, exact_i = faiss.knn(scored, keys, args.k)
    exact_s = time.perf_counter() - started
    exact_p = p_knn(exact_d, exact_i, values, args.temperature)

    class Exact:  # the keys searched as they are (IndexFlatL2 without its own copy)
        @staticmethod
        def search(q, k):
            return faiss.knn(q, keys, k)

    p50, p90 = time_search(Exact, queries, args.k, args.batch, max(3, args.repeats // 10))
    rows = [{"factory": "Flat (exact)", "params": {}, "bytes_per_entry": 4 * keys.shape[1],
             "search_ms_p50": p50, "search_ms_p90": p90, "recall": 1.0, "tv_mean": 0.0, "tv_p90": 0.0}]
    log.info("exact reference: %.1f s for %d queries", exact_s, len(scored))
    half, quarter = keys.shape[1] // 2, keys.shape[1] // 4
    for template, settings in CANDIDATES:
        factory = template.format(nlist=nlist, half=half, quarter=quarter)
        if args.only is not None and template not in args.only and factory not in args.only:
            continue
        if args.train_sample:
            started = time.perf_counter()
            index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
            index.train(keys[np.sort(rs.choice(n, min(n, args.train_sample), replace=False))])
            trained = time.perf_counter()
            index.add(keys)
            info = {"seconds": {"train": trained - started, "add": time.perf_counter() - trained}}
        else:
            index, info = build_index(keys, factory, metric="l2")
        size = faiss.serialize_index(index).nbytes if n <= 400_000 else None
        log.info("%s built: train %.0f s, add %.0f s", factory, info["seconds"]["train"], info["seconds"]["add"])
        for params in settings:
            space = faiss.ParameterSpace()
            for name, value in params.items():
                space.set_index_parameter(index, name, value)
            p50, p90 = time_search(index, queries, args.k, args.batch, args.repeats)
            found_d, found_i = index.search(scored, args.k)
            recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found_i, exact_i)]))
            tv = total_variation(exact_p, p_knn(found_d, found_i, values, args.temperature))
            row = {"factory": factory, "params": params, "build_seconds": info["seconds"],
                   "bytes_per_entry": None if size is None else size / n,
                   "search_ms_p50": p50, "search_ms_p90": p90, "recall": recall,
                   "tv_mean": float(tv.mean()), "tv_p90": float(np.percentile(tv, 90))}
            log.info("%s %s: %.2f ms p50, recall@%d %.3f, TV %.4f", factory, params, p50, args.k, recall, tv.mean())
            rows.append(row)
        del index

    print(f"{'index':<34} {'params':<30} {'B/entry':>8} {'ms p50':>7} {'ms p90':>7} "
          f"{'recall@' + str(args.k):>9} {'TV mean':>8} {'TV p90':>7}")
    for row in rows:
        size = "" if row["bytes_per_entry"] is None else f"{row['bytes_per_entry']:.0f}"
        params = ",".join(f"{k}={v}" for k, v in row["params"].items())
        print(f"{row['factory']:<34} {params:<30} {size:>8} {row['search_ms_p50']:>7.2f} {row['search_ms_p90']:>7.2f} "
              f"{row['recall']:>9.3f} {row['tv_mean']:>8.4f} {row['tv_p90']:>7.4f}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "invocation": " ".join(["python bench/bench_token_search.py", *(argv if argv is not None else sys.argv[1:])]),
            "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "entries": n, "real_entries": real_entries, "nlist": nlist, "queries": len(queries),
            "scored_queries": len(scored), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
