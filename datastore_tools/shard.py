"""`datastore shard`: split a published datastore into N shards that share one trained index.

Why this shape: the server merges each shard's top-k into one top-k, which is only right if a
score means the same thing on every shard and a chunk id names the same chunk everywhere. So no
shard is retrained: the parent's trained index (PCA, IVF centroids, PQ/SQ codebooks) is emptied
once and every shard is filled from it with the parent's stored codes, byte for byte, under the
parent's global chunk ids (IVF lists keep ids; flat-code indexes are wrapped in IndexIDMap2).
The union of the shards' top-k then contains the unsharded top-k with identical scores.

Shards are cut at document boundaries, near equal in chunks, so a chunk's continuation lives in
its own shard; a continuation that points elsewhere (after `prune` redirected it to a duplicate's
representative) is copied into the shard as a payload-only record. Each shard is a complete
datastore (manifest with `shard`, checksums, `verify` passes) without `embeddings.npy`; the set
is staged next to the output and published with one rename, so it is complete or absent.
HNSW graphs are built from their own vectors and cannot be shared, so they are refused.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from datastore_tools import payloads, publish
from datastore_tools.errors import DatastoreToolError
from datastore_tools.manifest import make_manifest, write_manifest
from retriever import format as fmt
from retriever.datastore import PayloadReader, read_manifest

log = logging.getLogger(__name__)

SHARD_DIR = "shard-{index}"
"""Name of shard `index` inside the output directory (the StatefulSet's pod index fills it in)."""


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds chunk ids [first, end) and documents `doc_ids`."""

    index: int
    first: int
    end: int
    doc_ids: tuple[int, ...]


def shard_dir(output: Path, index: int) -> Path:
    return Path(output) / SHARD_DIR.format(index=index)


def plan_shards(docs: list[tuple[int, int, int]], total_chunks: int, count: int) -> list[ShardPlan]:
    """Cut `docs` [(doc id, first chunk, chunk count)] into `count` contiguous chunk ranges at
    document starts, each as close to total/count chunks as the boundaries allow."""
    with_chunks = sorted((first, doc_id) for doc_id, first, n in docs if n > 0)
    if not 1 <= count <= len(with_chunks):
        raise DatastoreToolError(
            f"cannot cut {len(with_chunks)} documents into {count} shards: shards are cut at document "
            f"boundaries, so the shard count must be between 1 and {len(with_chunks)}; choose -n in that range"
        )
    starts = [first for first, _ in with_chunks[1:]]  # candidate cut points, ascending
    cuts, low = [], 0
    for i in range(1, count):
        high = len(starts) - (count - 1 - i)  # leave enough cut points for the shards still to come
        target = i * total_chunks / count
        j = bisect.bisect_left(starts, target, low, high)
        if j == high or (j > low and target - starts[j - 1] <= starts[j] - target):
            j -= 1
        j = max(j, low)
        cuts.append(starts[j])
        low = j + 1
    bounds = [0, *cuts, total_chunks]
    plans = []
    for index, (first, end) in enumerate(zip(bounds, bounds[1:])):
        last = index == count - 1
        members = tuple(sorted(doc_id for doc_id, doc_first, _ in docs
                               if first <= doc_first < end or (last and doc_first >= end)))
        plans.append(ShardPlan(index, first, end, members))
    return plans


# ---- index -------------------------------------------------------------------------------------

def _split_chain(index: faiss.Index) -> tuple[list, faiss.Index]:
    """(vector transforms, inner index) of an IndexPreTransform, or ([], index)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        transforms = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        return transforms, faiss.downcast_index(index.index)
    return [], index


def check_shardable(index: faiss.Index, factory: str) -> None:
    """Refuse indexes whose trained part cannot be shared, naming a factory that can."""
    _, inner = _split_chain(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        invlists = faiss.downcast_InvertedLists(ivf.invlists)
        if not isinstance(invlists, faiss.ArrayInvertedLists):
            raise DatastoreToolError(
                f"index {factory!r} keeps its IVF lists as {type(invlists).__name__}, which cannot be split "
                f"list entry by list entry; re-index with a plain IVF (e.g. `retroserve datastore prune "
                f"SRC DST --no-exact --index IVF1024,PQ96`) and shard that"
            )
        return
    if isinstance(inner, faiss.IndexFlatCodes) and not isinstance(inner, faiss.IndexIDMap):
        return
    raise DatastoreToolError(
        f"index {factory!r} ({type(inner).__name__}) cannot be split into shards that share one trained "
        f"index (an HNSW graph is built from its own vectors); re-index as Flat or IVF (e.g. `retroserve "
        f"datastore prune SRC DST --no-exact --index IVF1024,PQ96`) and shard that"
    )


def trained_template(parent: faiss.Index) -> faiss.Index:
    """The parent's trained index with no entries (one temporary copy of the parent)."""
    template = faiss.clone_index(parent)
    template.reset()
    return template


def shard_index_bytes(parent: faiss.Index, template: faiss.Index, first: int, end: int) -> bytes:
    """Serialized index of the parent's entries with ids in [first, end), codes copied unchanged."""
    ivf = faiss.try_extract_index_ivf(parent)
    if ivf is not None:
        shard = faiss.clone_index(template)
        shard_ivf = faiss.extract_index_ivf(shard)
        source = faiss.downcast_InvertedLists(ivf.invlists)
        code_size, added = source.code_size, 0
        for list_no in range(ivf.nlist):
            size = source.list_size(list_no)
            if not size:
                continue
            ids = faiss.rev_swig_ptr(source.get_ids(list_no), size)
            keep = np.flatnonzero((ids >= first) & (ids < end))
            if not len(keep):
                continue
            codes = faiss.rev_swig_ptr(source.get_codes(list_no), size * code_size).reshape(size, code_size)
            kept_ids = np.ascontiguousarray(ids[keep], dtype=np.int64)
            kept_codes = np.ascontiguousarray(codes[keep])
            shard_ivf.invlists.add_entries(list_no, len(keep), faiss.swig_ptr(kept_ids), faiss.swig_ptr(kept_codes))
            added += len(keep)
        if added != end - first:
            raise DatastoreToolError(f"the index lists hold {added} of chunk ids [{first}, {end}); the datastore "
                                     f"is inconsistent: run `retroserve datastore verify` on it")
        shard_ivf.ntotal = shard.ntotal = added
        return faiss.serialize_index(shard)
    # Flat codes (Flat, SQ, PQ): an IDMap2 over the emptied inner index, given the parent's code rows.
    # Every object below stays referenced until serialize_index has copied it.
    _, inner = _split_chain(parent)
    template_copy = faiss.clone_index(template)
    transforms, empty_inner = _split_chain(template_copy)
    id_map = faiss.IndexIDMap2(empty_inner)  # must wrap an empty index
    codes = faiss.vector_to_array(inner.codes).reshape(inner.ntotal, inner.code_size)
    empty_inner.add_sa_codes(np.ascontiguousarray(codes[first:end]))
    faiss.copy_array_to_vector(np.arange(first, end, dtype=np.int64), id_map.id_map)
    id_map.ntotal = end - first
    if not transforms:
        return faiss.serialize_index(id_map)
    chain = faiss.IndexPreTransform(id_map)  # does not own its parts: template_copy does
    for transform in reversed(transforms):
        chain.prepend_transform(transform)
    data = faiss.serialize_index(chain)
    del chain
    return data


def stored_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index returns, sorted (IVF list ids, an IndexIDMap's map, else 0..ntotal-1)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(ivf.nlist) if lists.list_size(i)]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    _, inner = _split_chain(index)
    if isinstance(inner, faiss.IndexIDMap):
        return np.sort(faiss.vector_to_array(inner.id_map))
    return np.arange(index.ntotal, dtype=np.int64)


# ---- payloads ----------------------------------------------------------------------------------

def _payload_records(reader: PayloadReader, plan: ShardPlan, doc_of_shard: dict[int, int]):
    """(chunk records, doc records, continuation-only ids) for one shard, as raw LMDB bytes."""
    chunks, extra_ids = [], set()
    with reader.env.begin() as txn:
        cursor = txn.cursor(db=reader.chunks_db)
        if plan.end > plan.first and cursor.set_range(fmt.encode_key(plan.first)):
            for key, raw in cursor:
                chunk_id = fmt.decode_key(key)
                if chunk_id >= plan.end:
                    break
                record = fmt.loads(raw)
                if doc_of_shard.get(record["doc"]) != plan.index:
                    raise DatastoreToolError(
                        f"chunk {chunk_id} belongs to document {record['doc']}, whose chunks are not "
                        f"contiguous; the datastore is inconsistent: run `retroserve datastore verify` on it"
                    )
                chunks.append((chunk_id, bytes(raw)))
                nxt = record["next"]
                if nxt >= 0 and not plan.first <= nxt < plan.end:
                    extra_ids.add(nxt)
        if len(chunks) != plan.end - plan.first:
            raise DatastoreToolError(
                f"payloads hold {len(chunks)} of chunks [{plan.first}, {plan.end}); the datastore is "
                f"damaged: run `retroserve datastore verify` on it"
            )
        for chunk_id in extra_ids:
            raw = txn.get(fmt.encode_key(chunk_id), db=reader.chunks_db)
            if raw is None:
                raise DatastoreToolError(f"continuation chunk {chunk_id} is missing from the payloads; "
                                         f"run `retroserve datastore verify` on the datastore")
            chunks.append((chunk_id, bytes(raw)))
        docs = [(doc_id, bytes(txn.get(fmt.encode_key(doc_id), db=reader.docs_db))) for doc_id in plan.doc_ids]
    chunks.sort()
    return chunks, docs, sorted(extra_ids)


# ---- the command -------------------------------------------------------------------------------

def shard_datastore(source: str | Path, output: str | Path, count: int, force: bool = False) -> list[dict]:
    """Publish `output/shard-0 .. shard-{count-1}`; returns their manifests."""
    source, output = Path(source), Path(output)
    parent_manifest = read_manifest(source)
    if parent_manifest.get("shard"):
        shard = parent_manifest["shard"]
        raise DatastoreToolError(
            f"{source} is already shard {shard.get('index')} of {shard.get('count')}; shard its parent "
            f"datastore ({(shard.get('parent') or {}).get('path')}) instead"
        )
    publish.check_output(output, force)
    factory = parent_manifest["index"]["factory"]
    started = time.perf_counter()
    try:
        parent_index = faiss.read_index(str(source / fmt.INDEX_FILE))
    except RuntimeError as error:
        raise DatastoreToolError(f"{source / fmt.INDEX_FILE} is not a readable FAISS index ({error}); "
                                 f"run `retroserve datastore verify {source}`") from error
    check_shardable(parent_index, factory)
    total = int(parent_index.ntotal)
    if total != parent_manifest["counts"]["chunks"]:
        raise DatastoreToolError(f"{source}: the index has {total} entries but the manifest counts "
                                 f"{parent_manifest['counts']['chunks']} chunks; run "
                                 f"`retroserve datastore verify {source}`")
    reader = PayloadReader(source / fmt.PAYLOADS_DIR)
    try:
        docs = [(doc_id, record["chunks"][0], record["chunks"][1]) for doc_id, record in reader.iter_docs()]
        plans = plan_shards(docs, total, count)
        doc_of_shard = {doc_id: plan.index for plan in plans for doc_id in plan.doc_ids}
        template = trained_template(parent_index)
        trained_sha = hashlib.sha256(faiss.serialize_index(template)).hexdigest()
        parent_files = parent_manifest.get("files") or {}
        parent = {
            "name": parent_manifest.get("name"),
            "path": str(source.resolve()),
            "created_at": parent_manifest.get("created_at"),
            "index_sha256": (parent_files.get(fmt.INDEX_FILE) or {}).get("sha256"),
            "counts": parent_manifest.get("counts"),
        }
        seconds = {"prepare": time.perf_counter() - started}
        manifests = []
        with publish.staged(output, force) as stage:
            for plan in plans:
                manifests.append(_write_shard(stage, plan, count, parent_index, template, reader,
                                              doc_of_shard, parent_manifest, parent, trained_sha, seconds))
    finally:
        reader.close()
    log.info("published %d shards of %s to %s", count, source, output)
    return manifests


def _write_shard(stage: Path, plan: ShardPlan, count: int, parent_index, template, reader,
                 doc_of_shard, parent_manifest: dict, parent: dict, trained_sha: str, seconds: dict) -> dict:
    directory = shard_dir(stage, plan.index)
    directory.mkdir()
    started = time.perf_counter()
    (directory / fmt.INDEX_FILE).write_bytes(shard_index_bytes(parent_index, template, plan.first, plan.end))
    index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    chunks, docs, extra_ids = _payload_records(reader, plan, doc_of_shard)
    payloads.write_encoded_payloads(directory, chunks, docs)
    payload_seconds = time.perf_counter() - started
    index_info = {key: parent_manifest[key] for key in ("index", "pca", "dims")}
    manifest = make_manifest(
        name=f"{parent['name']}-shard-{plan.index}-of-{count}",
        tokenizer=parent_manifest["tokenizer"],
        model=parent_manifest.get("model"),
        embedder=parent_manifest["embedder"],
        chunk_tokens=parent_manifest["chunk_tokens"],
        index_info=index_info,
        counts={"documents": len(docs), "chunks": plan.end - plan.first},
        build={"operation": {"shard": {"index": plan.index, "count": count}},
               "seconds": dict(seconds, index=index_seconds, payloads=payload_seconds)},
        extra={
            "shard": {
                "index": plan.index,
                "count": count,
                "chunk_ids": [plan.first, plan.end],
                "continuation_ids": extra_ids,
                "trained_index_sha256": trained_sha,
                "parent": parent,
            },
            "derived_from": {"path": parent["path"], "name": parent["name"], "index_sha256": parent["index_sha256"]},
        },
    )
    return write_manifest(directory, manifest)
