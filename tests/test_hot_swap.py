"""Datastore hot swap on a real server over loopback (Admin.ReloadDatastore and the SIGHUP handler).

A second server on the session's engine serves a copy of the test datastore; new versions are
published over that copy the way `retroserve datastore build --force` publishes (build aside,
rename in). Neighbour sources tell the versions apart: the first is built from the session
corpus, the second from other pydoc topics.
"""

from __future__ import annotations

import gc
import shutil
import time
import urllib.request
import weakref
from pathlib import Path

import grpc
import pytest

from loopback import second_server, server_config
from retriever import datastore as datastore_module
from server.client import RetroserveClient
from server.config import SecurityConfig

PROMPT = "The assert statement in Python"
TOKEN = "swap-admin-token"
WAIT_S = 120
OTHER_TOPICS = ("for", "while", "try", "with", "if", "class", "function", "import")


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def other_corpus_dir(tmp_path_factory):
    from pydoc_data.topics import topics

    directory = tmp_path_factory.mktemp("other-corpus")
    for name in OTHER_TOPICS:
        (directory / f"{name}.txt").write_text(topics[name])
    return directory


@pytest.fixture(scope="module")
def other_datastore(tmp_path_factory, other_corpus_dir, prepared_model_dir, encoder):
    """A second version: other documents, the served model's tokenizer."""
    from datastore_tools.build import BuildConfig, build_datastore

    output = tmp_path_factory.mktemp("other-datastore") / "store"
    build_datastore(BuildConfig(output=output, model_dir=prepared_model_dir, inputs=[other_corpus_dir],
                                index="Flat", progress=False), encoder=encoder)
    return output


@pytest.fixture(scope="module")
def swap_server(server, prepared_model_dir, server_datastore, tmp_path_factory):
    directory = tmp_path_factory.mktemp("swap-server")
    serving = directory / "serving"
    shutil.copytree(server_datastore, serving)
    tokens = directory / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    config = server_config(prepared_model_dir, serving, security=SecurityConfig(auth_token_file=tokens))
    running = second_server(server, config)
    yield running, serving
    running.stop(1)


def publish_over(source, serving) -> None:
    """Publish a copy of `source` at `serving` as the build tools do (stage, then rename in)."""
    from datastore_tools.publish import publish

    stage = serving.with_name(serving.name + ".partial-test")
    shutil.copytree(source, stage)
    publish(stage, serving, force=True)


def sources(retrievals) -> set[str]:
    return {neighbour.source for retrieval in retrievals for neighbour in retrieval.neighbours}


