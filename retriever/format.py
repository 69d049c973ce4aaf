"""Names and encodings of the on-disk datastore format (docs/datastore_format.md), in one place.

The reader (`retriever`) and the writer (`datastore_tools`) both import this module, so the two
sides cannot drift apart; the writer depends on the reader, never the other way round.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
PAYLOADS_DIR = "payloads.lmdb"
PAYLOADS_DATA = "payloads.lmdb/data.mdb"
EMBEDDINGS_FILE = "embeddings.npy"
SPARSE_DIR = "bm25"
"""Optional BM25 index of the chunk texts (retriever/sparse.py); manifest key "sparse"."""
CHUNKS_DB = b"chunks"
DOCS_DB = b"docs"
EMBEDDER_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def source_key(source: str) -> str:
    """Sources compare by real path when they name files, so the leakage guards see through
    relative and absolute spellings of one file."""
    return os.path.realpath(source) if os.path.exists(source) else source


def shared_sources(stored: Iterable[dict], sources: Iterable[str]) -> list[str]:
    """The `sources` that name one of the `stored` documents (docs.json entries), by source_key."""
    inside = {source_key(doc["source"]) for doc in stored}
    return [source for source in sources if source_key(source) in inside]


def encode_key(value: int) -> bytes:
    """LMDB keys are 8-byte big-endian so byte order equals numeric order (cursor scans are sorted)."""
    return struct.pack(">Q", value)


def decode_key(key: bytes) -> int:
    return struct.unpack(">Q", key)[0]


def dumps(record: dict[str, Any]) -> bytes:
    """Compact, key-sorted JSON: the same record always gives the same bytes (reproducible builds)."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def loads(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)


def read_manifest_file(path: Path) -> dict[str, Any]:
    """Parse manifest.json; raises OSError / ValueError for the caller to turn into its own error."""
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if not isinstance(manifest, dict):
        raise ValueError("manifest.json is not a JSON object")
    return manifest
