"""Assemble and run the gRPC server: engine, datastore, services, health, metrics, security, shutdown.

Order of events: the gRPC port opens first with health NOT_SERVING (so probes get an answer during
the tens of seconds vLLM takes to load); then the engine and the datastore load; then health turns
SERVING. SIGTERM/SIGINT turn health NOT_SERVING, stop admitting, give in-flight requests
`grace_period_s` to finish, and exit 0. If the engine dies, health turns NOT_SERVING and the process
exits non-zero so the orchestrator restarts it. SIGHUP reloads the datastore (server/core/hot_swap.py).

Security (README "Security"): TLS or mutual TLS on the gRPC port (server/api/tls.py), bearer tokens
(server/api/auth.py) and a per-client bound on concurrent calls (server/api/client_limits.py), all checked
before any port opens, so a bad certificate or token file stops startup with a message. The
datastore is verified then too (checksums and structure), before the engine loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1._async import HealthServicer

from retroserve.v1 import admin_pb2, admin_pb2_grpc, retroserve_pb2, retroserve_pb2_grpc
from server.api import hosting
from server.api.loading import AdminFront, RetroserveFront
from server.config import ServerConfig

log = logging.getLogger(__name__)

SERVICE_NAME = retroserve_pb2.DESCRIPTOR.services_by_name["Retroserve"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
ENGINE_DEAD_EXIT_CODE = 3
ENGINE_WATCH_INTERVAL_S = 0.25
"""How often the engine's liveness is polled (a property read: cheap)."""
ENGINE_DEAD_NOT_SERVING_S = 2.0
"""After the engine died, health answers NOT_SERVING this long before the port closes, so a
checker polling faster sees the state, not just a refused connection (cleaning up the dead
engine takes milliseconds, measured: too short a window to be seen)."""