def swap_count(running, outcome: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{running.running.metrics_port}/metrics", timeout=10).read()
    prefix = f'retroserve_datastore_swaps_total{{outcome="{outcome}"}} '
    line = next(line for line in body.decode().splitlines() if line.startswith(prefix))
    return float(line.split()[-1])


def test_reload_needs_the_bearer_token(swap_server):
    running, _ = swap_server
    with RetroserveClient(running.address, timeout=WAIT_S) as anonymous:
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.reload_datastore()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert swap_count(running, "ok") == 0


def test_new_requests_move_to_the_new_version_while_one_in_flight_finishes_on_the_old(
        swap_server, other_datastore, corpus_dir, other_corpus_dir):
    running, serving = swap_server
    datastores = running.running.datastores
    with RetroserveClient(running.address, timeout=WAIT_S, token=TOKEN) as client:
        before = client.info().datastore
        assert before.path == "" and before.manifest_digest and before.serving_since  # Info shows no paths
        old = datastores.version
        old_datastore = weakref.ref(old.retrieval.datastore)
        old_env = old.retrieval.datastore.payloads._key
        stream = client.generate_stream(PROMPT, mode="chunk", stride=4, max_new_tokens=80, return_provenance=True)
        messages = [next(stream)]

        publish_over(other_datastore, serving)  # the old files are renamed away and deleted
        reply = client.reload_datastore()

        assert reply.previous.manifest_digest == before.manifest_digest
        assert reply.datastore.manifest_digest != before.manifest_digest and reply.datastore.path == str(serving)
        assert old.retired and old.leases == 1 and old in datastores.retired_open  # the stream holds it
        assert old_env in datastore_module._SHARED_ENVS
        del old  # the test's own reference would keep it alive
        messages += list(stream)  # the request in flight finishes, on the old version
        assert messages[-1].generated_token_count == 80
        in_flight = sources(r for m in messages for r in m.retrievals)
        assert in_flight and all(source.startswith(str(corpus_dir)) for source in in_flight)

        assert wait_until(lambda: old_env not in datastore_module._SHARED_ENVS), "old LMDB env still open"
        assert not datastores.retired_open
        gc.collect()
        assert old_datastore() is None, "the old Datastore (and its FAISS index) is still referenced"

        after = client.generate(PROMPT, mode="chunk", stride=4, max_new_tokens=4, return_provenance=True)
        new_sources = sources(after.retrievals)
        assert new_sources and all(source.startswith(str(other_corpus_dir)) for source in new_sources)
        info = client.info().datastore
        assert info.manifest_digest == reply.datastore.manifest_digest
        assert info.entry_count == reply.datastore.entry_count != before.entry_count
        retrieved = client.retrieve("for loop over a sequence", neighbours=2)
        assert all(n.source.startswith(str(other_corpus_dir)) for n in retrieved.neighbours)
    assert swap_count(running, "ok") == 1


def test_a_datastore_failing_its_checksums_is_refused_and_the_old_keeps_serving(swap_server, other_datastore,
                                                                                   tmp_path):
    running, _ = swap_server
    damaged = tmp_path / "damaged"
    shutil.copytree(other_datastore, damaged)
    index = damaged / "index.faiss"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    index.write_bytes(bytes(data))
    with RetroserveClient(running.address, timeout=WAIT_S, token=TOKEN) as client:
        before = client.info().datastore
        refused_before = swap_count(running, "refused")
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_datastore(damaged)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "index.faiss: sha256 differs" in caught.value.details()
        assert f"still serving {before.path}" in caught.value.details()
        assert client.info().datastore.manifest_digest == before.manifest_digest
        assert client.generate(PROMPT, mode="chunk", max_new_tokens=4, stride=4).generated_token_count == 4
    assert swap_count(running, "refused") == refused_before + 1


def test_a_datastore_built_for_another_tokenizer_is_refused(swap_server, other_tokenizer_dir, other_corpus_dir,
                                                           encoder, tmp_path):
    from datastore_tools.build import BuildConfig, build_datastore

    running, _ = swap_server
    foreign = tmp_path / "foreign"
    build_datastore(BuildConfig(output=foreign, model_dir=other_tokenizer_dir, inputs=[other_corpus_dir / "for.txt"],
                                index="Flat", progress=False), encoder=encoder)
    with RetroserveClient(running.address, timeout=WAIT_S, token=TOKEN) as client:
        before = client.info().datastore.manifest_digest
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_datastore(foreign)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tokenizer" in caught.value.details() and "rebuild it" in caught.value.details()
        assert client.info().datastore.manifest_digest == before


def test_sighup_handler_reloads_the_directory_serving_now(swap_server, server_datastore):
    """The handler `retroserve serve` installs for SIGHUP (signals reach only the main thread's
    loop, so the test calls it on the server's loop as the signal would)."""
    from server.api import app

    running, serving = swap_server
    before = running.running.datastores.version.digest
    publish_over(server_datastore, serving)
    running.loop.call_soon_threadsafe(app._reload_on_signal, running.running)
    assert wait_until(lambda: running.running.datastores.version.digest != before, 60)
    with RetroserveClient(running.address, timeout=WAIT_S, token=TOKEN) as client:
        assert client.info().datastore.manifest_digest == running.running.datastores.version.digest


@pytest.mark.slow
def test_sighup_to_a_serve_process_swaps_its_datastore(prepared_model_dir, server_datastore, other_datastore,
                                                       tmp_path):
    """The real signal path: `retroserve serve` in a subprocess (its own engine: about a minute)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    serving = tmp_path / "serving"
    shutil.copytree(server_datastore, serving)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "server.cli.main", "serve", "--model-dir", str(prepared_model_dir),
               "--datastore-dir", str(serving), "--address", f"127.0.0.1:{port}", "--metrics-address",
               "127.0.0.1:0", "--kv-cache-gib", "0.5", "--max-num-seqs", "2"]
    repo_root = Path(__file__).resolve().parents[1]
    log = tmp_path / "serve.log"
    process = subprocess.Popen(command, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        with RetroserveClient(f"127.0.0.1:{port}", timeout=300) as client:
            assert wait_until(lambda: _serving(client), 300), "the serve process did not become SERVING"
            before = client.info().datastore.manifest_digest
            publish_over(other_datastore, serving)
            os.kill(process.pid, signal.SIGHUP)
            assert wait_until(lambda: client.info().datastore.manifest_digest != before, 60)
            assert client.generate(PROMPT, mode="chunk", max_new_tokens=2).generated_token_count == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        # A clean stop prints no traceback (vLLM's AsyncLLM.__del__ used to, after the engine stopped).
        assert "Traceback" not in log.read_text() and "Exception ignored" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _serving(client: RetroserveClient) -> bool:
    try:
        return client.health(timeout=5) == "SERVING"
    except grpc.RpcError:
        return False
