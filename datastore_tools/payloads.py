"""Write the LMDB payload store: chunk id -> tokens/text/doc/pos/next, doc id -> source/title/range.

Records are encoded by `retriever.format.dumps` (sorted keys, compact) and written in id order in
fixed-size transactions, so the same records always produce the same `data.mdb` bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lmdb

from retriever.format import CHUNKS_DB, DOCS_DB, PAYLOADS_DIR, dumps, encode_key

TXN_RECORDS = 10_000


def chunk_record(tokens: Sequence[int], text: str, doc: int, pos: int, next_id: int) -> dict:
    return {"tokens": list(tokens), "text": text, "doc": doc, "pos": pos, "next": next_id}


def doc_record(source: str, title: str, first_id: int, count: int) -> dict:
    return {"source": source, "title": title, "chunks": [first_id, count]}


def write_payloads(datastore_dir: Path, chunks: Sequence[dict], docs: Sequence[dict]) -> Path:
    """Create `payloads.lmdb/` in `datastore_dir` (which must not have one yet); ids are list positions."""
    return write_encoded_payloads(
        datastore_dir,
        [(i, dumps(record)) for i, record in enumerate(chunks)],
        [(i, dumps(record)) for i, record in enumerate(docs)],
    )


def write_encoded_payloads(datastore_dir: Path, chunks: Sequence[tuple[int, bytes]],
                           docs: Sequence[tuple[int, bytes]]) -> Path:
    """Create `payloads.lmdb/` from (id, encoded record) pairs in ascending id order. Ids need not
    be contiguous: a shard keeps its parent's global ids (datastore_tools/shard.py)."""
    path = Path(datastore_dir) / PAYLOADS_DIR
    payload_bytes = sum(len(raw) for _, raw in chunks) + sum(len(raw) for _, raw in docs)
    # LMDB needs a map size up front; on Linux the file only grows to the pages actually used.
    map_size = 2 * payload_bytes + 64 * (len(chunks) + len(docs)) + (64 << 20)
    env = lmdb.open(str(path), map_size=map_size, max_dbs=2, subdir=True, lock=True, sync=True)
    try:
        for name, records in ((CHUNKS_DB, chunks), (DOCS_DB, docs)):
            db = env.open_db(name)
            for start in range(0, len(records), TXN_RECORDS):
                with env.begin(write=True, db=db) as txn:
                    for key, raw in records[start : start + TXN_RECORDS]:
                        if not txn.put(encode_key(key), raw, append=True):
                            raise ValueError(f"payload ids must ascend without repeats (at id {key})")
        env.sync(True)
    finally:
        env.close()
    lock = path / "lock.mdb"
    if lock.exists():
        lock.unlink()  # readers open with lock=False; the lock file is not part of the datastore
    return path
