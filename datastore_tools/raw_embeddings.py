"""Raw (pre-PCA, full precision) embeddings of an existing datastore, for prune and reduce.

In order of preference: the stored `embeddings.npy` (fp16, written by default at build time); a
reconstruction from a `Flat` index without PCA (exact); otherwise the chunk texts are re-embedded,
which is slow but always possible because the payloads keep every chunk's text.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from datastore_tools.errors import DatastoreToolError
from retriever import format as fmt
from retriever.datastore import Datastore

log = logging.getLogger(__name__)


def refuse_shard(source: Datastore) -> None:
    """Shards keep global chunk ids and share their parent's index: derive from the parent instead."""
    shard = source.manifest.get("shard")
    if shard:
        raise DatastoreToolError(
            f"{source.path} is shard {shard['index']} of {shard['count']}; prune or reduce its parent "
            f"datastore ({shard['parent']['path']}) and shard the result again"
        )


def load_raw_embeddings(datastore: Datastore, encoder=None) -> tuple[np.ndarray, str]:
    """float32 [ntotal, 384] and where they came from ("stored", "reconstructed", "re-embedded")."""
    refuse_shard(datastore)
    stored = datastore.path / fmt.EMBEDDINGS_FILE
    if stored.is_file():
        return np.load(stored).astype(np.float32), "stored"
    plain = faiss.downcast_index(datastore.index)
    if isinstance(plain, (faiss.IndexFlatIP, faiss.IndexFlat)):
        return plain.reconstruct_n(0, plain.ntotal), "reconstructed"
    log.warning("%s has no embeddings.npy and a lossy index: re-embedding %d chunks", datastore.path, datastore.ntotal)
    texts = [record["text"] for _, record in datastore.payloads.iter_chunks()]
    encoder = encoder or datastore.encoder
    return encoder.encode(texts), "re-embedded"
