"""`retroserve datastore <command>`: argument definitions and runners, wired by server/cli/main.py.

Each command has `add_<cmd>_arguments(parser)` and `run_<cmd>(args) -> int`. User-fixable problems
(DatastoreToolError, retriever.DatastoreError) print `error: ...` on stderr and return 2;
`verify` returns 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

COMMANDS = {
    "build": "build a datastore from files, folders and/or the built-in corpus",
    "info": "show a datastore's manifest summary, sizes and counts",
    "verify": "check checksums and index/payload consistency",
    "search": "query a datastore with text",
    "prune": "write a copy without duplicate / never-retrieved chunks (token mode: greedy-merged entries)",
    "reduce": "write a copy re-encoded to fewer dimensions with PCA, or under another index",
    "bm25": "add a BM25 index to a chunk datastore, in place (retrievers bm25 and fusion)",
    "gate": "train a token datastore's learned kNN-LM gate on held-out text, in place (adaptive retrieval)",
    "shard": "split into N shards that share one trained index (for `retroserve retriever serve`)",
}


def handles_errors(run, extra: tuple[type[Exception], ...] = ()):
    """Map user-fixable errors (and `extra` ones) to exit code 2 with one `error:` line."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        from datastore_tools.errors import DatastoreToolError
        from retriever.datastore import DatastoreError
        from retriever.encoder import EncoderError

        try:
            return run(args)
        except (DatastoreToolError, DatastoreError, EncoderError, *extra) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapper


def _default_model_dir() -> Path:
    from artefacts import paths

    return paths.default_model_dir()


# ---- build -------------------------------------------------------------------------------------

