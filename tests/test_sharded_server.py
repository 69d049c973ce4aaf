"""The real server over three shard processes on loopback, against the same datastore unsharded.

The session's server (tests/conftest.py) serves the small datastore locally; a second server on the
same engine serves it through `retroserve retriever serve` child processes (shards of one split).
Retrieve and greedy generation with provenance must agree exactly; a killed shard must give the
request's policy (partial neighbours reported in provenance, or UNAVAILABLE) within the per-shard
deadline, and show up in the shard failure metrics.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import pytest

from datastore_tools.shard import shard_datastore, shard_dir
from loopback import RetrieverProcess, ServerThread, server_config
from retroserve.v1 import retroserve_pb2 as pb
from retriever.datastore import read_manifest
from server.client import RetroserveClient
from server.config import ShardsConfig

SHARDS = 3
TIMEOUT_MS = 500.0
WAIT_S = 120
QUERIES = ["The assert statement", "del removes a binding", "nonlocal variables in nested functions",
           "return leaves a function call", "global declarations"]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory, server_datastore):
    output = tmp_path_factory.mktemp("server-shards") / "shards"
    shard_datastore(server_datastore, output, SHARDS)
    processes = [RetrieverProcess(shard_dir(output, i)) for i in range(SHARDS)]
    yield output, processes
    for process in processes:
        if process.process.poll() is None:
            os.kill(process.process.pid, signal.SIGCONT)
        process.kill()


@pytest.fixture(scope="module")
def sharded(server, prepared_model_dir, server_datastore, shard_set):
    from prometheus_client import CollectorRegistry

    _, processes = shard_set
    config = server_config(prepared_model_dir, server_datastore)
    # Shards listed out of order: the server orders them by the index each one reports.
    config.shards = ShardsConfig(retriever_shards=",".join(p.address for p in reversed(processes)),
                                 shard_timeout_ms=TIMEOUT_MS, shard_connect_timeout_s=30)
    running = ServerThread(config, engine=server.running.engine, registry=CollectorRegistry(), loop=server.loop)
    yield running
    running.stop(1.0)


@pytest.fixture(scope="module")
def dense_local(server, prepared_model_dir, server_datastore):
    """The unsharded server to compare with: shards are searched dense (retriever/sparse.py), so it
    ranks dense too (the session server's `auto` serves BM25 from this datastore)."""
    import dataclasses

    from loopback import second_server

    config = server_config(prepared_model_dir, server_datastore)
    config.retrieval = dataclasses.replace(config.retrieval, retriever="dense")
    running = second_server(server, config)
    yield running
    running.stop(1.0)


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_sharded_server_describes_its_shards(server, sharded, shard_set):
    _, processes = shard_set
    with RetroserveClient(sharded.address, timeout=WAIT_S) as client, \
            RetroserveClient(server.address, timeout=WAIT_S) as local:
        info, local_info = client.info(), local.info()
    assert list(info.datastore.shard_addresses) == [p.address for p in processes]
    assert info.datastore.entry_count == local_info.datastore.entry_count
    assert info.datastore.document_count == local_info.datastore.document_count
    assert info.datastore.name == local_info.datastore.name and info.datastore.index_factory == "Flat"
    assert info.retrieval_defaults.shard_policy == pb.SHARD_POLICY_PARTIAL
    assert info.retrieval_defaults.retriever == "dense"  # shards search FAISS only
    assert local_info.retrieval_defaults.retriever == "bm25"  # auto, the datastore has a BM25 index


def test_retrieve_and_generation_equal_the_unsharded_server(dense_local, sharded):
    with RetroserveClient(sharded.address, timeout=WAIT_S) as client, \
            RetroserveClient(dense_local.address, timeout=WAIT_S) as local:
        for query in QUERIES:
            got, want = client.retrieve(query, neighbours=16), local.retrieve(query, neighbours=16)
            assert list(got.neighbours) == list(want.neighbours)  # ids, scores, texts, sources
            assert not got.missing_shards
        options = dict(mode="chunk", neighbours=2, stride=8, max_new_tokens=24, return_provenance=True,
                       return_token_ids=True)
        got = client.generate("The with statement in Python", **options)
        want = local.generate("The with statement in Python", **options)
    assert list(got.token_ids) == list(want.token_ids) and got.text == want.text
    assert [list(r.neighbours) for r in got.retrievals] == [list(r.neighbours) for r in want.retrievals]
    assert all(not r.missing_shards for r in got.retrievals)


def test_a_killed_shard_gives_the_requests_policy_within_the_deadline(dense_local, sharded, shard_set):
    """Runs after the equality tests (file order): it kills shard 1 and hangs shard 2."""
    output, processes = shard_set
    first, end = read_manifest(shard_dir(output, 1))["shard"]["chunk_ids"]
    processes[1].kill()
    with RetroserveClient(sharded.address, timeout=WAIT_S) as client, \
            RetroserveClient(dense_local.address, timeout=WAIT_S) as local:
        query = "assert raises AssertionError when the expression is false"
        started = time.perf_counter()
        partial = client.retrieve(query, neighbours=4)
        assert time.perf_counter() - started < TIMEOUT_MS / 1000 + 1.0
        everything = local.retrieve(query, neighbours=16).neighbours
        expected = [n for n in everything if not first <= n.chunk_id < end][:4]
        assert list(partial.neighbours) == expected
        assert [(m.shard_index, m.address, m.reason) for m in partial.missing_shards] == [
            (1, processes[1].address, pb.SHARD_FAILURE_UNAVAILABLE)]

        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as refused:
            client.retrieve(query + "?", neighbours=4, shard_policy="require_all")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shard 1" in refused.value.details() and "REQUIRE_ALL" in refused.value.details()
        assert time.perf_counter() - started < TIMEOUT_MS / 1000 + 1.0

        reply = client.generate("Explain the del statement", mode="chunk", neighbours=2, stride=8,
                                max_new_tokens=8, return_provenance=True)
        assert reply.retrievals and all(
            [m.shard_index for m in r.missing_shards] == [1] for r in reply.retrievals)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate("Explain the global statement", mode="chunk", max_new_tokens=8,
                            shard_policy="require_all")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        os.kill(processes[2].process.pid, signal.SIGSTOP)  # alive but silent: late, not down
        try:
            started = time.perf_counter()
            late = client.retrieve("continue skips to the next iteration", neighbours=4)
            assert time.perf_counter() - started < TIMEOUT_MS / 1000 + 1.0
            assert {(m.shard_index, m.reason) for m in late.missing_shards} == {
                (1, pb.SHARD_FAILURE_UNAVAILABLE), (2, pb.SHARD_FAILURE_TIMEOUT)}
        finally:
            os.kill(processes[2].process.pid, signal.SIGCONT)

    metrics = scrape(sharded.running.metrics_port)
    failures = "retroserve_shard_failures_total"
    assert metrics[(failures, (("reason", "unavailable"), ("shard", "1")))] >= 3
    assert metrics[(failures, (("reason", "timeout"), ("shard", "2")))] >= 1
    assert metrics[(failures, (("reason", "timeout"), ("shard", "0")))] == 0
    assert metrics[("retroserve_shard_search_duration_seconds_count", (("shard", "0"),))] >= 1
