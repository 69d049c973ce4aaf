"""Assemble and run `retroserve retriever serve`: one datastore shard behind RetrieverService.

Same life cycle as the generation server (server/api/app.py): the port opens with health NOT_SERVING,
the datastore opens (read-only, index memory-mapped where FAISS allows), health turns SERVING;
SIGTERM turns it NOT_SERVING, lets in-flight searches finish for `grace_period_s`, and exits 0.
Health and reflection are grpcio's services; errors map to status codes through the server's
ErrorInterceptor; metrics are RetrieverMetrics on their own HTTP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1._async import HealthServicer

from retroserve.v1 import retriever_pb2, retriever_pb2_grpc
from server.api import hosting
from server.config import RetrieverServerConfig

log = logging.getLogger(__name__)

SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name


@dataclass
class RunningRetriever:
    server: grpc.aio.Server
    port: int
    metrics_port: int
    health: HealthServicer
    metrics: object
    metrics_server: tuple
    executor: ThreadPoolExecutor
    datastore: object | None = None
    stopped: bool = False

    async def set_serving(self, serving: bool) -> None:
        await hosting.set_serving(self.health, SERVICE_NAME, serving)

    async def shutdown(self, grace_s: float) -> None:
        """NOT_SERVING first (the server's fan-out and probes see it), then stop after `grace_s`."""
        if self.stopped:
            return
        self.stopped = True
        await self.set_serving(False)
        await self.server.stop(grace_s)
        self.executor.shutdown(wait=True)
        if self.datastore is not None:
            self.datastore.close()
        hosting.stop_metrics(self.metrics, self.metrics_server)


async def start(config: RetrieverServerConfig, registry=None) -> RunningRetriever:
    """Open the port, then the datastore; returns once health is SERVING (or raises)."""
    from retriever.datastore import Datastore
    from retriever.shard_service import RetrieverServicer
    from server.api.errors import ErrorInterceptor
    from server.observability.metrics import RetrieverMetrics

    metrics = RetrieverMetrics(registry=registry)
    metrics_server, metrics_port = hosting.start_metrics(metrics, config.metrics_address)
    server = hosting.grpc_server([ErrorInterceptor(metrics)], config.max_message_bytes)
    health = hosting.add_health_and_reflection(server, (SERVICE_NAME,))
    try:
        host, bound = hosting.bind(server, config.address)
    except OSError:
        hosting.stop_metrics(metrics, metrics_server)
        raise
    executor = ThreadPoolExecutor(max_workers=config.search_threads, thread_name_prefix="shard-search")
    running = RunningRetriever(server, bound, metrics_port, health, metrics, metrics_server, executor)
    await running.set_serving(False)
    await server.start()
    try:
        loop = asyncio.get_running_loop()
        running.datastore = await loop.run_in_executor(None, lambda: Datastore.open(config.datastore_dir,
                                                                                    device=config.device))
    except BaseException:
        await running.shutdown(0)
        raise
    servicer = RetrieverServicer(running.datastore, executor, max_queries=config.max_queries, max_k=config.max_k,
                                 max_query_chars=config.max_query_chars, metrics=metrics)
    retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(servicer, server)
    await running.set_serving(True)
    info = servicer.description
    # Tests and scripts read this line to learn the bound port (address port 0).
    log.info("SERVING shard %d of %d (%s, chunks [%d, %d)) on %s:%d; metrics on :%d", info.shard_index,
             info.shard_count, info.name, info.first_chunk_id, info.end_chunk_id, host, bound, metrics_port)
    return running


async def serve_until_signal(config: RetrieverServerConfig) -> int:
    running = await start(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.0f s", config.grace_period_s)
    with contextlib.suppress(asyncio.CancelledError):
        await running.shutdown(config.grace_period_s)
    return 0


def main(config: RetrieverServerConfig) -> int:
    return asyncio.run(serve_until_signal(config))