def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    from retriever.encoder import BACKENDS, BUILD_BACKEND, DEFAULT_BATCH_SIZE

    parser.add_argument("inputs", nargs="*", type=Path, help="files or folders (.txt .md .rst .html .htm .jsonl)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="datastore directory to publish (default: the server's default datastore)")
    parser.add_argument("--default-corpus", action="store_true", help="include pydoc_data.topics (Python reference)")
    parser.add_argument("--model", type=Path, default=None,
                        help="serving model directory whose tokenizer cuts the chunks (default: the prepared model)")
    parser.add_argument("--chunk-tokens", type=int, default=64)
    parser.add_argument("--index", default=None, help="FAISS factory string, e.g. Flat, HNSW32,Flat, IVF512,PQ96 "
                        "(default: chosen by size)")
    parser.add_argument("--pca", type=int, default=None, help="reduce embeddings to DIM with PCA in the index")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF probes stored as the search default")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch stored as the search default")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--jsonl-field", default="text")
    parser.add_argument("--on-undecodable", choices=("skip", "replace", "fail"), default="skip",
                        help="files that are not UTF-8: skip with a warning, replace bad bytes, or fail")
    parser.add_argument("--embedder-backend", choices=("auto", *BACKENDS), default=BUILD_BACKEND,
                        help="auto: torch-bf16 where bf16 is native (2.2x), else torch")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--shard-size", type=int, default=1024, help="chunks per resumable checkpoint")
    parser.add_argument("--no-embeddings", dest="keep_embeddings", action="store_false",
                        help="do not store raw fp16 embeddings (prune/reduce will re-embed)")
    parser.add_argument("--no-bm25", dest="bm25", action="store_false",
                        help="do not index the chunk texts with BM25 (then only the dense retriever serves it)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--force", action="store_true", help="replace an existing datastore")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    token = parser.add_argument_group("token mode (kNN-LM; datastore_tools/token_build.py)")
    token.add_argument("--mode", choices=("chunk", "token"), default="chunk",
                       help="chunk: RETRO-style chunks embedded with MiniLM (default); token: the served "
                            "model's hidden state at every position -> next token (kNN-LM)")
    token.add_argument("--window", type=int, default=1024, help="token mode: most tokens per forward pass")
    token.add_argument("--stride", type=int, default=512,
                       help="token mode: window advance in long documents (keys keep >= window-stride context)")
    token.add_argument("--key-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="token mode: dtype the keys are computed in; auto (default): the one the server "
                            "serves in on this machine, so keys carry the queries' rounding. float32 is 2.7x "
                            "faster on CPUs that serve bf16 without native bf16 (no avx512_bf16/AMX); README, "
                            "\"Faster keys\", gives its measured cost")


@handles_errors
def run_build(args: argparse.Namespace) -> int:
    from datastore_tools.build import BuildConfig, build_datastore
    from datastore_tools.errors import DatastoreToolError
    from artefacts import paths

    if not args.inputs and not args.default_corpus:
        raise DatastoreToolError("nothing to index: pass files or folders, or --default-corpus")
    model_dir = args.model or _default_model_dir()
    if args.model is None and not model_dir.is_dir():
        raise DatastoreToolError(
            f"no model at {model_dir}: run `retroserve model prepare` first or pass --model DIR"
        )
    if args.mode == "token":
        return _run_token_build(args, model_dir)
    config = BuildConfig(
        output=args.output or paths.default_datastore_dir(), model_dir=model_dir, inputs=list(args.inputs),
        default_corpus=args.default_corpus, chunk_tokens=args.chunk_tokens, index=args.index, pca=args.pca,
        nprobe=args.nprobe, ef_search=args.ef_search, seed=args.seed, jsonl_field=args.jsonl_field,
        on_undecodable=args.on_undecodable, embedder_backend=args.embedder_backend,
        batch_size=args.batch_size, shard_size=args.shard_size, keep_embeddings=args.keep_embeddings,
        bm25=args.bm25, force=args.force, name=args.name, progress=args.progress,
    )
    result = build_datastore(config)
    manifest = result.manifest
    seconds = manifest["build"]["seconds"]
    chunks = manifest["counts"]["chunks"]
    print(f"datastore: {result.path}")
    print(f"documents: {manifest['counts']['documents']}  chunks: {chunks}  index: {manifest['index']['factory']}"
          f"  search params: {manifest['index']['search_params']}")
    if manifest["pca"]:
        print(f"pca: {manifest['pca']['dim']} dims, variance kept {manifest['pca']['variance_kept']:.4f}")
    for skipped in manifest["build"]["skipped_inputs"]:
        print(f"skipped: {skipped}")
    embedded = manifest["build"]["embedded_chunks"]
    rate = embedded / seconds["embed"] if seconds["embed"] > 0 else float("nan")
    print("seconds: " + "  ".join(f"{phase} {value:.2f}" for phase, value in seconds.items())
          + f"  (embed {rate:.1f} chunks/s, {manifest['build']['resumed_chunks']} resumed)")
    return 0


def _run_token_build(args: argparse.Namespace, model_dir: Path) -> int:
    from datastore_tools.errors import DatastoreToolError
    from datastore_tools.token_build import TokenBuildConfig, build_token_datastore

    if args.output is None:
        raise DatastoreToolError("--mode token needs -o/--output (there is no default token datastore)")
    config = TokenBuildConfig(
        output=args.output, model_dir=model_dir, inputs=list(args.inputs), default_corpus=args.default_corpus,
        index=args.index, pca=args.pca, nprobe=args.nprobe, seed=args.seed, window=args.window,
        stride=args.stride, key_dtype=args.key_dtype, jsonl_field=args.jsonl_field, on_undecodable=args.on_undecodable,
        force=args.force, name=args.name, progress=args.progress,
    )
    manifest = build_token_datastore(config).manifest
    seconds = manifest["build"]["seconds"]
    print(f"datastore: {args.output}  (mode token)")
    print(f"documents: {manifest['counts']['documents']}  entries: {manifest['counts']['entries']}  "
          f"index: {manifest['index']['factory']} ({manifest['index']['metric']})  dims "
          f"{manifest['dims']['embedding']} -> {manifest['dims']['index']}")
    rate = manifest["build"]["computed_positions"] / seconds["keys"] if seconds["keys"] > 0 else float("nan")
    print("seconds: " + "  ".join(f"{phase} {value:.2f}" for phase, value in seconds.items())
          + f"  (keys {rate:.0f} positions/s, {manifest['build']['resumed_positions']} resumed)")
    return 0


# ---- info --------------------------------------------------------------------------------------

def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path)
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def datastore_info(path: Path) -> dict:
    from retriever.datastore import read_manifest

    manifest = read_manifest(path)
    chunks = manifest["counts"]["chunks"] or 1
    files = manifest.get("files") or {}
    sizes = {name: entry["bytes"] for name, entry in files.items()}
    return {
        "manifest": manifest,
        "sizes": sizes,
        "total_bytes": sum(sizes.values()),
        "bytes_per_entry": {name: size / chunks for name, size in sizes.items()},
    }


