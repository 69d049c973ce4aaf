"""Embed chunk texts in fixed shards that are saved as they finish, so a killed build resumes.

Embedding dominates a build on a CPU, so its output is checkpointed: shard i holds
the embeddings of chunks [i*shard_size, (i+1)*shard_size) as `shard-00000i.npy`, written to a
temporary name and renamed. Shard boundaries depend only on the chunk order and shard size, so a
resumed build computes exactly the batches an uninterrupted one would, and gets the same floats.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class SimulatedInterruption(RuntimeError):
    """Raised by the test hook `stop_after_shards` to imitate a killed build."""


def _shard_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"shard-{index:06d}.npy"


def embed_resumable(
    texts: Sequence[str],
    encode: Callable[[list[str]], np.ndarray],
    work_dir: Path,
    shard_size: int = 512,
    dim: int = 384,
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """float32 [len(texts), dim] embeddings; finished shards in `work_dir` are reused, not recomputed.

    Returns the embeddings and stats (`resumed_chunks`, `embedded_chunks`, `seconds`).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    n_shards = (n + shard_size - 1) // shard_size
    out = np.empty((n, dim), dtype=np.float32)
    stats = {"resumed_chunks": 0, "embedded_chunks": 0, "seconds": 0.0, "shard_size": shard_size}
    todo = []
    for index in range(n_shards):
        lo, hi = index * shard_size, min(n, (index + 1) * shard_size)
        path = _shard_path(work_dir, index)
        if path.is_file():
            try:
                shard = np.load(path)
            except (OSError, ValueError) as error:
                log.warning("recomputing damaged shard %s (%s)", path, error)
                todo.append(index)
                continue
            if shard.shape == (hi - lo, dim):
                out[lo:hi] = shard
                stats["resumed_chunks"] += hi - lo
                continue
        todo.append(index)
    if stats["resumed_chunks"]:
        log.info("resuming: %d of %d chunks already embedded in %s", stats["resumed_chunks"], n, work_dir)
    started = time.perf_counter()
    bar = tqdm(total=n, initial=stats["resumed_chunks"], unit="chunk", desc="embed", disable=not progress)
    try:
        for done, index in enumerate(todo):
            if stop_after_shards is not None and done >= stop_after_shards:
                raise SimulatedInterruption(f"stopped after {done} shard(s) (test hook)")
            lo, hi = index * shard_size, min(n, (index + 1) * shard_size)
            vectors = np.asarray(encode(list(texts[lo:hi])), dtype=np.float32)
            path = _shard_path(work_dir, index)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vectors)
            os.replace(tmp, path)
            out[lo:hi] = vectors
            stats["embedded_chunks"] += hi - lo
            bar.update(hi - lo)
            (work_dir / "progress.json").write_text(
                json.dumps({"shards_done": n_shards - len(todo) + done + 1, "shards": n_shards})
            )
    finally:
        bar.close()
        stats["seconds"] = time.perf_counter() - started
    return out, stats
