"""Helpers to run the real server on loopback inside the test process (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

SERVER_WAIT_S = 120


class ServerThread:
    """An asyncio server in its own thread and event loop, as `retroserve serve` runs it."""

    def __init__(self, config, engine=None, registry=None, loop=None, with_datastore: bool = True):
        import asyncio
        import threading

        from server.api import app

        self.owns_loop = loop is None
        if loop is None:
            loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
            self.thread.start()
        self.loop = loop
        self.running = self.call(app.start(config, with_datastore=with_datastore, engine=engine, registry=registry),
                                 timeout=600)
        self.address = f"127.0.0.1:{self.running.port}"

    def call(self, coroutine, timeout: float = SERVER_WAIT_S):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        self.call(self.running.shutdown(grace_s))
        if self.owns_loop:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def server_config(model_dir: Path, datastore_dir: Path, security=None, **limits):
    from server.config import EngineConfig, Limits, RetrievalDefaults, SecurityConfig, ServerConfig

    return ServerConfig(
        address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        engine=EngineConfig(model_dir=model_dir, kv_cache_gib=1.0, max_num_seqs=8),
        retrieval=RetrievalDefaults(datastore_dir=datastore_dir, batch_window_ms=50.0),
        limits=Limits(**{"max_queue": 4, "max_prompt_tokens": 1024, "max_new_tokens": 512, **limits}),
        security=security or SecurityConfig(),
    )


def second_server(session_server, config, with_datastore: bool = True) -> ServerThread:
    """Another server on the session server's engine and event loop, with its own metrics."""
    from prometheus_client import CollectorRegistry

    return ServerThread(config, engine=session_server.running.engine, registry=CollectorRegistry(),
                        loop=session_server.loop, with_datastore=with_datastore)


class RetrieverThread:
    """`retroserve retriever serve` in this process: its own event loop thread, port 0."""

    def __init__(self, datastore_dir: Path, registry=None, **settings):
        import asyncio
        import threading

        from prometheus_client import CollectorRegistry

        from server.api import retriever_app
        from server.config import RetrieverServerConfig

        config = RetrieverServerConfig(datastore_dir=datastore_dir, address="127.0.0.1:0",
                                       metrics_address="127.0.0.1:0", **settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="retriever-loop", daemon=True)
        self.thread.start()
        start = retriever_app.start(config, registry=registry or CollectorRegistry())
        self.running = asyncio.run_coroutine_threadsafe(start, self.loop).result(SERVER_WAIT_S)
        self.address = f"127.0.0.1:{self.running.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.running.shutdown(grace_s), self.loop).result(SERVER_WAIT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class RetrieverProcess:
    """`python -m server.cli.main retriever serve` as a child process on port 0 (tests kill it), with
    `omp_threads` FAISS threads (one by default: several shards share this machine's cores)."""

    def __init__(self, datastore_dir: Path, *extra: str, omp_threads: int = 1):
        import os
        import re
        import subprocess
        import sys
        import threading
        import time

        repo = Path(__file__).resolve().parents[1]
        self.datastore_dir = Path(datastore_dir)
        env = dict(os.environ, OMP_NUM_THREADS=str(omp_threads), PYTHONPATH=str(repo))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli.main", "retriever", "serve", "--datastore-dir", str(datastore_dir),
             "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", *extra],
            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.port = None

        def read():
            for line in self.process.stderr:
                self.lines.append(line)
                match = re.search(r"SERVING shard \d+ of \d+ .* on [^ ]+:(\d+); metrics on :(\d+)", line)
                if match and self.port is None:
                    self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
                    found.set()

        threading.Thread(target=read, name="retriever-stderr", daemon=True).start()
        deadline = time.monotonic() + SERVER_WAIT_S
        while not found.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("retriever serve did not start:\n" + "".join(self.lines[-20:]))
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)