@handles_errors
def run_info(args: argparse.Namespace) -> int:
    info = datastore_info(args.datastore)
    manifest = info["manifest"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"datastore: {args.datastore}  ({manifest['name']}, schema {manifest['schema_version']}, "
          f"mode {manifest['mode']}, created {manifest['created_at']})")
    print(f"documents: {manifest['counts']['documents']}  chunks: {manifest['counts']['chunks']}  "
          f"chunk tokens: {manifest['chunk_tokens']}")
    print(f"tokenizer: {manifest['tokenizer']['fingerprint']}")
    print(f"model: {(manifest.get('model') or {}).get('fingerprint')}")
    embedder = manifest["embedder"]
    print(f"embedder: {embedder['name']} ({embedder['dim']}-d, backend {embedder.get('backend')})")
    index = manifest["index"]
    pca = manifest.get("pca")
    print(f"index: {index['factory']}  metric {index['metric']}  search params {index['search_params']}  "
          f"dims {manifest['dims']['embedding']} -> {manifest['dims']['index']}"
          + (f"  (PCA variance kept {pca['variance_kept']:.4f})" if pca else ""))
    bm25 = (manifest.get("sparse") or {}).get("bm25")
    print(f"bm25: vocabulary {bm25['vocabulary']}, k1 {bm25['k1']}, b {bm25['b']} (retrievers bm25, fusion)" if bm25
          else f"bm25: none (dense retrieval only; `retroserve datastore bm25 {args.datastore}` adds it)")
    for name, size in sorted(info["sizes"].items()):
        print(f"  {name:28s} {size:>12,d} B  {info['bytes_per_entry'][name]:10.1f} B/entry")
    print(f"  {'total':28s} {info['total_bytes']:>12,d} B")
    seconds = (manifest.get("build") or {}).get("seconds")
    if seconds:
        print("build seconds: " + "  ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    return 0


# ---- verify ------------------------------------------------------------------------------------

def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path)


@handles_errors
def run_verify(args: argparse.Namespace) -> int:
    from datastore_tools.verify import verify_datastore

    problems = verify_datastore(args.datastore)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"error: {args.datastore} failed verification ({len(problems)} problem(s)); "
              "rebuild it with `retroserve datastore build`", file=sys.stderr)
        return 1
    print(f"ok: {args.datastore}")
    return 0


# ---- search ------------------------------------------------------------------------------------

def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path)
    parser.add_argument("query", nargs="+", help="query text (several queries are searched as one batch)")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--retriever", choices=("dense", "bm25", "fusion"), default="dense",
                        help="dense: MiniLM + FAISS; bm25: the datastore's BM25 index; fusion: both, by rank")
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--ef-search", type=int, default=None)
    parser.add_argument("--json", action="store_true")


@handles_errors
def run_search(args: argparse.Namespace) -> int:
    import dataclasses

    from retriever.datastore import Datastore

    with Datastore.open(args.datastore, device="cpu", method=args.retriever) as datastore:
        datastore.set_search_params(nprobe=args.nprobe, efSearch=args.ef_search)
        results = datastore.search_texts(args.query, args.k)
    if args.json:
        print(json.dumps({
            "results": [{"query": q, "neighbours": [dataclasses.asdict(n) for n in row]}
                        for q, row in zip(args.query, results)],
            "timing": dataclasses.asdict(results.timing),
        }, ensure_ascii=False))
        return 0
    for query, row in zip(args.query, results):
        print(f"query: {query}")
        for rank, neighbour in enumerate(row, start=1):
            text = " ".join(neighbour.text.split())
            print(f"{rank:2d}. {neighbour.score:.4f}  chunk {neighbour.chunk_id}  {neighbour.source}")
            print(f"    {text}")
    timing = results.timing
    print(f"(embed {timing.embed * 1e3:.1f} ms, search {timing.search * 1e3:.2f} ms, "
          f"payload {timing.payload * 1e3:.2f} ms)")
    return 0


