"""Helpers to run the real server on loopback inside the test process (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

SERVER_WAIT_S = 120


class ServerThread:
    """An asyncio server in its own thread and event loop, as `retroserve serve` runs it."""

    def __init__(self, config, engine=None, registry=None, loop=None, with_datastore: bool = True):
        import asyncio
        import threading

        from server import app

        self.owns_loop = loop is None
        if loop is None:
            loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
            self.thread.start()
        self.loop = loop
        self.running = self.call(app.start(config, with_datastore=with_datastore, engine=engine, registry=registry), timeout=600)
        self.address = f"127.0.0.1:{self.running.port}"

    def call(self, coroutine, timeout: float = SERVER_WAIT_S):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        self.call(self.running.shutdown(grace_s))
        if self.owns_loop:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def server_config(model_dir: Path, datastore_dir: Path, **limits):
    from server.config import EngineConfig, Limits, RetrievalDefaults, ServerConfig

    return ServerConfig(
        address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        engine=EngineConfig(model_dir=model_dir, kv_cache_gib=1.0, max_num_seqs=8),
        retrieval=RetrievalDefaults(datastore_dir=datastore_dir, batch_window_ms=50.0),
        limits=Limits(max_queue=4, max_prompt_tokens=1024, max_new_tokens=512, **limits),
    )
