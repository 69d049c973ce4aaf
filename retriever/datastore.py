"""Open a published datastore read-only and search it in batches.

`Datastore.open` refuses, with a message naming the fix, anything it cannot trust: a missing or
unparsable manifest, another schema version, missing or resized files, or (when the caller says
which tokenizer it serves) a datastore built with another tokenizer. The FAISS index is memory-mapped
read-only where the index type allows it (the page cache is then shared between processes), and
moved to a GPU only when FAISS has GPU support and a device is visible.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import lmdb
import numpy as np

from artefacts.digest import sha256_file
from retriever import device_search, sparse
from retriever import format as fmt

log = logging.getLogger(__name__)

REBUILD_HINT = "rebuild it with `retroserve datastore build ... --model DIR` (DIR: the served model directory)"


class DatastoreError(RuntimeError):
    """The datastore cannot be opened or is inconsistent; the message names the file and the fix."""


class FingerprintMismatch(DatastoreError):
    """The datastore was built with another tokenizer (or model) than the one being served."""


def require_fingerprint(kind: str, built_with: str | None, expected: str | None, *, what: str, fix: str,
                        why: str = "") -> None:
    """Raise FingerprintMismatch unless `what` (the datastore, as the message names it) was built with
    the `expected` `kind` ("tokenizer" or "model") fingerprint; expected None: nothing to check.

    The message names both fingerprints, then `why` the mismatch matters (when given) and the `fix`."""
    if expected is None or built_with == expected:
        return
    served = "the served model" if kind == "model" else f"the served model's {kind}"
    because = f": {why}" if why else ""
    raise FingerprintMismatch(f"{what} was built with {kind} {built_with} but {served} is {expected}{because}; {fix}")


@dataclass(frozen=True)
class Neighbour:
    chunk_id: int
    score: float
    doc_id: int
    source: str
    title: str
    chunk_tokens: tuple[int, ...]
    continuation_tokens: tuple[int, ...]
    text: str
    continuation_text: str
    continuation_id: int = -1


@dataclass
class Timing:
    """Seconds spent per stage of one batched call (what the server exports as metrics)."""

    embed: float = 0.0
    search: float = 0.0
    payload: float = 0.0
    queries: int = 0

    @property
    def total(self) -> float:
        return self.embed + self.search + self.payload


@dataclass(frozen=True)
class MissingShard:
    """A datastore shard whose neighbours are missing from a result (retriever/fanout.py)."""

    index: int
    address: str
    reason: str
    """"timeout" (past the per-shard deadline), "unavailable" (unreachable) or "error"."""


class NeighbourRow(list):
    """One query's neighbours, best first, from a sharded search: `missing_shards` lists the shards
    that did not answer (the row is then partial) out of `shard_count` asked. Caches must not keep
    partial rows; the request's shard policy decides whether one may be used (fanout.py)."""

    def __init__(self, items=(), missing_shards: Sequence[MissingShard] = (), shard_count: int = 0):
        super().__init__(items)
        self.missing_shards = tuple(missing_shards)
        self.shard_count = shard_count


def head(row: Sequence[Neighbour], k: int) -> list[Neighbour]:
    """The first k neighbours of a row, keeping a NeighbourRow's shard report."""
    if isinstance(row, NeighbourRow):
        return NeighbourRow(row[:k], row.missing_shards, row.shard_count)
    return list(row)[:k]


def missing_shards(row: Sequence[Neighbour]) -> tuple[MissingShard, ...]:
    """Shards missing from a row (empty for a local datastore's plain list)."""
    return getattr(row, "missing_shards", ())


class BatchResults(list):
    """list[list[Neighbour]], one list per query, plus the `timing` of the call that made it."""

    def __init__(self, items=(), timing: Timing | None = None):
        super().__init__(items)
        self.timing = timing or Timing()


def apply_search_params(index: faiss.Index, params: dict) -> None:
    """Set nprobe / efSearch through any chain (PreTransform, GPU) with FAISS's ParameterSpace."""
    if not params:
        return
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def require_sparse(path: Path, manifest: dict, method: str) -> None:
    """DatastoreError naming the fix unless the datastore has the BM25 index `method` needs."""
    if not manifest.get("sparse"):
        raise DatastoreError(
            f"datastore {path} has no BM25 index, which retriever {method!r} needs; add one with "
            f"`retroserve datastore bm25 {path}` (seconds), or use retriever 'dense'")


