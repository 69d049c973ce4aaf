"""Open a published token (kNN-LM) datastore read-only and search it with hidden states.

A token datastore maps the serving model's final hidden state at every corpus position (the key)
to the token that followed it (the value). Its keys are only meaningful for the exact weights that
produced them, so `TokenDatastore.open` refuses one built with another model or tokenizer, naming
the rebuild command. It is opened twice in a server: in the gRPC process (for Info and the
fingerprint check at start-up) and inside vLLM's engine process by the kNN model class
(server/knn/model.py), which searches it once per engine step.

Files (docs/datastore_format.md, "Token datastores"): `index.faiss` (L2 metric, ids = entry ids),
`values.npy` (int32 next-token id per entry), `next.npy` (int64 entry id of the following corpus
position in the same document, -1 at a document's end: the pointers RetoMaton-style caching
follows), `doc_ids.npy` (int32 document per entry), `docs.json` (source and title per document),
and optionally `counts.npy` (int64 original entries per entry, written by greedy-merge pruning,
datastore_tools/token_prune.py; absent: every entry counts once).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever import device_search
from retriever import format as fmt
from retriever.datastore import DatastoreError, apply_search_params, read_index, read_manifest, require_fingerprint

log = logging.getLogger(__name__)

MODE = "token"
VALUES_FILE = "values.npy"
NEXT_FILE = "next.npy"
DOC_IDS_FILE = "doc_ids.npy"
DOCS_FILE = "docs.json"
COUNTS_FILE = "counts.npy"
REQUIRED_FILES = (fmt.INDEX_FILE, VALUES_FILE, NEXT_FILE, DOC_IDS_FILE, DOCS_FILE)
TOKEN_REBUILD_HINT = (
    "rebuild it for this model with `retroserve datastore build --mode token ... --model DIR` "
    "(DIR: the served model directory)"
)


@dataclass
class TokenSearch:
    """One batched search: squared L2 distances, entry ids (-1: no entry) and their next tokens."""

    distances: np.ndarray  # float32 [n, k]
    ids: np.ndarray  # int64 [n, k]
    values: np.ndarray  # int64 [n, k], -1 where ids are -1


def key_dtype_mismatch(manifest: dict, served_dtype: str) -> str | None:
    """A warning when the datastore's keys were computed in another activation dtype than the one
    the engine serves in (e.g. built on an AVX2 machine, which serves fp32, and served on one with
    bf16): queries then carry other rounding than the keys, which costs bits per byte (float32
    keys under bf16 serving: +1.0% [+0.9, +1.2] on the Python-docs test half). None when they match
    or the manifest predates the record."""
    key_dtype = (manifest.get("build") or {}).get("key_dtype")
    if not key_dtype or key_dtype == served_dtype:
        return None
    return (f"token datastore {manifest.get('name', '')!r}: its keys were computed in {key_dtype} but this engine "
            f"serves in {served_dtype}, so queries and keys are rounded differently (float32 keys under bfloat16 "
            f"serving measured +1.0% bits per byte); rebuild it on a machine that serves in {served_dtype} "
            "(`retroserve datastore build --mode token`, --key-dtype auto) for its full gain")


class TokenDatastore:
    """A token datastore opened for searching; `search` is thread-safe (FAISS is, numpy reads are)."""

    def __init__(self, path: Path, manifest: dict, index, values: np.ndarray, next_ids: np.ndarray,
                 doc_ids: np.ndarray, docs: list[dict], counts: np.ndarray | None = None):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.values = values
        self.next_ids = next_ids
        self.doc_ids = doc_ids
        self.docs = docs
        self.counts = counts
        """int64 [ntotal] merge counts (greedy-merge pruning), None when every entry counts once."""
        self._lock = threading.Lock()
        self.searcher = index
        """What `search` calls: the FAISS index, or its exact copy on a CUDA device (device_search)."""

    @classmethod
    def open(cls, path: str | Path, *, expected_model_fingerprint: str | None = None,
             expected_tokenizer_fingerprint: str | None = None, device: str = "auto") -> "TokenDatastore":
        """Open `path`; raises DatastoreError (FingerprintMismatch for another model) naming the fix.
        device "auto": a Flat index is searched on CUDA by the torch kernel when a GPU is visible
        (the engine's logits live there); "cpu": always FAISS on the CPU."""
        path = Path(path)
        manifest = read_manifest(path)
        mode = manifest.get("mode", "chunk")
        if mode != MODE:
            raise DatastoreError(
                f"{path} is a {mode}-mode datastore, not a token datastore; pass it with --datastore-dir, "
                f"or build a token datastore with `retroserve datastore build --mode token`"
            )
        what = f"token datastore {path}"
        require_fingerprint("tokenizer", (manifest.get("tokenizer") or {}).get("fingerprint"),
                            expected_tokenizer_fingerprint, what=what, fix=TOKEN_REBUILD_HINT)
        require_fingerprint("model", (manifest.get("model") or {}).get("fingerprint"), expected_model_fingerprint,
                            what=what, why="its keys are another model's hidden states", fix=TOKEN_REBUILD_HINT)
        problems = check_token_files(path, manifest)
        if problems:
            raise DatastoreError(f"token datastore {path} is damaged: {'; '.join(problems)}; {TOKEN_REBUILD_HINT}")
        index, _ = read_index(path / fmt.INDEX_FILE)
        apply_search_params(index, (manifest.get("index") or {}).get("search_params") or {})
        values = np.load(path / VALUES_FILE, mmap_mode="r")
        next_ids = np.load(path / NEXT_FILE, mmap_mode="r")
        doc_ids = np.load(path / DOC_IDS_FILE, mmap_mode="r")
        docs = json.loads((path / DOCS_FILE).read_text(encoding="utf-8"))
        counts = np.load(path / COUNTS_FILE) if COUNTS_FILE in (manifest.get("files") or {}) else None
        if counts is not None and len(counts) != index.ntotal:
            raise DatastoreError(f"token datastore {path} is inconsistent: {index.ntotal} keys, {len(counts)} "
                                 f"merge counts; {TOKEN_REBUILD_HINT}")
        if not len(values) == len(next_ids) == len(doc_ids) == index.ntotal:
            raise DatastoreError(
                f"token datastore {path} is inconsistent: {index.ntotal} keys, {len(values)} values, "
                f"{len(next_ids)} pointers, {len(doc_ids)} document ids; {TOKEN_REBUILD_HINT}"
            )
        log.info("opened token datastore %s: %d entries, %s", path, index.ntotal,
                 (manifest.get("index") or {}).get("factory"))
        datastore = cls(path, manifest, index, np.asarray(values, dtype=np.int64), np.asarray(next_ids),
                        np.asarray(doc_ids), docs, None if counts is None else np.asarray(counts, dtype=np.int64))
        datastore.searcher = device_search.device_searcher(index, device)
        return datastore

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> TokenSearch:
        """k nearest keys of each query row (float32 [n, dim]) in one FAISS call."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}], got {list(queries.shape)}")
        if k < 1:
            raise ValueError(f"{k=} must be >= 1")
        distances, ids = self.searcher.search(queries, k)
        return TokenSearch(distances, ids, self.lookup_values(ids))

    def lookup_values(self, ids: np.ndarray) -> np.ndarray:
        """Next-token ids for entry ids (any shape); -1 stays -1."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(ids >= 0, self.values[np.clip(ids, 0, None)], -1)

    def close(self) -> None:
        """Nothing to release explicitly (memory maps close with the arrays); kept for symmetry."""


def check_token_files(path: Path, manifest: dict) -> list[str]:
    """Problems with the files a token manifest lists (missing, listed, size)."""
    problems = []
    files = manifest.get("files") or {}
    for required in REQUIRED_FILES:
        if required not in files:
            problems.append(f"{required}: not listed in manifest.json")
    for relative, entry in sorted(files.items()):
        file_path = path / relative
        if not file_path.is_file():
            problems.append(f"{relative}: missing")
        elif file_path.stat().st_size != entry.get("bytes"):
            problems.append(f"{relative}: {file_path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
    return problems
