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
    problems = check_files(path, manifest, checksums=True)
    listed = set((manifest.get("files") or {}))
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {fmt.MANIFEST}
    for extra in sorted(on_disk - listed - {"payloads.lmdb/lock.mdb"}):
        problems.append(f"{extra}: not listed in manifest.json (stray file)")
    if any(p.startswith((fmt.INDEX_FILE, fmt.PAYLOADS_DATA)) for p in problems):
        return problems  # the structural checks below would only repeat the damage
    counts = manifest.get("counts") or {}
    try:
        index, _ = read_index(path / fmt.INDEX_FILE)
    except DatastoreError as error:
        return problems + [str(error)]
    if index.ntotal != counts.get("chunks"):
        problems.append(f"{fmt.INDEX_FILE}: {index.ntotal} vectors, manifest counts {counts.get('chunks')} chunks")
    dims = manifest.get("dims") or {}
    if index.d != dims.get("embedding"):
        problems.append(f"{fmt.INDEX_FILE}: takes {index.d}-d queries, manifest says {dims.get('embedding')}")
    shard = manifest.get("shard")
    # A shard (datastore_tools/shard.py) holds its parent's chunk ids [first, end), plus payload-only
    # continuation chunks; an unsharded datastore holds ids 0..chunks-1.
    first, end = shard["chunk_ids"] if shard else (0, counts.get("chunks"))
    continuation_ids = set(shard.get("continuation_ids", ())) if shard else set()
    if shard:
        from datastore_tools.shard import stored_ids

        ids = stored_ids(index)
        if not np.array_equal(ids, np.arange(first, end)):
            problems.append(f"{fmt.INDEX_FILE}: ids are not exactly the shard's chunk ids [{first}, {end})")
    try:
        reader = PayloadReader(path / fmt.PAYLOADS_DIR)
    except DatastoreError as error:
        return problems + [str(error)]
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
            if chunk_id in continuation_ids:
                if not record.get("tokens"):
                    problems.append(f"{where}: has no tokens")
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
                first, count = doc["chunks"]
                if not first <= chunk_id < first + count:
                    problems.append(f"{where}: outside its document's range [{first}, {first + count})")
            if not record.get("tokens"):
                problems.append(f"{where}: has no tokens")
            if len(problems) > 50:
                problems.append("... (stopped after 50 problems)")
                break
    finally:
        reader.close()
    embeddings = path / fmt.EMBEDDINGS_FILE
    if embeddings.is_file() and fmt.EMBEDDINGS_FILE in listed:
        shape = np.load(embeddings, mmap_mode="r").shape
        if shape != (counts.get("chunks"), dims.get("embedding")):
            problems.append(f"{fmt.EMBEDDINGS_FILE}: shape {shape}, expected ({counts.get('chunks')}, {dims.get('embedding')})")
    return problems