def read_manifest(path: Path) -> dict:
    manifest_path = path / fmt.MANIFEST
    try:
        exists, complete = path.is_dir(), manifest_path.is_file()
    except OSError as error:  # a name too long, a directory we may not read: the caller's path is bad
        raise DatastoreError(f"cannot read datastore {str(path)[:200]!r} ({error.strerror})") from error
    if not exists:
        raise DatastoreError(f"datastore {path} does not exist; build one with `retroserve datastore build`")
    if not complete:
        raise DatastoreError(
            f"{manifest_path} is missing, so {path} is not a complete datastore (an interrupted build?); "
            f"{REBUILD_HINT}"
        )
    try:
        manifest = fmt.read_manifest_file(manifest_path)
    except (OSError, ValueError) as error:
        raise DatastoreError(f"{manifest_path} is unreadable ({error}); {REBUILD_HINT}") from error
    version = manifest.get("schema_version")
    if version != fmt.SCHEMA_VERSION:
        raise DatastoreError(
            f"{path} has schema version {version!r}; this retroserve reads version {fmt.SCHEMA_VERSION}: "
            f"{REBUILD_HINT}"
        )
    return manifest


def check_files(path: Path, manifest: dict, checksums: bool = False) -> list[str]:
    """Problems with the files the manifest lists (missing, size, and sha256 when `checksums`)."""
    problems = []
    files = manifest.get("files") or {}
    for required in (fmt.INDEX_FILE, fmt.PAYLOADS_DATA):
        if required not in files:
            problems.append(f"{required}: not listed in manifest.json")
    for relative, entry in sorted(files.items()):
        file_path = path / relative
        if not file_path.is_file():
            problems.append(f"{relative}: missing")
            continue
        size = file_path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{relative}: {size} bytes, manifest says {entry.get('bytes')}")
        elif checksums and sha256_file(file_path) != entry.get("sha256"):
            problems.append(f"{relative}: sha256 differs from manifest.json (modified or corrupt)")
    return problems


def _gpu_available() -> bool:
    return hasattr(faiss, "index_cpu_to_gpu") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def read_index(index_path: Path) -> tuple[faiss.Index, bool]:
    """(index, memory_mapped): mmap + read-only where the index type supports it, else a normal read."""
    try:
        return faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), True
    except RuntimeError as error:
        log.debug("mmap read of %s not possible (%s); reading into memory", index_path, error)
    try:
        return faiss.read_index(str(index_path)), False
    except RuntimeError as error:
        raise DatastoreError(f"{index_path} is not a readable FAISS index ({error}); {REBUILD_HINT}") from error


@dataclass
class _SharedEnv:
    env: lmdb.Environment
    chunks_db: object
    docs_db: object
    readers: int = 0


_SHARED_ENVS: dict[tuple, _SharedEnv] = {}
"""(real path, device, inode of data.mdb) -> the open environment. LMDB allows one open
environment per file and process, so Datastores opened twice on one path in one process (a
server and `retroserve eval`, a hot swap back to a version) share it; the last close closes it."""
_SHARED_ENVS_LOCK = threading.Lock()


def _env_key(path: Path) -> tuple:
    data = path / "data.mdb"
    stat = data.stat() if data.exists() else path.stat()
    return (str(path.resolve()), stat.st_dev, stat.st_ino)


