"""Sharded datastores without the engine: `datastore shard` output, and search through real shard
servers on loopback compared with the unsharded Datastore exactly (ids, scores, payloads).

Shards run in-process (RetrieverThread) where only equality matters, and as child processes
(RetrieverProcess) where a shard must die or hang.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from datastore_tools import cli as datastore_cli
from datastore_tools.shard import shard_datastore, shard_dir
from datastore_tools.verify import verify_datastore
from loopback import RetrieverProcess, RetrieverThread
from retriever.datastore import Datastore, FingerprintMismatch, read_manifest
from retriever.fanout import FanoutSearcher, ShardSetError, ShardsUnavailable, enforce_shard_policy

SHARDS = 3


def queries(datastore_dir: Path, n_random: int = 24) -> np.ndarray:
    """Every chunk's own embedding (exact hits, duplicate ties) plus seeded random unit vectors."""
    stored = np.load(datastore_dir / "embeddings.npy").astype(np.float32)
    rs = np.random.RandomState(0)
    noise = rs.randn(n_random, stored.shape[1]).astype(np.float32)
    mixed = stored[rs.randint(0, len(stored), n_random)] + 0.3 * noise
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return np.vstack([stored, mixed])


def split_and_serve(parent: Path, output: Path, count: int = SHARDS):
    shard_datastore(parent, output, count)
    return [RetrieverThread(shard_dir(output, i)) for i in range(count)]


def assert_same_results(parent: Path, servers, batch_sizes=(1, 7, 40), ks=(1, 5, 12, 64)):
    vectors = queries(parent)
    with Datastore.open(parent, device="cpu") as local:
        searcher = FanoutSearcher.connect([s.address for s in reversed(servers)], timeout_s=30)
        try:
            assert searcher.ntotal == local.ntotal
            for batch in batch_sizes:
                for k in ks:
                    for start in range(0, len(vectors), max(batch, 25)):
                        block = vectors[start : start + batch]
                        expected = local.search_embeddings(block, k)
                        got = searcher.search_embeddings(block, k)
                        for want_row, got_row in zip(expected, got):
                            assert [n.chunk_id for n in got_row] == [n.chunk_id for n in want_row]
                            assert [n.score for n in got_row] == [n.score for n in want_row]
                            assert list(got_row) == list(want_row)  # payloads, tokens, continuations
                            assert got_row.missing_shards == ()
        finally:
            searcher.close()


@pytest.fixture(scope="module")
def flat_shards(small_datastore, tmp_path_factory):
    output = tmp_path_factory.mktemp("flat-shards") / "shards"
    servers = split_and_serve(small_datastore, output)
    yield output, servers
    for server in servers:
        server.stop()


# -- datastore shard ------------------------------------------------------------------------------

def test_shards_are_complete_datastores_that_tile_the_parent(small_datastore, flat_shards):
    output, _ = flat_shards
    parent = read_manifest(small_datastore)
    manifests = [read_manifest(shard_dir(output, i)) for i in range(SHARDS)]
    ranges = [m["shard"]["chunk_ids"] for m in manifests]
    assert ranges[0][0] == 0 and ranges[-1][1] == parent["counts"]["chunks"]
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    assert sum(m["counts"]["documents"] for m in manifests) == parent["counts"]["documents"]
    assert len({m["shard"]["trained_index_sha256"] for m in manifests}) == 1
    for i, manifest in enumerate(manifests):
        assert manifest["shard"]["index"] == i and manifest["shard"]["count"] == SHARDS
        assert manifest["shard"]["parent"]["index_sha256"] == parent["files"]["index.faiss"]["sha256"]
        assert manifest["tokenizer"] == parent["tokenizer"] and manifest["index"] == parent["index"]
        assert verify_datastore(shard_dir(output, i)) == []
    assert not list(output.parent.glob("*.partial-*"))


