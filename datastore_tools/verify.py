"""`datastore verify`: every check a server relies on, reported as a list of named problems."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retriever import format as fmt
from retriever.datastore import DatastoreError, PayloadReader, check_files, read_index, read_manifest


def verify_datastore(path: str | Path) -> list[str]:
    """Problems found (empty when the datastore is sound); each names the file concerned."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except DatastoreError as error:
        return [str(error)]
    problems = check_files(path, manifest, checksums=True) + _stray_files(path, manifest)
    if any(p.startswith((fmt.INDEX_FILE, fmt.PAYLOADS_DATA)) for p in problems):
        return problems  # the structural checks below would only repeat the damage
    try:
        problems += _check_index(path, manifest)
        problems += _check_payloads(path, manifest)
    except DatastoreError as error:  # the index or the payloads cannot be opened
        return problems + [str(error)]
    return problems + _check_embeddings(path, manifest)


def _stray_files(path: Path, manifest: dict) -> list[str]:
    listed = set(manifest.get("files") or {})
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {fmt.MANIFEST}
    return [f"{extra}: not listed in manifest.json (stray file)"
            for extra in sorted(on_disk - listed - {"payloads.lmdb/lock.mdb"})]


def _chunk_id_range(manifest: dict) -> tuple[int, int, set[int]]:
    """[first, end) of the chunk ids the index holds, and the payload-only continuation ids: a shard
    (datastore_tools/shard.py) holds its parent's ids [first, end) plus the continuation chunks of
    its last chunks; an unsharded datastore holds ids 0..chunks-1 and no others."""
    shard = manifest.get("shard")
    if not shard:
        return 0, (manifest.get("counts") or {}).get("chunks"), set()
    first, end = shard["chunk_ids"]
    return first, end, set(shard.get("continuation_ids", ()))


def _check_index(path: Path, manifest: dict) -> list[str]:
    counts, dims = manifest.get("counts") or {}, manifest.get("dims") or {}
    index, _ = read_index(path / fmt.INDEX_FILE)
    problems = []
    if index.ntotal != counts.get("chunks"):
        problems.append(f"{fmt.INDEX_FILE}: {index.ntotal} vectors, manifest counts {counts.get('chunks')} chunks")
    if index.d != dims.get("embedding"):
        problems.append(f"{fmt.INDEX_FILE}: takes {index.d}-d queries, manifest says {dims.get('embedding')}")
    if manifest.get("shard"):
        from datastore_tools.shard import stored_ids

        first, end, _ = _chunk_id_range(manifest)
        if not np.array_equal(stored_ids(index), np.arange(first, end)):
            problems.append(f"{fmt.INDEX_FILE}: ids are not exactly the shard's chunk ids [{first}, {end})")
    return problems


def _check_payloads(path: Path, manifest: dict) -> list[str]:
    """Counts, contiguous ids, continuation links, document ranges and tokens of every chunk."""
    counts = manifest.get("counts") or {}
    first, _, continuation_ids = _chunk_id_range(manifest)
    problems = []
    reader = PayloadReader(path / fmt.PAYLOADS_DIR)
    try:
        n_chunks, n_docs = reader.count()
        if n_chunks != (counts.get("chunks") or 0) + len(continuation_ids):
            problems.append(f"{fmt.PAYLOADS_DATA}: {n_chunks} chunks, manifest counts {counts.get('chunks')}"
                            + (f" + {len(continuation_ids)} continuations" if continuation_ids else ""))
        if n_docs != counts.get("documents"):
            problems.append(f"{fmt.PAYLOADS_DATA}: {n_docs} documents, manifest counts {counts.get('documents')}")
        docs = dict(reader.iter_docs())
        with reader.env.begin() as txn:
            payload_ids = {fmt.decode_key(key) for key in txn.cursor(db=reader.chunks_db).iternext(values=False)}
        expected_id = first
        for chunk_id, record in reader.iter_chunks():
            where = f"{fmt.PAYLOADS_DATA}: chunk {chunk_id}"
            if not record.get("tokens"):
                problems.append(f"{where}: has no tokens")
            if chunk_id in continuation_ids:
                continue  # payload-only: read as a continuation, never returned as a neighbour
            if chunk_id != expected_id:
                problems.append(f"{where}: ids are not contiguous (expected {expected_id})")
                expected_id = chunk_id
            expected_id += 1
            nxt = record.get("next")
            if not isinstance(nxt, int) or nxt < -1 or (nxt >= 0 and nxt not in payload_ids) or nxt == chunk_id:
                problems.append(f"{where}: continuation link {nxt!r} points outside the datastore")
            doc = docs.get(record.get("doc"))
            if doc is None:
                problems.append(f"{where}: document {record.get('doc')!r} does not exist")
            else:
                doc_first, doc_count = doc["chunks"]
                if not doc_first <= chunk_id < doc_first + doc_count:
                    problems.append(f"{where}: outside its document's range [{doc_first}, {doc_first + doc_count})")
            if len(problems) > 50:
                problems.append("... (stopped after 50 problems)")
                break
    finally:
        reader.close()
    return problems


def _check_embeddings(path: Path, manifest: dict) -> list[str]:
    counts, dims = manifest.get("counts") or {}, manifest.get("dims") or {}
    embeddings = path / fmt.EMBEDDINGS_FILE
    if not (embeddings.is_file() and fmt.EMBEDDINGS_FILE in (manifest.get("files") or {})):
        return []
    shape = np.load(embeddings, mmap_mode="r").shape
    if shape != (counts.get("chunks"), dims.get("embedding")):
        return [f"{fmt.EMBEDDINGS_FILE}: shape {shape}, expected ({counts.get('chunks')}, {dims.get('embedding')})"]
    return []