class PayloadReader:
    """Read-only LMDB access: chunk and document records by id (documents cached, they are few)."""

    def __init__(self, path: Path):
        try:
            with _SHARED_ENVS_LOCK:
                self._key = _env_key(path)
                shared = _SHARED_ENVS.get(self._key)
                if shared is None:
                    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=2, subdir=True, readahead=False)
                    try:
                        shared = _SharedEnv(env, env.open_db(fmt.CHUNKS_DB, create=False),
                                            env.open_db(fmt.DOCS_DB, create=False))
                    except lmdb.Error:
                        env.close()
                        raise
                    _SHARED_ENVS[self._key] = shared
                shared.readers += 1
                self.env, self.chunks_db, self.docs_db = shared.env, shared.chunks_db, shared.docs_db
        except (lmdb.Error, OSError) as error:
            raise DatastoreError(f"{path} is not a readable payload store ({error}); {REBUILD_HINT}") from error
        self._closed = False
        self._docs: dict[int, dict] = {}
        self._docs_lock = threading.Lock()

    def count(self) -> tuple[int, int]:
        with self.env.begin() as txn:
            return txn.stat(self.chunks_db)["entries"], txn.stat(self.docs_db)["entries"]

    def chunk(self, txn, chunk_id: int) -> dict | None:
        raw = txn.get(fmt.encode_key(chunk_id), db=self.chunks_db)
        return None if raw is None else fmt.loads(raw)

    def doc(self, txn, doc_id: int) -> dict:
        with self._docs_lock:
            cached = self._docs.get(doc_id)
        if cached is None:
            raw = txn.get(fmt.encode_key(doc_id), db=self.docs_db)
            cached = fmt.loads(raw) if raw is not None else {"source": "?", "title": "", "chunks": [0, 0]}
            with self._docs_lock:
                self._docs[doc_id] = cached
        return cached

    def iter_chunks(self):
        """(id, record) for every chunk in id order."""
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self.chunks_db):
                yield fmt.decode_key(key), fmt.loads(raw)

    def iter_docs(self):
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self.docs_db):
                yield fmt.decode_key(key), fmt.loads(raw)

    def close(self) -> None:
        with _SHARED_ENVS_LOCK:
            if self._closed:
                return
            self._closed = True
            shared = _SHARED_ENVS.get(self._key)
            if shared is None:
                return
            shared.readers -= 1
            if shared.readers == 0:
                del _SHARED_ENVS[self._key]
                self.env.close()


