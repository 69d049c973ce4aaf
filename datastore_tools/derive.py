"""Write a new datastore derived from an existing one (prune, reduce): subset, renumber, re-index.

Kept chunks keep their relative order and get ids 0..M-1. A continuation link to a removed chunk is
redirected to the chunk that replaced it (`redirect`, e.g. its duplicate's representative), and
becomes -1 when nothing replaces it. Documents without kept chunks disappear.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from datastore_tools import index_factory, payloads, publish, sparse_build
from datastore_tools.errors import DatastoreToolError
from datastore_tools.manifest import make_manifest, write_manifest
from datastore_tools.raw_embeddings import refuse_shard
from retriever import format as fmt
from retriever.datastore import Datastore


def write_derived(
    source: Datastore,
    output: Path,
    keep: Sequence[int],
    vectors: np.ndarray,
    *,
    factory: str,
    pca_dim: int | None,
    operation: dict,
    redirect: dict[int, int] | None = None,
    seed: int = 1234,
    search_params: dict | None = None,
    keep_embeddings: bool = True,
    force: bool = False,
) -> dict:
    """Publish the datastore of chunks `keep` (old ids, ascending) with embeddings `vectors` [len(keep), d]."""
    refuse_shard(source)
    redirect = redirect or {}
    keep = sorted(int(i) for i in keep)
    new_id = {old: new for new, old in enumerate(keep)}
    seconds = {}
    with publish.staged(Path(output), force) as stage:
        index, index_info = index_factory.build_index(vectors, factory, pca_dim, seed=seed, search_params=search_params)
        seconds.update(index_info["seconds"])
        started = time.perf_counter()
        chunk_records, doc_new_id, doc_rows = [], {}, []
        with source.payloads.env.begin() as txn:
            for old in keep:
                record = source.payloads.chunk(txn, old)
                nxt = record["next"]
                seen = set()
                while nxt >= 0 and nxt not in new_id and nxt in redirect and nxt not in seen:
                    seen.add(nxt)
                    nxt = redirect[nxt]
                nxt = new_id.get(nxt, -1) if nxt >= 0 else -1
                if nxt == new_id[old]:
                    nxt = -1  # a chunk cannot continue into itself
                if record["doc"] not in doc_new_id:
                    doc_new_id[record["doc"]] = len(doc_rows)
                    doc = source.payloads.doc(txn, record["doc"])
                    doc_rows.append([doc["source"], doc.get("title", ""), new_id[old], 0])
                doc_rows[doc_new_id[record["doc"]]][3] += 1
                chunk_records.append(payloads.chunk_record(
                    record["tokens"], record["text"], doc_new_id[record["doc"]], record["pos"], nxt))
        doc_records = [payloads.doc_record(*row) for row in doc_rows]
        payloads.write_payloads(stage, chunk_records, doc_records)
        seconds["payloads"] = time.perf_counter() - started
        faiss.write_index(index, str(stage / fmt.INDEX_FILE))
        if keep_embeddings:
            np.save(stage / fmt.EMBEDDINGS_FILE, np.asarray(vectors, dtype=np.float16))
        src = source.manifest
        extra = {}
        if src.get("sparse"):
            extra["sparse"] = sparse_build.write_sparse_index(
                stage / fmt.SPARSE_DIR, [record["text"] for record in chunk_records], range(len(chunk_records)))
        manifest = make_manifest(
            name=Path(output).name,
            tokenizer=src["tokenizer"],
            model=src.get("model"),
            embedder=src["embedder"],
            chunk_tokens=src["chunk_tokens"],
            index_info=index_info,
            counts={"documents": len(doc_records), "chunks": len(chunk_records)},
            build={"operation": operation, "seconds": seconds},
            extra={**extra, "derived_from": {
                "path": str(source.path),
                "name": src.get("name"),
                "index_sha256": (src.get("files") or {}).get(fmt.INDEX_FILE, {}).get("sha256"),
            }},
        )
        manifest = write_manifest(stage, manifest)
    return manifest


def subset_by_sources(
    source_path: str | Path,
    output: str | Path,
    sources: set[str],
    *,
    index: str | None = None,
    force: bool = False,
) -> dict:
    """Publish the datastore of the chunks whose document came from one of `sources` (file paths as
    the build recorded them), re-using the stored embeddings instead of embedding again.

    The datastore-size sweep of `retroserve eval sweep` builds its largest datastore once and cuts
    the smaller, nested ones from it with this: same chunks, same vectors as building them from
    the file subset (up to the float16 rounding of the stored embeddings), at a fraction of the time.
    """
    from datastore_tools.raw_embeddings import load_raw_embeddings

    with Datastore.open(source_path, device="cpu") as datastore:
        # A JSONL line's source is "path:line".
        wanted_docs = {doc_id for doc_id, doc in datastore.payloads.iter_docs()
                       if doc["source"] in sources or doc["source"].rsplit(":", 1)[0] in sources}
        if not wanted_docs:
            raise DatastoreToolError(f"none of the {len(sources)} requested sources is in {source_path}")
        keep = [i for i, record in datastore.payloads.iter_chunks() if record["doc"] in wanted_docs]
        vectors, _ = load_raw_embeddings(datastore)
        return write_derived(
            datastore, Path(output), keep, vectors[keep],
            factory=index or datastore.manifest["index"]["factory"],
            pca_dim=(datastore.manifest.get("pca") or {}).get("dim"), force=force,
            operation={"subset": {"sources": len(sources), "documents": len(wanted_docs)}},
        )