def test_a_continuation_in_another_shard_is_copied_as_payload_only(small_datastore, tmp_path):
    """After prune, a chunk may continue into another document (its duplicate's representative);
    the shard keeps that continuation's payload so [chunk, continuation] stays whole."""
    from datastore_tools.derive import write_derived

    with Datastore.open(small_datastore, device="cpu") as source:
        n = source.ntotal
        first_doc = source.get_chunks([0, 1])
        assert first_doc[0].doc_id == first_doc[1].doc_id  # chunk 0 continues into chunk 1
        keep = [i for i in range(n) if i != 1]  # drop chunk 1, redirect its link to the last chunk
        vectors = np.load(small_datastore / "embeddings.npy").astype(np.float32)[keep]
        write_derived(source, tmp_path / "linked", keep, vectors, factory="Flat", pca_dim=None,
                      operation={"test": "cross-document continuation"}, redirect={1: n - 1})
    shard_datastore(tmp_path / "linked", tmp_path / "shards", SHARDS)
    first = read_manifest(shard_dir(tmp_path / "shards", 0))
    assert first["shard"]["continuation_ids"] == [n - 2]  # the old last chunk, renumbered
    assert verify_datastore(shard_dir(tmp_path / "shards", 0)) == []
    servers = [RetrieverThread(shard_dir(tmp_path / "shards", i)) for i in range(SHARDS)]
    try:
        assert_same_results(tmp_path / "linked", servers, batch_sizes=(40,), ks=(64,))
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("count, expected", [("0", "shard count must be between 1 and"),
                                             ("999", "shard count must be between 1 and")])
def test_shard_count_out_of_range_is_refused(small_datastore, tmp_path, capsys, count, expected):
    code = datastore_cli.main(["shard", str(small_datastore), "-n", count, "-o", str(tmp_path / "out")])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_datastore_and_existing_output_are_refused(small_datastore, tmp_path, capsys):
    assert datastore_cli.main(["shard", str(tmp_path / "nothing"), "-n", "2", "-o", str(tmp_path / "out")]) == 2
    assert "does not exist; build one with `retroserve datastore build`" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    assert datastore_cli.main(["shard", str(small_datastore), "-n", "2", "-o", str(tmp_path / "out")]) == 2
    assert "already exists; choose another output or pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list((tmp_path / "out").iterdir())


def test_unshareable_index_and_shard_of_a_shard_are_refused(small_datastore, flat_shards, tmp_path, capsys):
    from datastore_tools.prune import prune_datastore

    prune_datastore(small_datastore, tmp_path / "hnsw", exact=False, index="HNSW8,Flat")
    assert datastore_cli.main(["shard", str(tmp_path / "hnsw"), "-n", "2", "-o", str(tmp_path / "out")]) == 2
    assert "cannot be split into shards that share one trained index" in capsys.readouterr().err
    output, _ = flat_shards
    assert datastore_cli.main(["shard", str(shard_dir(output, 1)), "-n", "2", "-o", str(tmp_path / "out")]) == 2
    assert "is already shard 1 of 3; shard its parent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- search through shard servers equals the unsharded search -------------------------------------

def test_flat_shards_give_the_unsharded_neighbours(small_datastore, flat_shards):
    _, servers = flat_shards
    assert_same_results(small_datastore, servers)


@pytest.mark.parametrize("factory, pca, params", [("IVF4,SQ8", None, {"nprobe": 2}), ("Flat", 16, None)])
def test_ivf_and_pca_shards_give_the_unsharded_neighbours(small_datastore, tmp_path, factory, pca, params):
    """IVF: shards keep the parent's centroids and SQ codes in their lists, and probe the same lists."""
    from datastore_tools.derive import write_derived

    with Datastore.open(small_datastore, device="cpu") as source:
        vectors = np.load(small_datastore / "embeddings.npy").astype(np.float32)
        write_derived(source, tmp_path / "parent", range(source.ntotal), vectors, factory=factory, pca_dim=pca,
                      operation={"test": factory}, search_params=params)
    servers = split_and_serve(tmp_path / "parent", tmp_path / "shards")
    try:
        assert_same_results(tmp_path / "parent", servers)
    finally:
        for server in servers:
            server.stop()


def test_shards_of_different_splits_are_refused(small_datastore, flat_shards, tmp_path):
    output, servers = flat_shards
    other = RetrieverThread(small_datastore)  # the whole datastore: shard 0 of 1
    try:
        with pytest.raises(ShardSetError, match="is shard 0 of 1, but --retriever-shards names 3"):
            FanoutSearcher.connect([servers[0].address, servers[1].address, other.address], timeout_s=5)
        with pytest.raises(ShardSetError, match="shard 1 is served at"):
            FanoutSearcher.connect([servers[0].address, servers[1].address, servers[1].address], timeout_s=5)
        with pytest.raises(FingerprintMismatch, match="the served model's tokenizer is tok-sha256:other"):
            FanoutSearcher.connect([s.address for s in servers], timeout_s=5,
                                   expected_tokenizer_fingerprint="tok-sha256:other")
        with pytest.raises(ShardSetError, match="did not answer Describe within 0.5 s"):
            FanoutSearcher.connect(["127.0.0.1:1", servers[1].address], timeout_s=5, connect_timeout_s=0.5)
    finally:
        other.stop()