def query_batch(embeddings: np.ndarray, dim: int, k: int) -> np.ndarray:
    """`embeddings` as contiguous float32 [n, dim], or ValueError; k must be >= 1. Shared by every
    searcher (local datastore, shard fan-out) so they refuse the same inputs the same way."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"embeddings must be [n, {dim}], got {list(embeddings.shape)}")
    if k < 1:
        raise ValueError(f"{k=} must be >= 1")
    return embeddings


class Datastore:
    """A published datastore opened for reading. Thread-safe for concurrent searches."""

    def __init__(self, path: Path, manifest: dict, index: faiss.Index, payloads: PayloadReader,
                 memory_mapped: bool, on_gpu: bool, encoder=None, method: str = "dense"):
        self.path = path
        self.method = method
        """How chunks are ranked (retriever.sparse.METHODS): "dense", "bm25" or "fusion"."""
        self.sparse = None
        """The BM25 index (retriever.sparse.SparseIndex) when the method needs it."""
        self.manifest = manifest
        self.index = index
        self.payloads = payloads
        self.memory_mapped = memory_mapped
        self.on_gpu = on_gpu
        self.searcher = index
        """What `search` calls: the FAISS index, or its exact copy on a CUDA device (device_search)."""
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self._sparse_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: str | Path,
        expected_tokenizer_fingerprint: str | None = None,
        device: str = "auto",
        encoder=None,
        verify_checksums: bool = False,
        method: str = "dense",
    ) -> "Datastore":
        """Open `path` read-only. device: "auto" (GPU if FAISS and hardware allow), "cpu" or "cuda".

        `encoder` (a retriever.encoder.QueryEncoder) is created on first text search when not given.
        File sizes are always checked; sha256 only with `verify_checksums` (it reads every byte).
        `method`: "dense", "bm25" / "fusion" (which need the datastore's BM25 index), or "auto"
        (sparse.resolve: BM25 where the datastore has its index, else dense).
        """
        path = Path(path)
        manifest = read_manifest(path)
        if method not in sparse.CHOICES:
            raise DatastoreError(f"unknown retriever {method!r}; choose one of {', '.join(sparse.CHOICES)}")
        method = sparse.resolve(method, bool(manifest.get("sparse")))
        if method in sparse.SPARSE_METHODS:
            require_sparse(path, manifest, method)
        if manifest.get("mode", "chunk") != "chunk":
            raise DatastoreError(
                f"{path} is a {manifest.get('mode')}-mode datastore; chunk retrieval needs a chunk datastore "
                f"(serve a token datastore with --token-datastore, see retriever/token_datastore.py)"
            )
        require_fingerprint("tokenizer", (manifest.get("tokenizer") or {}).get("fingerprint"),
                            expected_tokenizer_fingerprint, what=f"datastore {path}",
                            why="its chunk tokens would be wrong for this model", fix=REBUILD_HINT)
        problems = check_files(path, manifest, checksums=verify_checksums)
        if problems:
            raise DatastoreError(
                f"datastore {path} is damaged: {'; '.join(problems)}; run `retroserve datastore verify "
                f"{path}` for details and {REBUILD_HINT}"
            )
        if device not in ("auto", "cpu", "cuda"):
            raise DatastoreError(f"unknown device {device!r}; choose auto, cpu or cuda")
        index, memory_mapped = read_index(path / fmt.INDEX_FILE)
        on_gpu = False
        searcher = index
        if device in ("auto", "cuda") and _gpu_available():
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)
            index.referenced_resources = resources  # keep the resources alive with the index
            on_gpu, memory_mapped, searcher = True, False, index
        elif device in ("auto", "cuda"):
            # CPU-only FAISS: an exact index can still be searched on the GPU by the torch kernel.
            searcher = device_search.device_searcher(index, device)
            on_gpu = searcher is not index
        if device == "cuda" and not on_gpu:
            raise DatastoreError(
                f"device 'cuda' requested but no GPU is visible, or FAISS has no GPU support and the index "
                f"({(manifest.get('index') or {}).get('factory')}) is not Flat (only exact indexes are searched "
                "by the torch GPU kernel); install faiss-gpu-cu12 (the `cuda` extra), rebuild with --index Flat, "
                "or use device 'cpu'")
        apply_search_params(index, (manifest.get("index") or {}).get("search_params") or {})
        payloads = PayloadReader(path / fmt.PAYLOADS_DIR)
        log.info("opened datastore %s: %d chunks, %s%s%s", path, index.ntotal,
                 (manifest.get("index") or {}).get("factory"), " (mmap)" if memory_mapped else "",
                 " (exact search on CUDA, torch)" if searcher is not index else "")
        datastore = cls(path, manifest, index, payloads, memory_mapped, on_gpu, encoder, method)
        datastore.searcher = searcher
        if method in sparse.SPARSE_METHODS:
            try:
                datastore.sparse_index(method)
            except DatastoreError:
                datastore.close()
                raise
        return datastore

    def sparse_index(self, method: str) -> "sparse.SparseIndex":
        """The BM25 index, opened on first use; DatastoreError naming the fix when there is none."""
        with self._sparse_lock:
            if self.sparse is None:
                require_sparse(self.path, self.manifest, method)
                try:
                    self.sparse = sparse.SparseIndex.open(sparse.sparse_dir(self.path))
                except (OSError, ValueError, KeyError) as error:
                    raise DatastoreError(f"the BM25 index of {self.path} is unreadable ({error}); re-add it "
                                         f"with `retroserve datastore bm25 --force {self.path}`") from error
            return self.sparse

    # -- properties -------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def encoder(self):
        with self._encoder_lock:
            if self._encoder is None:
                from retriever.encoder import QueryEncoder

                backend = (self.manifest.get("embedder") or {}).get("backend", "torch")
                self._encoder = QueryEncoder(backend=backend)
            return self._encoder

    def set_search_params(self, **params) -> None:
        apply_search_params(self.index, {k: v for k, v in params.items() if v is not None})

    # -- search -----------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(texts))

    def search_embeddings(self, embeddings: np.ndarray, k: int, timing: Timing | None = None) -> BatchResults:
        """Neighbours of each row of `embeddings` (float32 [n, 384], normalised) in one FAISS call."""
        timing = timing or Timing()
        embeddings = query_batch(embeddings, self.dim, k)
        timing.queries = len(embeddings)
        if len(embeddings) == 0:
            return BatchResults([], timing)
        k_eff = min(k, self.ntotal)
        started = time.perf_counter()
        scores, ids = self.searcher.search(embeddings, k_eff)
        timing.search = time.perf_counter() - started
        started = time.perf_counter()
        results = self.fetch(ids, scores)
        timing.payload = time.perf_counter() - started
        return BatchResults(results, timing)

    def search_texts(self, texts: Sequence[str], k: int, method: str | None = None) -> BatchResults:
        """Neighbours of each text by `method` (default: the datastore's; dense: one encoder call
        and one FAISS call)."""
        method = self._resolve(method)
        timing = Timing()
        embeddings = None
        if method != "bm25":
            encoder = self.encoder  # loaded on first use; not counted as embedding time
            started = time.perf_counter()
            embeddings = encoder.encode(list(texts))
            timing.embed = time.perf_counter() - started
        return self._search_resolved(texts, embeddings, k, timing, method)

    def search_queries(self, texts: Sequence[str], embeddings: np.ndarray | None, k: int,
                       timing: Timing | None = None, method: str | None = None) -> BatchResults:
        """Neighbours of queries given as texts and (for dense and fusion) their embeddings."""
        return self._search_resolved(texts, embeddings, k, timing, self._resolve(method))

    def _resolve(self, method: str | None) -> str:
        """`method` ("auto" becomes what this datastore serves), or the datastore's own."""
        return sparse.resolve(method, bool(self.manifest.get("sparse"))) if method else self.method

    def _search_resolved(self, texts: Sequence[str], embeddings: np.ndarray | None, k: int,
                         timing: Timing | None, method: str) -> BatchResults:
        if method == "dense":
            return self.search_embeddings(embeddings, k, timing)
        if method not in sparse.SPARSE_METHODS:
            raise ValueError(f"unknown retriever {method!r}; choose one of {', '.join(sparse.METHODS)}")
        index = self.sparse_index(method)
        timing = timing or Timing()
        if k < 1:
            raise ValueError(f"{k=} must be >= 1")
        texts = list(texts)
        timing.queries = len(texts)
        if not texts:
            return BatchResults([], timing)
        started = time.perf_counter()
        depth = max(k, sparse.FUSION_DEPTH) if method == "fusion" else k
        ids, scores = index.search(texts, depth)
        if method == "fusion":
            embeddings = query_batch(embeddings, self.dim, k)
            _, dense_ids = self.searcher.search(embeddings, min(depth, self.ntotal))
            ids, scores = sparse.reciprocal_rank_fusion([dense_ids, ids], k)
        timing.search = time.perf_counter() - started
        started = time.perf_counter()
        results = self.fetch(ids, scores)
        timing.payload = time.perf_counter() - started
        return BatchResults(results, timing)

    def fetch(self, ids: np.ndarray, scores: np.ndarray) -> list[list[Neighbour]]:
        """Payloads for FAISS result rows (ids of -1, i.e. fewer than k hits, are dropped)."""
        results: list[list[Neighbour]] = []
        with self.payloads.env.begin() as txn:
            for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
                row = []
                for chunk_id, score in zip(row_ids, row_scores):
                    if chunk_id < 0:
                        continue
                    neighbour = self.neighbour(txn, chunk_id, score)
                    if neighbour is not None:
                        row.append(neighbour)
                results.append(row)
        return results

    def neighbour(self, txn, chunk_id: int, score: float) -> Neighbour | None:
        record = self.payloads.chunk(txn, chunk_id)
        if record is None:
            log.error("chunk %d is in the index but not in the payloads of %s", chunk_id, self.path)
            return None
        doc = self.payloads.doc(txn, record["doc"])
        continuation = self.payloads.chunk(txn, record["next"]) if record["next"] >= 0 else None
        return Neighbour(
            chunk_id=chunk_id,
            score=float(score),
            doc_id=record["doc"],
            source=doc.get("source", ""),
            title=doc.get("title", ""),
            chunk_tokens=tuple(record["tokens"]),
            continuation_tokens=tuple(continuation["tokens"]) if continuation else (),
            text=record["text"],
            continuation_text=continuation["text"] if continuation else "",
            continuation_id=record["next"],
        )

    def get_chunks(self, chunk_ids: Sequence[int]) -> list[Neighbour | None]:
        """Neighbour records (score 0) for given ids, e.g. to show what a retrieval log points at."""
        with self.payloads.env.begin() as txn:
            return [self.neighbour(txn, int(i), 0.0) for i in chunk_ids]

    def close(self) -> None:
        self.payloads.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
