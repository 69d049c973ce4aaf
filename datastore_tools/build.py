"""`datastore build`: documents -> chunks -> embeddings -> FAISS index + LMDB payloads -> publish.

Resumability: everything before embedding is fast and deterministic, so it is simply redone; the
embeddings are checkpointed per shard in `<output>.building/shards/`, keyed by a hash of everything
that determines them (chunk texts, tokenizer, embedder, batch and shard sizes). Re-running the same
command after a kill reuses finished shards; a different command discards them. The datastore is
staged in `<output>.building/datastore/` and renamed onto `<output>` when complete; the work
directory is removed after publishing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from datastore_tools import chunking, embedding, index_factory, ingest, payloads, publish, sparse_build
from datastore_tools.errors import DatastoreToolError
from datastore_tools.manifest import make_manifest, write_manifest
from retriever import fingerprints
from retriever.encoder import BUILD_BACKEND, DEFAULT_BATCH_SIZE, QueryEncoder
from retriever.format import EMBEDDINGS_FILE, INDEX_FILE, MANIFEST, SPARSE_DIR

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    output: Path
    """Directory the datastore is published to."""
    model_dir: Path
    """Serving model directory; its tokenizer cuts the chunks and its fingerprints are recorded."""
    inputs: list[Path] = field(default_factory=list)
    """Files and folders to ingest (.txt .md .rst .html .htm .jsonl)."""
    default_corpus: bool = False
    """Also ingest `pydoc_data.topics` (the Python language reference)."""
    chunk_tokens: int = 64
    """Tokens per chunk; a document's last chunk may be shorter."""
    index: str | None = None
    """FAISS factory string; None picks one by size (index_factory.choose_factory)."""
    pca: int | None = None
    """Reduce embeddings to this many dims with PCA inside the index chain."""
    nprobe: int | None = None
    """IVF probes stored as the search default (None: nlist/8, at least 8; index_factory.default_search_params)."""
    ef_search: int | None = None
    """HNSW efSearch stored as the search default (None: 64)."""
    seed: int = 1234
    """Seed of FAISS training (k-means, PQ)."""
    jsonl_field: str = "text"
    on_undecodable: str = "skip"
    embedder_backend: str = BUILD_BACKEND
    batch_size: int = DEFAULT_BATCH_SIZE
    """Texts per embedding forward pass."""
    shard_size: int = 1024
    """Chunks per checkpointed shard (the unit of resume)."""
    keep_embeddings: bool = True
    """Store raw fp16 embeddings (embeddings.npy) so prune/reduce need not re-embed."""
    bm25: bool = True
    """Also index the chunk texts with BM25 (retrievers "bm25" and "fusion"; seconds per 40k chunks)."""
    force: bool = False
    """Replace an existing datastore at `output`."""
    name: str | None = None
    progress: bool = True
    stop_after_shards: int | None = None
    """Test hook: raise after embedding this many shards, imitating a killed build."""


@dataclass
class BuildResult:
    path: Path
    manifest: dict


def _build_key(config: BuildConfig, tokenizer_fp: str, embedder: dict, chunks) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "chunk_tokens": config.chunk_tokens,
        "tokenizer": tokenizer_fp,
        "embedder": embedder,
        "batch_size": config.batch_size,
        "shard_size": config.shard_size,
    }, sort_keys=True).encode())
    for chunk in chunks:
        digest.update(chunk.text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def build_datastore(config: BuildConfig, encoder: QueryEncoder | None = None) -> BuildResult:
    """Build and publish a datastore; raises DatastoreToolError on bad input (nothing is published)."""
    output = Path(config.output)
    publish.check_output(output, config.force)
    seconds: dict[str, float] = {}
    # Reject impossible PCA sizes and unknown factories before any slow work.
    if config.pca is not None:
        index_factory.validate("Flat", 384, config.pca + 1, config.pca)
    if config.index is not None:
        index_factory.validate(config.index, 384, 1 << 30, config.pca)

    started = time.perf_counter()
    documents, report = ingest.read_documents(
        config.inputs,
        use_default_corpus=config.default_corpus,
        jsonl_field=config.jsonl_field,
        on_undecodable=config.on_undecodable,
    )
    seconds["ingest"] = time.perf_counter() - started

    started = time.perf_counter()
    model_dir = Path(config.model_dir)
    tokenizer = chunking.load_tokenizer(model_dir)
    try:
        tokenizer_fp = fingerprints.tokenizer_fingerprint(model_dir)
    except FileNotFoundError as error:
        raise DatastoreToolError(str(error)) from error
    try:
        model_fp = fingerprints.model_fingerprint(model_dir)
    except FileNotFoundError:
        model_fp = None  # a tokenizer-only directory: fine for chunk mode
    chunks = chunking.chunk_documents(documents, tokenizer, config.chunk_tokens)
    seconds["tokenize"] = time.perf_counter() - started
    n = len(chunks)
    factory = config.index or index_factory.choose_factory(n, config.pca or 384)
    index_factory.validate(factory, 384, n, config.pca)

    encoder = encoder or QueryEncoder(backend=config.embedder_backend, batch_size=config.batch_size)
    embedder = encoder.describe()
    work = publish.work_dir_for(output)
    shards = publish.prepare_work_dir(work, _build_key(config, tokenizer_fp, embedder, chunks))
    vectors, embed_stats = embedding.embed_resumable(
        [chunk.text for chunk in chunks],
        lambda texts: encoder.encode(texts, batch_size=config.batch_size),
        shards,
        shard_size=config.shard_size,
        dim=encoder.dim,
        stop_after_shards=config.stop_after_shards,
        progress=config.progress,
    )
    seconds["embed"] = embed_stats["seconds"]

    index, index_info = index_factory.build_index(
        vectors, factory, config.pca, seed=config.seed,
        search_params={"nprobe": config.nprobe, "efSearch": config.ef_search},
    )
    seconds["train"] = index_info["seconds"]["train"]
    seconds["add"] = index_info["seconds"]["add"]

    stage = work / "datastore"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        manifest = _write_stage(stage, config, documents, chunks, vectors, index, index_info,
                                tokenizer_fp, model_fp, embedder, embed_stats, report, seconds)
        publish.publish(stage, output, config.force)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)  # the shards stay: the next run resumes
    shutil.rmtree(work, ignore_errors=True)
    log.info("published %s: %d documents, %d chunks, index %s", output, len(documents), n, factory)
    return BuildResult(output, manifest)


