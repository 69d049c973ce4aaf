"""`datastore prune`: drop exact duplicates, near-duplicates and never-retrieved chunks.

- exact: chunks with identical token sequences; the lowest id is kept.
- near (`near_dup`=cosine threshold): an exact range search of every chunk against all others over
  the raw embeddings; chunks are visited in id order and each kept chunk removes its not-yet-visited
  neighbours above the threshold. Every removed chunk therefore has a kept representative above the
  threshold, and a chunk without any neighbour above the threshold is never removed.
- retrieval log (JSONL, one object per retrieval with `chunk_ids`: [int...]): chunks never retrieved
  are dropped, except the continuations of retrieved chunks, which are served as part of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from datastore_tools.derive import write_derived
from datastore_tools.errors import DatastoreToolError
from datastore_tools.raw_embeddings import load_raw_embeddings
from retriever.datastore import Datastore

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    before: int = 0
    after: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    never_retrieved: int = 0
    representative: dict[int, int] = field(default_factory=dict)  # removed id -> kept id (duplicates)


def read_retrieval_log(path: Path, ntotal: int) -> set[int]:
    """Chunk ids that appear in a retrieval log; malformed lines are an error naming the line."""
    retrieved: set[int] = set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatastoreToolError(f"cannot read retrieval log {path} ({error})") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ids = record["chunk_ids"] if isinstance(record, dict) else record
            retrieved.update(int(i) for i in ids)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DatastoreToolError(
                f"{path}:{number}: expected a JSON object with \"chunk_ids\": [int, ...] ({error})"
            ) from error
    outside = [i for i in retrieved if not 0 <= i < ntotal]
    if outside:
        raise DatastoreToolError(
            f"{path}: chunk ids {sorted(outside)[:5]} are outside this datastore (0..{ntotal - 1}); "
            "was the log written against another datastore?"
        )
    return retrieved


def find_duplicates(datastore: Datastore, vectors: np.ndarray, exact: bool, near_dup: float | None) -> PruneReport:
    n = datastore.ntotal
    report = PruneReport(before=n)
    removed: dict[int, int] = {}
    if exact:
        first_by_tokens: dict[tuple, int] = {}
        for chunk_id, record in datastore.payloads.iter_chunks():
            key = tuple(record["tokens"])
            if key in first_by_tokens:
                removed[chunk_id] = first_by_tokens[key]
            else:
                first_by_tokens[key] = chunk_id
        report.exact_duplicates = len(removed)
    if near_dup is not None:
        if not 0.0 < near_dup <= 1.0:
            raise DatastoreToolError(f"--near-dup {near_dup} must be a cosine in (0, 1], e.g. 0.95")
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        # Slightly below the threshold so fp16-stored duplicates are not missed by rounding.
        lims, _, ids = flat.range_search(vectors, near_dup - 1e-4)
        for chunk_id in range(n):
            if chunk_id in removed:
                continue
            for other in ids[lims[chunk_id]:lims[chunk_id + 1]].tolist():
                if other > chunk_id and other not in removed:
                    removed[other] = chunk_id
                    report.near_duplicates += 1
    report.representative = removed
    return report


def prune_datastore(
    source: str | Path,
    output: str | Path,
    *,
    exact: bool = True,
    near_dup: float | None = None,
    retrieval_log: str | Path | None = None,
    index: str | None = None,
    force: bool = False,
) -> PruneReport:
    with Datastore.open(source, device="cpu") as datastore:
        vectors, origin = load_raw_embeddings(datastore)
        log.info("raw embeddings of %s: %s", source, origin)
        report = find_duplicates(datastore, vectors, exact, near_dup)
        keep = [i for i in range(datastore.ntotal) if i not in report.representative]
        if retrieval_log is not None:
            retrieved = read_retrieval_log(Path(retrieval_log), datastore.ntotal)
            nexts = {i: record["next"] for i, record in datastore.payloads.iter_chunks()}
            wanted = retrieved | {nexts[i] for i in retrieved if nexts[i] >= 0}
            # A duplicate's representative stands in for it in the log.
            wanted |= {report.representative[i] for i in retrieved if i in report.representative}
            before = len(keep)
            keep = [i for i in keep if i in wanted]
            report.never_retrieved = before - len(keep)
        if not keep:
            raise DatastoreToolError("pruning would leave no chunks; check the retrieval log and thresholds")
        report.after = len(keep)
        manifest = datastore.manifest
        factory = index or manifest["index"]["factory"]
        pca = (manifest.get("pca") or {}).get("dim")
        write_derived(
            datastore, Path(output), keep, vectors[keep],
            factory=factory, pca_dim=pca, redirect=report.representative, force=force,
            operation={"prune": {
                "exact": exact, "near_dup": near_dup,
                "retrieval_log": str(retrieval_log) if retrieval_log else None,
                "removed": {"exact_duplicates": report.exact_duplicates,
                            "near_duplicates": report.near_duplicates,
                            "never_retrieved": report.never_retrieved},
            }},
        )
    return report