# ---- bm25 --------------------------------------------------------------------------------------

def add_bm25_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path, help="a published chunk datastore")
    parser.add_argument("--force", action="store_true", help="rebuild an existing BM25 index")


@handles_errors
def run_bm25(args: argparse.Namespace) -> int:
    from datastore_tools.sparse_build import add_bm25

    manifest = add_bm25(args.datastore, force=args.force)
    info = manifest["sparse"]["bm25"]
    print(f"bm25: {args.datastore}/bm25  ({info['chunks']} chunks, vocabulary {info['vocabulary']}, "
          f"{info['seconds']:.1f} s); serve it with `retroserve serve --retriever bm25` or `fusion`")
    return 0


# ---- prune -------------------------------------------------------------------------------------

def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="keep exact duplicates")
    parser.add_argument("--near-dup", type=float, default=None, metavar="COSINE",
                        help="also drop near-duplicates at or above this cosine (e.g. 0.95)")
    parser.add_argument("--retrieval-log", type=Path, default=None,
                        help="JSONL with {\"chunk_ids\": [...]} per retrieval: drop never-retrieved chunks")
    parser.add_argument("--index", default=None, help="factory of the new index (default: the source's)")
    parser.add_argument("--force", action="store_true")
    token = parser.add_argument_group("token mode (greedy merge; datastore_tools/token_prune.py)")
    token.add_argument("--mode", choices=("auto", "chunk", "token"), default="auto",
                       help="chunk: drop duplicate chunks; token: greedy-merge entries whose neighbours share "
                            "their next token, keeping counts (default: the source datastore's mode)")
    token.add_argument("--merge-k", type=int, default=8,
                       help="token mode: neighbours each entry may absorb (He et al. 2021)")


@handles_errors
def run_prune(args: argparse.Namespace) -> int:
    from datastore_tools.prune import prune_datastore

    mode = args.mode
    if mode == "auto":
        from retriever.datastore import read_manifest

        mode = read_manifest(args.datastore).get("mode", "chunk")
    if mode == "token":
        from datastore_tools.token_prune import prune_token_datastore

        manifest = prune_token_datastore(args.datastore, args.output, k=args.merge_k, index=args.index,
                                         force=args.force)
        merge = manifest["merge"]
        print(f"datastore: {args.output}  (mode token, greedy merge k={merge['k']})")
        print(f"entries: {merge['entries_before']} -> {merge['entries_after']}  "
              f"(keys {merge['keys']}, index {manifest['index']['factory']})")
        return 0
    report = prune_datastore(args.datastore, args.output, exact=args.exact, near_dup=args.near_dup,
                             retrieval_log=args.retrieval_log, index=args.index, force=args.force)
    print(f"datastore: {args.output}")
    print(f"chunks: {report.before} -> {report.after}  (exact duplicates {report.exact_duplicates}, "
          f"near duplicates {report.near_duplicates}, never retrieved {report.never_retrieved})")
    return 0


# ---- reduce ------------------------------------------------------------------------------------

def add_reduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--pca", type=int, default=None, help="target dimension (default: keep the full size)")
    parser.add_argument("--index", default=None,
                        help="factory of the new index (default: the source's), e.g. IVF2048,PQ288x4fs,RFlat: "
                             "4-bit fast-scan codes re-ranked with the exact keys (token mode)")
    parser.add_argument("--force", action="store_true")


@handles_errors
def run_reduce(args: argparse.Namespace) -> int:
    from datastore_tools.reduce import reduce_datastore
    from datastore_tools.errors import DatastoreToolError
    from retriever.datastore import read_manifest

    if args.pca is None and args.index is None:
        raise DatastoreToolError("datastore reduce needs --pca DIM, --index FACTORY or both "
                                 "(e.g. --index IVF2048,PQ288x4fs,RFlat to re-index the same keys)")
    if read_manifest(args.datastore).get("mode", "chunk") == "token":
        from datastore_tools.token_prune import reduce_token_datastore

        manifest = reduce_token_datastore(args.datastore, args.output, args.pca, index=args.index, force=args.force)
    else:
        manifest = reduce_datastore(args.datastore, args.output, args.pca, index=args.index, force=args.force)
    print(f"datastore: {args.output}")
    kept = f"  variance kept {manifest['pca']['variance_kept']:.4f}" if manifest.get("pca") else ""
    print(f"index: {manifest['index']['factory']}  dims {manifest['dims']['embedding']} -> "
          f"{manifest['dims']['index']}{kept}  search params {manifest['index']['search_params']}")
    return 0


