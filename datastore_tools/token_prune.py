"""Token (kNN-LM) datastores derived from another: greedy-merge pruning (`datastore prune --mode
token`), re-indexing (`datastore reduce`) and nested document subsets (`eval sweep --token-datastore`).

Efficient kNN-LM (He et al. 2021): entries are visited in id order; each entry not yet merged
absorbs those of its k nearest entries that come after it, are not yet merged and share its next
token. The new datastore keeps one entry per group (the visited one: its key, value and document)
with `counts.npy` = how many original entries it stands for; serving adds log(count) to its kNN
score (server/knn/speed.py `log_counts`). Entries merged away never absorb others, so every group
is its representative plus some of the representative's neighbours, all with its next token.

Pointers (`next.npy`) are remapped: a kept entry's successor becomes the representative of its
original successor (same next token, a near key), -1 stays -1. The successors of merged-away
entries are lost (RetoMaton's clustering keeps several per group; not done here).

Keys are read back from the index: exact for Flat (the default below 1M entries), decoded codes
for PQ/SQ, the PCA-space key mapped back to full size for a PCA chain (then the new index retrains
its PCA on those). The manifest records which. Publishing is atomic (datastore_tools/publish.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from datastore_tools import index_factory, publish
from datastore_tools.errors import DatastoreToolError
from datastore_tools.manifest import write_manifest
from retriever import format as fmt
from retriever import token_datastore as tds

log = logging.getLogger(__name__)


@dataclass
class MergePlan:
    keep: np.ndarray
    """int64 sorted ids of the entries kept (one per group)."""
    representative: np.ndarray
    """int64 [n]: the kept entry each original entry was merged into (itself when kept)."""
    counts: np.ndarray
    """int64 [len(keep)]: original entries each kept entry stands for."""


def greedy_merge(neighbours: np.ndarray, values: np.ndarray, counts: np.ndarray | None = None) -> MergePlan:
    """Greedy merge over precomputed neighbour lists.

    neighbours: int64 [n, k] ids of each entry's nearest entries (itself may be among them; -1
    padding). values: [n] next token per entry. counts: [n] weights of the entries (a datastore
    already merged), default 1 each; the kept counts sum to counts.sum().
    """
    n = len(values)
    values = np.asarray(values)
    weight = np.ones(n, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64).copy()
    representative = np.arange(n, dtype=np.int64)
    merged = np.zeros(n, dtype=bool)
    for i in range(n):
        if merged[i]:
            continue
        row = neighbours[i]
        # Later, unmerged, same next token; earlier unmerged entries are representatives already.
        take = row[(row > i) & (values[np.clip(row, 0, None)] == values[i])]
        take = take[~merged[take]]
        if len(take):
            take = np.unique(take)
            merged[take] = True
            representative[take] = i
            weight[i] += weight[take].sum()
    keep = np.nonzero(~merged)[0]
    return MergePlan(keep, representative, weight[keep])


def remap_pointers(next_ids: np.ndarray, plan: MergePlan) -> np.ndarray:
    """next.npy of the merged datastore: kept entry -> new id of its successor's representative."""
    new_id = np.full(len(plan.representative), -1, dtype=np.int64)
    new_id[plan.keep] = np.arange(len(plan.keep))
    following = np.asarray(next_ids, dtype=np.int64)[plan.keep]
    return np.where(following >= 0, new_id[plan.representative[np.clip(following, 0, None)]], -1)


def read_keys(index) -> tuple[np.ndarray, str]:
    """All keys [ntotal, full dim] float32 as the index can give them back, and how (for the manifest)."""
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexPreTransform) else outer
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    try:
        keys = outer.reconstruct_n(0, outer.ntotal)
    except RuntimeError as error:
        raise DatastoreToolError(f"cannot read keys back from a {type(inner).__name__} index ({error}); "
                                 "greedy merge needs a Flat, IVF, PQ or SQ index") from error
    how = "exact (Flat)" if isinstance(outer, faiss.IndexFlat) else f"reconstructed from {type(outer).__name__}"
    return np.ascontiguousarray(keys, dtype=np.float32), how


def neighbour_lists(index, keys: np.ndarray, k: int, batch: int = 4096) -> np.ndarray:
    """int64 [n, k + 1]: each key's k + 1 nearest entries in `index` (itself usually first)."""
    out = np.empty((len(keys), k + 1), dtype=np.int64)
    for start in range(0, len(keys), batch):
        _, ids = index.search(keys[start:start + batch], k + 1)
        out[start:start + batch] = ids
    return out