@dataclass
class RunningServer:
    """Handles a caller (CLI or tests) needs: the bound ports and the parts to stop."""

    server: grpc.aio.Server
    port: int
    metrics_port: int
    health: HealthServicer
    service: object | None = None
    engine: object | None = None
    datastores: object | None = None
    """The server.core.hot_swap.DatastoreSlot serving (None without a datastore)."""
    certificates: object | None = None
    """The server.api.tls.ReloadingCertificates of a TLS port (None in plaintext)."""
    owns_engine: bool = True
    """False when the caller passed its own engine to `start` (it outlives this server)."""
    metrics: object | None = None
    metrics_server: object | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int = 0
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def retrieval(self):
        """The retriever.api.ServingRetrieval new requests use now (None without a datastore)."""
        return None if self.datastores is None else self.datastores.current

    async def reload_datastore(self, path=None):
        """Hot-swap the datastore (see server/core/hot_swap.py); raises DatastoreRejected if refused."""
        if self.datastores is None:
            raise RuntimeError("this server runs without a datastore; there is none to reload")
        return await self.datastores.reload(path)

    async def set_serving(self, serving: bool) -> None:
        await hosting.set_serving(self.health, SERVICE_NAME, serving)

    async def shutdown(self, grace_s: float) -> None:
        """Drain, then stop: health turns NOT_SERVING (probes keep getting answers, so the load
        balancer takes this replica out), new generation requests get UNAVAILABLE, admitted ones
        get up to `grace_s` to finish; then the port closes and the engine stops."""
        if self.stopped.is_set():
            return
        await self.set_serving(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if self.service is not None:
            self.service.draining = True
            while self.service.admission.admitted and loop.time() < deadline:
                await asyncio.sleep(0.05)
        await self.server.stop(max(0.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        if self.datastores is not None:
            await self.datastores.close()
        if self.engine is not None and self.owns_engine:
            self.engine.shutdown()
        if self.metrics is not None:
            hosting.stop_metrics(self.metrics, self.metrics_server)
        self.stopped.set()


def check_model(config: ServerConfig) -> bool:
    """True if the model is prepared, False if it is the default one and must be prepared first;
    any other missing model is an error that names the fix (raised before any port opens)."""
    from artefacts import paths

    model_dir = config.engine.model_dir
    if (model_dir / "config.json").is_file():
        return True
    if model_dir.resolve() != paths.default_model_dir().resolve():
        raise FileNotFoundError(
            f"no prepared model at {model_dir}: run `retroserve model prepare --source SOURCE "
            f"--output {model_dir}`, or pass --model-dir of a prepared model"
        )
    return False


def ensure_model(config: ServerConfig) -> None:
    """Prepare the default model on first use (minutes, once)."""
    from server.model import prepare as model_prep

    if check_model(config):
        return
    log.info("default model missing: preparing it (minutes, once)")
    model_prep.ensure_default_model()


def check_datastore(config: ServerConfig, with_datastore: bool) -> None:
    """Refuse a damaged datastore before the engine loads (a minute on a small CPU) and before any
    port opens: every file's SHA-256 against the manifest, then the index and payload structure,
    as a hot swap checks (server/core/hot_swap.py). Without this a file damaged in place at its
    original size was opened as if sound (opening checks sizes only) and reached FAISS and LMDB."""
    if not with_datastore:
        return
    from datastore_tools.build import default_datastore_missing
    from datastore_tools.verify import verify_datastore
    from retriever.datastore import DatastoreError, read_manifest, require_sparse
    from retriever.sparse import SPARSE_METHODS
    from server.core.hot_swap import PROBLEMS_SHOWN

    path = Path(config.retrieval.datastore_dir)
    if default_datastore_missing(path):
        return  # built on first use (datastore_tools.build.ensure_default_datastore)
    problems = verify_datastore(path)
    if problems:
        more = f" (and {len(problems) - PROBLEMS_SHOWN} more)" if len(problems) > PROBLEMS_SHOWN else ""
        raise DatastoreError(
            f"datastore {path} failed verification: {'; '.join(problems[:PROBLEMS_SHOWN])}{more}; run "
            f"`retroserve datastore verify {path}` for all problems and rebuild it with `retroserve datastore "
            f"build ... -o {path} --force`"
        )
    if config.retrieval.retriever in SPARSE_METHODS:
        require_sparse(path, read_manifest(path), config.retrieval.retriever)


def start_engine(config: ServerConfig):
    from server.core.engine import Engine

    ensure_model(config)
    return Engine.start(config.engine)


def load_datastores(config: ServerConfig, with_datastore: bool, metrics):
    """Open the datastore (building the default one first if it is missing) behind its batcher,
    in the slot that hot swaps replace it in."""
    if not with_datastore:
        return None
    from datastore_tools.build import ensure_default_datastore
    from retriever import api as retriever_api
    from server.core.hot_swap import DatastoreSlot

    if not config.shards.addresses:
        ensure_default_datastore(config.retrieval.datastore_dir, config.engine.model_dir)

    def open_datastore(path, encoder):
        return retriever_api.open_datastore_for_serving(path, config, metrics=metrics, encoder=encoder)

    return DatastoreSlot(retriever_api.open_for_serving(config, metrics=metrics), open_datastore, metrics)


def interceptors_for(config: ServerConfig, metrics, tokens) -> list:
    """Outermost first: errors and metrics, then authentication (`tokens`: a server.api.auth
    .BearerTokens, or None for none), then the per-client bound (so a refused call is logged and
    counted, and an unauthenticated one never reaches the bound), then the refusal of requests
    whose bytes do not decode."""
    from server.api.auth import BearerTokenInterceptor
    from server.api.client_limits import ClientStreamLimiter
    from server.api.errors import ErrorInterceptor, UndecodableRequestInterceptor

    interceptors = [ErrorInterceptor(metrics)]
    if tokens is not None:
        interceptors.append(BearerTokenInterceptor(tokens))
    if config.limits.max_streams_per_client:
        interceptors.append(ClientStreamLimiter(config.limits.max_streams_per_client, tokens_checked=tokens is not None))
    interceptors.append(UndecodableRequestInterceptor())
    return interceptors


async def start(config: ServerConfig, with_datastore: bool = True, registry=None, engine=None) -> RunningServer:
    """Start everything; returns once health is SERVING (or raises if loading failed).

    `engine`: an already started server.core.engine.Engine to serve instead of loading one (tests run
    several servers on one engine); it is not shut down with this server."""
    from server.api import service as service_module
    from server.api.admin import AdminService
    from server.api.auth import BearerTokens
    from server.observability.metrics import Metrics
    from server.api.tls import certificates_for

    if engine is None:
        check_model(config)
    # Bad certificate or token files stop startup here, before anything listens.
    certificates = certificates_for(config.security)
    tokens = BearerTokens.from_config(config.security)
    await asyncio.get_running_loop().run_in_executor(None, check_datastore, config, with_datastore)
    metrics = Metrics(registry=registry)
    metrics_server, metrics_port = hosting.start_metrics(metrics, config.metrics_address)
    server = hosting.grpc_server(interceptors_for(config, metrics, tokens), config.limits.max_message_bytes,
                                 ("grpc.max_connection_age_ms", 30 * 60_000),
                                 ("grpc.max_connection_age_grace_ms", int(config.grace_period_s * 1000)))
    health = hosting.add_health_and_reflection(server, (SERVICE_NAME, ADMIN_SERVICE_NAME))
    front, admin_front = RetroserveFront(), AdminFront()
    retroserve_pb2_grpc.add_RetroserveServicer_to_server(front, server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin_front, server)
    try:
        host, bound = hosting.bind(server, config.address,
                                   None if certificates is None else certificates.server_credentials())
    except OSError:
        hosting.stop_metrics(metrics, metrics_server)
        raise
    running = RunningServer(server, bound, metrics_port, health, metrics=metrics,
                            metrics_server=metrics_server, certificates=certificates)
    await running.set_serving(False)
    await server.start()
    transport = "plaintext" if certificates is None else ("mutual TLS" if certificates.mutual else "TLS")
    log.info("gRPC listening on %s:%d (%s; NOT_SERVING while loading); metrics on :%d", host, bound, transport,
             metrics_port)

    loop = asyncio.get_running_loop()
    try:
        if engine is None:
            engine = await loop.run_in_executor(None, start_engine, config)
        else:
            running.owns_engine = False
        running.engine = engine
        if getattr(engine, "has_token_datastore", False):
            metrics.watch_knn(engine.knn_stats)
        running.datastores = await loop.run_in_executor(None, load_datastores, config, with_datastore, metrics)
    except BaseException:
        await running.shutdown(0)
        raise
    service = service_module.RetroserveService(config, engine, running.datastores, metrics)
    front.target, admin_front.target = service, AdminService(running.datastores)
    running.service = service
    running._tasks.append(asyncio.create_task(_watch_engine(running, config)))
    await running.set_serving(True)
    log.info("SERVING")
    return running


async def _watch_engine(running: RunningServer, config: ServerConfig) -> None:
    """If the engine process dies: health NOT_SERVING at once (within ENGINE_WATCH_INTERVAL_S),
    kept for ENGINE_DEAD_NOT_SERVING_S while the dead engine is cleaned up; then the port closes
    and the process exits with ENGINE_DEAD_EXIT_CODE so the orchestrator restarts it. Requests in
    flight and new ones get UNAVAILABLE (server.errors.EngineDead)."""
    while not running.stopped.is_set():
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        if running.engine is not None and running.engine.errored:
            log.error("engine died; stopping with exit code %d", ENGINE_DEAD_EXIT_CODE)
            running.exit_code = ENGINE_DEAD_EXIT_CODE
            await running.set_serving(False)
            if running.owns_engine:
                await asyncio.get_running_loop().run_in_executor(None, running.engine.shutdown)
            await asyncio.sleep(ENGINE_DEAD_NOT_SERVING_S)
            await running.shutdown(0)
            return


async def serve_until_signal(config: ServerConfig, with_datastore: bool) -> int:
    running = await start(config, with_datastore)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_on_signal, running)  # (its default would end the process)
    waiter = asyncio.create_task(stop.wait())
    stopped = asyncio.create_task(running.stopped.wait())
    await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("signal received: draining for up to %.0f s", config.grace_period_s)
        await running.shutdown(config.grace_period_s)
    for task in (waiter, stopped):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return running.exit_code


def _reload_on_signal(running: RunningServer) -> None:
    """SIGHUP: reload the datastore serving now (a new version published at its path)."""
    if running.datastores is None:
        log.warning("SIGHUP ignored: this server runs without a datastore")
        return
    log.info("SIGHUP: reloading the datastore")
    task = asyncio.get_running_loop().create_task(_reload_and_log(running))
    running._tasks.append(task)


async def _reload_and_log(running: RunningServer) -> None:
    from server.errors import DatastoreRejected

    try:
        swap = await running.reload_datastore()
    except DatastoreRejected as error:
        log.error("SIGHUP reload refused: %s", error)
    except Exception:
        log.exception("SIGHUP reload failed; the previous datastore keeps serving")
    else:
        log.info("SIGHUP reload done: serving %s (%s)", swap.current.retrieval.datastore.path, swap.current.digest[:12])


def startup_errors() -> tuple[type[BaseException], ...]:
    """Failures to start that are the operator's to fix (missing or damaged artefacts): the CLI
    prints their message, which names the fix, instead of a traceback."""
    from datastore_tools.errors import DatastoreToolError
    from retriever.datastore import DatastoreError
    from server.api.auth import TokenFileError
    from server.model.prepare import ModelPrepError
    from server.api.tls import TlsSetupError

    return (FileNotFoundError, DatastoreError, DatastoreToolError, ModelPrepError, OSError, TlsSetupError,
            TokenFileError)


def main(config: ServerConfig, with_datastore: bool = True) -> int:
    return asyncio.run(serve_until_signal(config, with_datastore))
