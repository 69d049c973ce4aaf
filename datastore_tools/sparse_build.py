"""Write a chunk datastore's BM25 index (retriever/sparse.py): at build time, or added to a published one.

`add_bm25` works in place and loses nothing when interrupted: the index is written to a sibling
folder, renamed to `bm25/`, and only then listed in a manifest.json that is replaced atomically; a
reader sees the old manifest (which does not know the folder) or the new one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from datastore_tools.errors import DatastoreToolError
from datastore_tools.manifest import write_manifest
from retriever import format as fmt
from retriever import sparse
from retriever.datastore import Datastore


def write_sparse_index(folder: Path, texts: Sequence[str], chunk_ids: Sequence[int]) -> dict:
    """Index `texts` (chunk `chunk_ids[i]`'s text) into `folder`; the manifest's "sparse" entry."""
    import bm25s

    started = time.perf_counter()
    index = bm25s.BM25()
    index.index(bm25s.tokenize(list(texts), stopwords=sparse.STOPWORDS, show_progress=False),
                show_progress=False)
    folder.mkdir(parents=True)
    index.save(str(folder), show_progress=False)
    np.save(folder / sparse.CHUNK_IDS_FILE, np.asarray(chunk_ids, dtype=np.int64))
    return {"bm25": dict(sparse.index_info(index), chunks=len(chunk_ids),
                         seconds=round(time.perf_counter() - started, 3))}


def add_bm25(path: str | Path, force: bool = False) -> dict:
    """Add a BM25 index of every chunk's text to the chunk datastore at `path`; the new manifest."""
    path = Path(path)
    with Datastore.open(path, device="cpu") as datastore:
        manifest = dict(datastore.manifest)
        if manifest.get("sparse") and not force:
            raise DatastoreToolError(f"{path} already has a BM25 index; pass --force to rebuild it")
        records = list(datastore.payloads.iter_chunks())
    stage = path / f"{fmt.SPARSE_DIR}.partial-{secrets.token_hex(4)}"
    try:
        manifest["sparse"] = write_sparse_index(stage, [r["text"] for _, r in records], [i for i, _ in records])
        final = sparse.sparse_dir(path)
        if final.exists():
            old = path / f"{fmt.SPARSE_DIR}.old-{secrets.token_hex(4)}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return write_manifest(path, manifest)