def publish_token_entries(store, output: Path, keys: np.ndarray, keep: np.ndarray, *, factory: str,
                          pca: int | None, counts: np.ndarray | None, next_ids: np.ndarray, force: bool,
                          seconds: dict, note: dict, docs: list | None = None) -> dict:
    """Publish entries `keep` of `store` (keys re-indexed with `factory`/`pca`) as a new token datastore;
    `next_ids` are already in the new numbering; `note` is merged into the manifest (what was done);
    `docs`: the documents list to write (default: the source's; entries keep their document ids)."""
    docs = store.docs if docs is None else docs
    manifest = json.loads(json.dumps(store.manifest))
    built, info = index_factory.build_index(keys[keep], factory, pca, search_params=manifest["index"].get("search_params"),
                                           metric="l2")
    seconds = {**seconds, **info["seconds"]}
    with publish.staged(output, force) as stage:
        faiss.write_index(built, str(stage / fmt.INDEX_FILE))
        np.save(stage / tds.VALUES_FILE, np.asarray(store.values[keep], dtype=np.int32))
        np.save(stage / tds.NEXT_FILE, next_ids)
        np.save(stage / tds.DOC_IDS_FILE, np.asarray(store.doc_ids[keep], dtype=np.int32))
        if counts is not None:
            np.save(stage / tds.COUNTS_FILE, counts.astype(np.int64))
        (stage / tds.DOCS_FILE).write_text(json.dumps(docs, ensure_ascii=False))
        manifest.pop("files", None)
        manifest.pop("gate", None)  # gate.json is not copied: train one for the new datastore
        manifest.update(name=output.name, created_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                        index=info["index"], pca=info["pca"], dims=info["dims"])
        manifest["counts"] = {**manifest["counts"], "entries": int(len(keep)), "documents": len(docs),
                              "original_entries": int(counts.sum()) if counts is not None else int(len(keep))}
        for key, value in note.items():
            manifest[key] = {**value, "seconds": seconds}
        return write_manifest(stage, manifest)


def reduce_token_datastore(source: str | Path, output: str | Path, pca_dim: int | None, *, index: str | None = None,
                           force: bool = False) -> dict:
    """`datastore reduce` of a token datastore: the same entries, keys re-indexed after PCA to `pca_dim`
    (queries stay full size: the PCA is the first step of the index). Keys are read back from the
    source index (exact for Flat and IVF-Flat), so no hidden states are recomputed."""
    output = Path(output)
    store = tds.TokenDatastore.open(source, device="cpu")
    keys, keys_from = read_keys(store.index)
    keep = np.arange(store.ntotal)
    manifest = publish_token_entries(
        store, output, keys, keep, factory=index or store.manifest["index"]["factory"], pca=pca_dim,
        counts=store.counts, next_ids=np.asarray(store.next_ids), force=force, seconds={},
        note={"reduce": {"pca": pca_dim, "source": str(source), "keys": keys_from}})
    log.info("token reduce %s -> %s: PCA %s, %d entries", source, output, pca_dim, store.ntotal)
    return manifest


def prune_token_datastore(source: str | Path, output: str | Path, *, k: int = 8, index: str | None = None,
                          force: bool = False) -> dict:
    """Greedy-merge `source` into `output`; returns the new manifest."""
    if k < 1:
        raise DatastoreToolError(f"--merge-k {k} must be >= 1")
    output = Path(output)
    store = tds.TokenDatastore.open(source, device="cpu")  # searched through its FAISS index below
    started = time.perf_counter()
    keys, keys_from = read_keys(store.index)
    neighbours = neighbour_lists(store.index, keys, k)
    plan = greedy_merge(neighbours, store.values, store.counts)
    seconds = {"merge": time.perf_counter() - started}
    manifest = publish_token_entries(
        store, output, keys, plan.keep, factory=index or store.manifest["index"]["factory"],
        pca=(store.manifest.get("pca") or {}).get("dim"), counts=plan.counts,
        next_ids=remap_pointers(store.next_ids, plan), force=force, seconds=seconds,
        note={"merge": {"method": "greedy (He et al. 2021)", "k": k, "source": str(source),
                        "entries_before": int(store.ntotal), "entries_after": int(len(plan.keep)),
                        "keys": keys_from}})
    log.info("greedy merge %s -> %s: %d -> %d entries", source, output, store.ntotal, len(plan.keep))
    return manifest


def subset_token_datastore(source: str | Path, output: str | Path, documents: int, *, index: str | None = None,
                           force: bool = False) -> dict:
    """The entries of `source`'s first `documents` documents (in its document order) as a new token
    datastore, keys read back from the source index (no hidden states recomputed): the nested
    datastores of `retroserve eval sweep --token-datastore`. Pointers stay within a document, so
    every kept entry keeps its successor (renumbered)."""
    output = Path(output)
    store = tds.TokenDatastore.open(source, device="cpu")
    if not 1 <= documents <= len(store.docs):
        raise DatastoreToolError(f"{source} has {len(store.docs)} documents; a subset of {documents} is not possible")
    keys, keys_from = read_keys(store.index)
    keep = np.flatnonzero(store.doc_ids < documents)
    new_id = np.full(store.ntotal, -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    following = np.asarray(store.next_ids, dtype=np.int64)[keep]
    next_ids = np.where(following >= 0, new_id[np.clip(following, 0, None)], -1)
    manifest = publish_token_entries(
        store, output, keys, keep, factory=index or store.manifest["index"]["factory"],
        pca=(store.manifest.get("pca") or {}).get("dim"),
        counts=None if store.counts is None else store.counts[keep], next_ids=next_ids, force=force,
        seconds={}, docs=list(store.docs[:documents]),
        note={"subset": {"source": str(source), "documents": documents, "keys": keys_from}})
    log.info("token subset %s -> %s: %d of %d documents, %d entries", source, output, documents, len(store.docs),
             len(keep))
    return manifest