def _write_stage(stage, config, documents, chunks, vectors, index, index_info, tokenizer_fp,
                 model_fp, embedder, embed_stats, report, seconds) -> dict:
    n = len(chunks)
    model_dir = Path(config.model_dir)
    output = Path(config.output)
    started = time.perf_counter()
    chunk_records, doc_records = [], []
    first_of_doc: dict[int, int] = {}
    for chunk_id, chunk in enumerate(chunks):
        first_of_doc.setdefault(chunk.doc, chunk_id)
        chunk_records.append(payloads.chunk_record(
            chunk.tokens, chunk.text, chunk.doc, chunk.pos, -1 if chunk.last else chunk_id + 1
        ))
    per_doc = collections.Counter(chunk.doc for chunk in chunks)
    for doc_id, document in enumerate(documents):
        first, count = first_of_doc.get(doc_id, n), per_doc.get(doc_id, 0)
        doc_records.append(payloads.doc_record(document.source, document.title, first, count))
    payloads.write_payloads(stage, chunk_records, doc_records)
    seconds["payloads"] = time.perf_counter() - started

    started = time.perf_counter()
    faiss.write_index(index, str(stage / INDEX_FILE))
    if config.keep_embeddings:
        np.save(stage / EMBEDDINGS_FILE, vectors.astype(np.float16))
    extra = {}
    if config.bm25:
        extra["sparse"] = sparse_build.write_sparse_index(stage / SPARSE_DIR, [c.text for c in chunks], range(n))
    build_args = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in dataclasses.asdict(config).items()
        if key not in ("progress", "stop_after_shards", "force", "output")
    }
    build_args["inputs"] = [str(path) for path in config.inputs]
    manifest = make_manifest(
        name=config.name or output.name,
        tokenizer={"fingerprint": tokenizer_fp, "model_dir": str(model_dir)},
        model={"fingerprint": model_fp, "name": model_dir.name},
        embedder=embedder,
        chunk_tokens=config.chunk_tokens,
        index_info=index_info,
        counts={"documents": len(documents), "chunks": n},
        build={
            "arguments": build_args,
            "seconds": seconds,
            "embedded_chunks": embed_stats["embedded_chunks"],
            "resumed_chunks": embed_stats["resumed_chunks"],
            "skipped_inputs": report.skipped,
        },
        extra=extra,
    )
    seconds["write"] = time.perf_counter() - started
    return write_manifest(stage, manifest)


def is_default_datastore(datastore_dir: Path) -> bool:
    """`datastore_dir` is the default datastore's path (the one the project builds itself)."""
    from artefacts import paths

    return Path(datastore_dir).resolve() == paths.default_datastore_dir().resolve()


def default_datastore_missing(datastore_dir: Path) -> bool:
    """`datastore_dir` is the default datastore's path and holds no datastore yet."""
    return not (Path(datastore_dir) / MANIFEST).is_file() and is_default_datastore(datastore_dir)


def _manifest_without_bm25(datastore_dir: Path) -> bool:
    try:
        return not json.loads((datastore_dir / MANIFEST).read_text()).get("sparse")
    except (OSError, ValueError):
        return False  # no or a damaged manifest: the server's opening names the problem


def ensure_default_datastore(datastore_dir: Path, model_dir: Path) -> None:
    """Build the default datastore (the Python reference from pydoc_data) at `datastore_dir` when
    that is the default path and holds none yet, so a fresh machine serves with retrieval after
    one command; any other path is left to the server, which names a missing one. A default
    datastore built before BM25 existed gets its BM25 index added (seconds)."""
    datastore_dir = Path(datastore_dir)
    if not default_datastore_missing(datastore_dir):
        if is_default_datastore(datastore_dir) and _manifest_without_bm25(datastore_dir):
            log.info("default datastore %s has no BM25 index (built before it existed): adding it", datastore_dir)
            sparse_build.add_bm25(datastore_dir)
        return
    log.info("default datastore missing: building it from pydoc_data.topics into %s", datastore_dir)
    build_datastore(BuildConfig(output=datastore_dir, model_dir=Path(model_dir), default_corpus=True,
                                progress=False))
