"""`datastore reduce`: re-encode a datastore to fewer dimensions with PCA (same chunks and ids).

Needs the raw embeddings (raw_embeddings.py): stored ones by default, so no re-embedding happens.
"""

from __future__ import annotations

from pathlib import Path

from datastore_tools.derive import write_derived
from datastore_tools.raw_embeddings import load_raw_embeddings
from retriever.datastore import Datastore


def reduce_datastore(source: str | Path, output: str | Path, pca_dim: int | None, index: str | None = None,
                     force: bool = False) -> dict:
    """Publish a copy of `source` whose index is PCA(pca_dim) + `index` (default: the source's factory);
    pca_dim None re-indexes the full-size embeddings (e.g. the same chunks under a compressed index)."""
    with Datastore.open(source, device="cpu") as datastore:
        vectors, origin = load_raw_embeddings(datastore)
        factory = index or datastore.manifest["index"]["factory"]
        return write_derived(
            datastore, Path(output), range(datastore.ntotal), vectors,
            factory=factory, pca_dim=pca_dim, force=force,
            operation={"reduce": {"pca": pca_dim, "index": factory, "embeddings": origin}},
        )
