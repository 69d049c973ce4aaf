"""Coalesce concurrent retrievals from many generation requests into one batched search.

FAISS (and the encoder) cost much less per query in a batch than one by one, and each generation
request retrieves every `stride` tokens, so requests arriving within `window_s` of each other (up to
`max_batch`) are searched together in a worker thread, off the event loop. Each caller gets its own
neighbours; if a batched search fails, its queries are retried one by one so that only the caller
whose query fails sees the error.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from retriever.datastore import Neighbour, head

log = logging.getLogger(__name__)

SearchFn = Callable[[Sequence[str], int], Sequence[Sequence[Neighbour]]]


@dataclass
class BatcherStats:
    calls: int = 0
    searches: int = 0
    largest_batch: int = 0


@dataclass
class _Pending:
    query: str
    k: int
    future: asyncio.Future


class RetrievalBatcher:
    """`await retrieve(query, k)` from any number of tasks; one search per window of arrivals."""

    def __init__(self, search: SearchFn, max_batch: int = 64, window_s: float = 0.002,
                 executor: Executor | None = None):
        if max_batch < 1:
            raise ValueError(f"{max_batch=} must be >= 1")
        if window_s < 0:
            raise ValueError(f"{window_s=} must be >= 0")
        self.search = search
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = BatcherStats()
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")
        self._owns_executor = executor is None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False

    async def retrieve(self, query: str, k: int) -> list[Neighbour]:
        if self._closed:
            raise RuntimeError("the retrieval batcher is closed")
        if not isinstance(query, str):
            raise TypeError(f"query must be str, got {type(query).__name__}")
        if k < 1:
            raise ValueError(f"{k=} must be >= 1")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(), name="retrieval-batcher")
        future = loop.create_future()
        self.stats.calls += 1
        self._queue.put_nowait(_Pending(query, k, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [item for item in batch if not item.future.done()]  # drop cancelled callers
            if batch:
                await self._search_batch(batch)

    async def _search_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        k = max(item.k for item in batch)
        self.stats.searches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        try:
            rows = await loop.run_in_executor(self._executor, self.search, [item.query for item in batch], k)
            if len(rows) != len(batch):
                raise RuntimeError(f"search returned {len(rows)} rows for {len(batch)} queries")
        except Exception as error:  # noqa: BLE001 - isolate which caller's query fails
            if len(batch) == 1:
                _set(batch[0].future, error=error)
                return
            log.warning("batched retrieval of %d queries failed (%s); retrying one by one", len(batch), error)
            for item in batch:
                await self._search_batch([item])
            return
        for item, row in zip(batch, rows):
            _set(item.future, result=head(row, item.k))

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                _set(self._queue.get_nowait().future, error=RuntimeError("the retrieval batcher was closed"))
        if self._owns_executor:
            self._executor.shutdown(wait=False)


def _set(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
