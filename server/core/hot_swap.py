"""Datastore hot swap: new requests move to a new datastore at once, requests in flight finish on
the one they started with, and each retired datastore is closed after its last request.

Every user of the datastore holds a lease for as long as it needs one version (a generation
request for its whole run, so all of its retrievals and its provenance come from one datastore).
`reload` verifies and opens the new datastore off the event loop while the old one keeps serving,
then swaps the reference in one step on the event loop: there is no moment without a datastore
and no request sees two. A datastore that fails verification (file checksums against the
manifest, index and payload structure, tokenizer fingerprint, mode) is refused with a message
listing the problems, and nothing changes.

Closing a retired version closes its batcher and its LMDB reader (retriever.datastore shares LMDB
environments per file and closes the environment with its last reader) and drops the last
references to its FAISS index.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from datastore_tools.verify import verify_datastore
from retriever.api import ServingRetrieval
from retriever.datastore import DatastoreError, read_manifest
from server.errors import DatastoreRejected

log = logging.getLogger(__name__)

PROBLEMS_SHOWN = 5
"""A refusal message lists this many verification problems (the server log has them all)."""


def manifest_digest(manifest: dict) -> str:
    """Hex SHA-256 of a manifest as canonical JSON: one name per datastore version."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(eq=False)
class DatastoreVersion:
    """One opened datastore, how many requests hold it, and whether it still takes new ones."""

    retrieval: ServingRetrieval
    digest: str
    serving_since: str = ""
    leases: int = 0
    retired: bool = False


@dataclass
class SwapResult:
    current: DatastoreVersion
    previous: DatastoreVersion
    load_s: float


def _finish_reload(pending: set):
    """Forget a finished reload task and take its exception (its caller may have gone away)."""

    def finish(task: asyncio.Task) -> None:
        pending.discard(task)
        if not task.cancelled():
            task.exception()

    return finish


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class DatastoreSlot:
    """The datastore new requests get; `reload` replaces it, `lease` pins one version."""

    def __init__(self, retrieval: ServingRetrieval, open_datastore: Callable[[Path, object], ServingRetrieval],
                 metrics=None):
        """`open_datastore(path, encoder)` opens a datastore for serving (retriever.api
        .open_datastore_for_serving with the server's config bound); it runs in a worker thread."""
        self.open_datastore = open_datastore
        self.metrics = metrics
        self._version = DatastoreVersion(retrieval, manifest_digest(retrieval.datastore.manifest), _now_iso())
        self.retired_open: set[DatastoreVersion] = set()
        """Retired versions still held by requests in flight (closed when their last lease ends)."""
        self._swap_lock = asyncio.Lock()
        self._closing: set[asyncio.Task] = set()
        self._reloads: set[asyncio.Task] = set()

    @property
    def version(self) -> DatastoreVersion:
        """The version new requests get now."""
        return self._version

    @property
    def current(self) -> ServingRetrieval:
        return self._version.retrieval

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[ServingRetrieval]:
        """Pin the current version for the duration of the block."""
        version = self._version
        version.leases += 1
        try:
            yield version.retrieval
        finally:
            version.leases -= 1
            if version.retired and version.leases == 0:
                self._close_later(version)

    async def reload(self, path: Path | None = None) -> SwapResult:
        """Verify and open `path` (default: the directory serving now, read again), then swap.

        Raises DatastoreRejected when verification fails; the current datastore keeps serving.
        A caller that goes away (cancelled) does not stop a swap half way: it completes, or is
        refused, on its own."""
        task = asyncio.get_running_loop().create_task(self._reload(path))
        self._reloads.add(task)
        task.add_done_callback(_finish_reload(self._reloads))
        return await asyncio.shield(task)

    async def _reload(self, path: Path | None) -> SwapResult:
        async with self._swap_lock:
            previous = self._version
            path = Path(path) if path is not None else previous.retrieval.datastore.path
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                retrieval = await loop.run_in_executor(None, self._verify_and_open, path, previous)
            except DatastoreRejected:
                self._count("refused")
                raise
            except BaseException:
                self._count("error")
                raise
            current = DatastoreVersion(retrieval, manifest_digest(retrieval.datastore.manifest), _now_iso())
            self._version = current  # the swap: requests arriving from now on lease `current`
            previous.retired = True
            if previous.leases == 0:
                self._close_later(previous)
            else:
                self.retired_open.add(previous)
                self._publish_retired()
            self._count("ok")
            load_s = time.perf_counter() - started
            log.info("datastore swapped to %s (%s) in %.1f s; the previous one (%s) closes after its %d "
                     "requests in flight", path, current.digest[:12], load_s, previous.retrieval.datastore.path,
                     previous.leases)
            return SwapResult(current, previous, load_s)

    def _verify_and_open(self, path: Path, previous: DatastoreVersion) -> ServingRetrieval:
        """Full verification (every byte checksummed), then open; runs in a worker thread."""
        still_serving = f"still serving {previous.retrieval.datastore.path}"
        try:
            problems = verify_datastore(path)
        except OSError as error:  # unreadable files: the offered datastore's fault, not the server's
            problems = [f"cannot read {error.filename or path} ({error.strerror})"]
        if problems:
            log.warning("datastore %s refused: %s", path, "; ".join(problems))
            shown = "; ".join(problems[:PROBLEMS_SHOWN])
            more = f" (and {len(problems) - PROBLEMS_SHOWN} more)" if len(problems) > PROBLEMS_SHOWN else ""
            raise DatastoreRejected(f"datastore {path} failed verification: {shown}{more}; {still_serving}")
        old_datastore = previous.retrieval.datastore
        try:
            manifest = read_manifest(path)
            if manifest.get("mode", "chunk") != "chunk":
                raise DatastoreRejected(
                    f"datastore {path} is a {manifest.get('mode')}-mode datastore; this server serves "
                    f"chunk retrieval; {still_serving}"
                )
            same_embedder = manifest.get("embedder") == old_datastore.manifest.get("embedder")
            return self.open_datastore(path, old_datastore.encoder if same_embedder else None)
        except DatastoreError as error:
            raise DatastoreRejected(f"{error}; {still_serving}") from error

    def _close_later(self, version: DatastoreVersion) -> None:
        """Close a retired version in its own task (a lease may end in a cancelled request)."""
        self.retired_open.discard(version)
        self._publish_retired()
        task = asyncio.get_running_loop().create_task(version.retrieval.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.info("closing retired datastore %s", version.retrieval.datastore.path)

    def _publish_retired(self) -> None:
        if self.metrics is not None:
            self.metrics.retired_datastores_open.set(len(self.retired_open))

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.datastore_swaps.labels(outcome=outcome).inc()

    async def close(self) -> None:
        """Close the current version and any retired ones still held (shutdown, after the drain)."""
        for version in list(self.retired_open):
            self._close_later(version)
        await self._version.retrieval.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