def test_text_queries_search_on_the_shard(small_datastore, flat_shards, encoder):
    """A client without the encoder (grpcurl) sends texts; the shard embeds them."""
    import grpc

    from retroserve.v1 import retriever_pb2 as rpb
    from retroserve.v1 import retriever_pb2_grpc

    _, servers = flat_shards
    with grpc.insecure_channel(servers[0].address) as channel:
        stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
        info = stub.Describe(rpb.DescribeRequest())
        reply = stub.Search(rpb.SearchRequest(texts=rpb.QueryTexts(texts=["the assert statement"]), k=3))
        assert len(reply.results) == 1 and reply.shard_index == info.shard_index == 0
        ids = [n.neighbour.chunk_id for n in reply.results[0].neighbours]
        assert all(info.first_chunk_id <= i < info.end_chunk_id for i in ids) and len(ids) == 3
        with pytest.raises(grpc.RpcError) as error:
            stub.Search(rpb.SearchRequest(embeddings=rpb.QueryEmbeddings(dim=384, values=b"\0" * 10), k=3))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a whole number of rows" in error.value.details()


# -- a shard that dies or hangs ------------------------------------------------------------------

@pytest.fixture
def shard_processes(small_datastore, tmp_path):
    shard_datastore(small_datastore, tmp_path / "shards", SHARDS)
    processes = [RetrieverProcess(shard_dir(tmp_path / "shards", i)) for i in range(SHARDS)]
    yield processes
    for process in processes:
        if process.process.poll() is None:
            os.kill(process.process.pid, signal.SIGCONT)
        process.kill()


def test_a_killed_or_hung_shard_gives_partial_results_within_the_deadline(small_datastore, shard_processes):
    timeout_s = 0.5
    vectors = queries(small_datastore)[:8]
    searcher = FanoutSearcher.connect([p.address for p in shard_processes], timeout_s=timeout_s)
    try:
        with Datastore.open(small_datastore, device="cpu") as local:
            expected = local.search_embeddings(vectors, 64)
        first, end = read_manifest(shard_processes[1].datastore_dir)["shard"]["chunk_ids"]

        def partial_expected():
            return [[n.chunk_id for n in row if not first <= n.chunk_id < end] for row in expected]

        shard_processes[1].kill()
        started = time.perf_counter()
        got = searcher.search_embeddings(vectors, 64)
        assert time.perf_counter() - started < timeout_s
        assert [[n.chunk_id for n in row] for row in got] == partial_expected()
        assert got[0].missing_shards[0].index == 1 and got[0].missing_shards[0].reason == "unavailable"
        assert enforce_shard_policy(got[0], "partial") == got[0].missing_shards
        with pytest.raises(ShardsUnavailable, match="REQUIRE_ALL"):
            enforce_shard_policy(got[0], "require_all")

        os.kill(shard_processes[2].process.pid, signal.SIGSTOP)  # alive but silent: a late shard
        started = time.perf_counter()
        got = searcher.search_embeddings(vectors, 64)
        assert time.perf_counter() - started < timeout_s + 0.5
        assert {(m.index, m.reason) for m in got[0].missing_shards} == {(1, "unavailable"), (2, "timeout")}
        assert enforce_shard_policy(got[0], "partial")

        shard_processes[0].kill()
        got = searcher.search_embeddings(vectors, 64)
        assert [list(row) for row in got] == [[]] * len(vectors)
        with pytest.raises(ShardsUnavailable, match="no datastore shard answered"):
            enforce_shard_policy(got[0], "partial")
    finally:
        searcher.close()


# -- retriever serve as a process -------------------------------------------------------------------

def test_retriever_serve_has_health_and_reflection_and_exits_cleanly_on_sigterm(flat_shards):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    output, _ = flat_shards
    process = RetrieverProcess(shard_dir(output, 2))
    try:
        with grpc.insecure_channel(process.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "retroserve.v1.RetrieverService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for reply in replies for s in reply.list_services_response.service}
            assert {"retroserve.v1.RetrieverService", "grpc.health.v1.Health"} <= names
        assert process.terminate() == 0
    finally:
        process.kill()


def test_retriever_serve_names_a_missing_datastore(tmp_path, capsys):
    from server.cli import main as cli

    code = cli.main(["retriever", "serve", "--datastore-dir", str(tmp_path / "missing"),
                     "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"])
    assert code == 2
    assert "does not exist; build one with `retroserve datastore build`" in capsys.readouterr().err