# ---- gate --------------------------------------------------------------------------------------

def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path, help="a token datastore (`datastore build --mode token`)")
    parser.add_argument("--heldout", nargs="+", required=True,
                        help="documents the datastore does not hold (e.g. the dev half of `retroserve eval split`)")
    parser.add_argument("--model", type=Path, default=None, help="the served model directory (default: the prepared model)")
    parser.add_argument("--max-doc-chars", type=int, default=2000, help="characters used from each document")
    # The server's defaults (server/knn/settings.py; tests/test_knn_gate.py keeps them equal).
    parser.add_argument("--knn-k", type=int, default=64, help="neighbours per position (the server's default 64)")
    parser.add_argument("--knn-temperature", type=float, default=30.0, help="the server's default 30")
    parser.add_argument("--knn-lambda", type=float, default=0.25,
                        help="the constant λ the report compares with (the server's default 0.25)")
    parser.add_argument("--seed", type=int, default=0)


@handles_errors
def run_gate(args: argparse.Namespace) -> int:
    from datastore_tools.token_gate import THRESHOLDS, train_gate

    # train_gate opens the datastore as a TokenDatastore, which refuses a chunk datastore with the fix.
    info = train_gate(args.datastore, args.heldout, model_dir=args.model or _default_model_dir(),
                      max_doc_chars=args.max_doc_chars, k=args.knn_k, temperature=args.knn_temperature,
                      constant_lam=args.knn_lambda, seed=args.seed)
    kept = info["kept_out"]
    print(f"gate: {args.datastore / 'gate.json'}  ({info['documents']} documents, {info['seconds']:.0f} s)")
    print(f"kept-out positions {kept['positions']}: nats/token model alone {kept['model_alone']:.4f}, "
          f"constant λ {kept['constant_lambda']:.4f}, learned λ {kept['learned_lambda']:.4f}")
    for threshold in THRESHOLDS:
        skip = kept["skip"][str(threshold)]
        print(f"  skip where λ(x) < {threshold:g}: {skip['fraction']:.1%} of searches, nats/token "
              f"{skip['learned_lambda_elsewhere']:.4f} mixing at λ(x) elsewhere (served), "
              f"{skip['constant_lambda_elsewhere']:.4f} at the constant λ")
    return 0


# ---- shard -------------------------------------------------------------------------------------

def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datastore", type=Path)
    parser.add_argument("-n", "--shards", type=int, required=True,
                        help="number of shards (cut at document boundaries: 1..number of documents)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="directory to publish; shard i is OUTPUT/shard-i, a complete datastore")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


@handles_errors
def run_shard(args: argparse.Namespace) -> int:
    from datastore_tools.shard import shard_datastore, shard_dir

    manifests = shard_datastore(args.datastore, args.output, args.shards, force=args.force)
    print(f"shards: {args.output} ({len(manifests)} of {manifests[0]['shard']['parent']['name']}, "
          f"index {manifests[0]['index']['factory']})")
    for manifest in manifests:
        shard = manifest["shard"]
        first, end = shard["chunk_ids"]
        print(f"  {shard_dir(args.output, shard['index'])}: chunks [{first}, {end}) ({end - first}), "
              f"documents {manifest['counts']['documents']}")
    print(f"serve each with `retroserve retriever serve --datastore-dir {shard_dir(args.output, 0)}` (and so on); "
          f"then `retroserve serve --retriever-shards HOST:PORT,...` in shard order")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datastore_tools", description="retroserve datastore tools")
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        globals()[f"add_{name}_arguments"](sub)
        sub.set_defaults(func=globals()[f"run_{name}"])
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)
