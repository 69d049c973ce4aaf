"""The real server on loopback: vLLM engine, FAISS datastore, gRPC, health, metrics.

One server runs for the whole session (tests/conftest.py; vLLM takes about a minute to load on
this machine). The model is the default prepared checkpoint (built once under .test-artefacts/, or
the directory in RETROSERVE_TEST_MODEL_DIR); the datastore is the small test corpus built with
that model's tokenizer. References: HF transformers for greedy output, the datastore's exact Flat search for
neighbours, the model's tokenizer for Tokenize.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from retroserve.v1 import retroserve_pb2 as pb
from server.client import RetroserveClient, build_generate_request
from loopback import ServerThread, server_config

PROMPT = "The assert statement in Python"
LONG_WAIT_S = 120


@pytest.fixture(scope="module")
def client(server):
    with RetroserveClient(server.address, timeout=LONG_WAIT_S) as client:
        yield client


@pytest.fixture(scope="module")
def hf_model(server):
    """HF transformers on the served 4-bit weights, dequantized (the reference for greedy output)."""
    from transformers import AutoModelForCausalLM

    from artefacts import checkpoint

    dense_dir = checkpoint.ensure_dense_copy(server.running.engine.config.model_dir)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, torch_dtype="float32")
    model.eval()
    return model


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def engine_idle(server) -> bool:
    return server.running.engine.num_unfinished_requests() == 0 and server.running.service.admission.admitted == 0


# -- health, reflection, info, tokenize -------------------------------------------------------------


def test_health_serving_and_reflection_lists_services(server, client):
    assert client.health("") == "SERVING"
    assert client.health("retroserve.v1.Retroserve") == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"retroserve.v1.Retroserve", "grpc.health.v1.Health"} <= names


def test_info_reports_model_datastore_and_limits(server, client, prepared_model_dir, server_datastore):
    from retriever import fingerprints

    info = client.info()
    assert info.model.name == prepared_model_dir.name
    assert info.model.fingerprint == fingerprints.model_fingerprint(prepared_model_dir)
    assert info.model.tokenizer_fingerprint == fingerprints.tokenizer_fingerprint(prepared_model_dir)
    assert info.model.fingerprint.startswith("model-sha256:")
    assert "gptq 4-bit group 32" in info.model.quantization
    assert info.model.max_model_len == 2048
    assert info.datastore.loaded and info.datastore.name == json.loads(
        (server_datastore / "manifest.json").read_text())["name"]
    assert info.datastore.entry_count == server.running.retrieval.datastore.ntotal > 0
    assert info.datastore.index_factory == "Flat"
    assert info.limits.max_queue == 4 and info.limits.max_prompt_tokens == 1024
    # Info is open to every client: no filesystem path anywhere in it (Admin replies name them).
    assert str(Path.home()) not in str(info) and "/tmp" not in str(info) and str(prepared_model_dir) not in str(info)
    assert pb.RETRIEVAL_MODE_CHUNK in info.retrieval_defaults.available_modes
    assert info.retrieval_defaults.mode == pb.RETRIEVAL_MODE_CHUNK


def test_tokenize_matches_the_model_tokenizer(server, client, prepared_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared_model_dir)
    text = "def f(x):\n    return x ** 2  # héllo"
    reply = client.tokenize(text, return_tokens=True)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert list(reply.token_ids) == expected and reply.token_count == len(expected)
    assert list(reply.tokens) == tokenizer.convert_ids_to_tokens(expected)


# -- generation --------------------------------------------------------------------------------------


def test_greedy_without_retrieval_equals_the_engines_own_greedy_output(server, client):
    """The server's loop (segments, detokenization, stop handling) adds nothing to vLLM's greedy."""
    from server.core.engine import SegmentSampling

    engine = server.running.engine
    prompt_ids = engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]

    async def direct():
        tokens = []
        async for delta in engine.generate_segment(prompt_ids, SegmentSampling(max_tokens=24), "direct-greedy"):
            tokens += delta.token_ids
        return tokens

    reply = client.generate(PROMPT, mode="none", max_new_tokens=24, return_token_ids=True)
    assert list(reply.token_ids) == server.call(direct())


def test_health_is_not_serving_until_the_engine_is_loaded(server, prepared_model_dir, server_datastore,
                                                          monkeypatch):
    """The port answers health checks with NOT_SERVING while the engine loads (the session's real
    engine, handed over only when the test releases it) and calls with UNAVAILABLE, then SERVING."""
    import asyncio
    import threading

    from prometheus_client import CollectorRegistry

    from server.api import app

    release = threading.Event()

    def slow_start_engine(config):
        release.wait(60)
        return server.running.engine

    monkeypatch.setattr(app, "start_engine", slow_start_engine)
    config = server_config(prepared_model_dir, server_datastore)
    config.address = f"127.0.0.1:{_free_port()}"
    started = asyncio.run_coroutine_threadsafe(app.start(config, registry=CollectorRegistry()), server.loop)
    try:
        with RetroserveClient(config.address, timeout=5) as probe:
            assert probe.health(wait_for_ready=True) == "NOT_SERVING"
            assert probe.health("retroserve.v1.Retroserve") == "NOT_SERVING"
            for call in (lambda: probe.generate(PROMPT, mode="none", max_new_tokens=2), probe.info,
                         lambda: list(probe.generate_stream(PROMPT, mode="none", max_new_tokens=2))):
                with pytest.raises(grpc.RpcError) as refused:  # retryable, not UNIMPLEMENTED
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "still loading" in refused.value.details()
            assert not started.done()
            release.set()
            started.result(60)
            assert probe.health() == "SERVING"
            assert probe.generate(PROMPT, mode="none", max_new_tokens=2).generated_token_count == 2
    finally:
        release.set()
        running = started.result(60)
        running.owns_engine = False  # the engine is the session server's
        server.call(running.shutdown(1))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_greedy_without_retrieval_agrees_with_transformers(server, client, hf_model):
    """The served greedy tokens, checked teacher-forced against fp32 transformers (same prefix at
    every step): each is the reference's argmax or within the kernels' rounding of it (the
    greedy margin of server/model/check.py: bf16 flips calls up to 0.134 nats apart on Zen 4,
    an AMX Xeon flipped one 0.136 apart, issue 14), and the served prompt log-probs of the
    whole sequence stay within the check's largest deviation and agree on every clear argmax.
    Exact equality of the 16 tokens held on one CPU only."""
    import torch

    from server.model import check as model_check

    reply = client.generate(PROMPT, mode="none", max_new_tokens=16, return_token_ids=True)
    tokenizer = server.running.engine.tokenizer
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + list(reply.token_ids)
    reference = model_check.reference_logprobs(hf_model, ids)
    steps = reference[len(prompt_ids) - 1:]  # row t predicts generated token t
    chosen = steps.gather(1, torch.tensor(reply.token_ids)[:, None])[:, 0]
    shortfall = steps.max(-1).values - chosen
    bounds = model_check.Bounds()
    assert shortfall.max().item() <= bounds.greedy_margin, shortfall.tolist()
    served, served_top1 = server.call(model_check.served_prompt_logprobs(server.running.engine, ids, "greedy-tf"))
    report = model_check.compare(served, served_top1, reference, ids, 1, bounds.greedy_margin)
    # max and greedy only: mean and bits per byte are the check text's statistics (test_eval.py)
    assert report.max_logprob_dev <= bounds.max_logprob_dev, report
    assert report.greedy_agree == report.greedy_checked, report.disagreements
    assert reply.text == tokenizer.decode(reply.token_ids, skip_special_tokens=True)
    assert reply.stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert reply.generated_token_count == 16 and reply.prompt_token_count == len(prompt_ids)
    assert not reply.HasField("seed") and len(reply.retrievals) == 0


def test_stream_carries_the_same_output_as_unary(server, client):
    options = dict(mode="chunk", max_new_tokens=24, stride=8, return_token_ids=True, return_provenance=True)
    unary = client.generate(PROMPT, **options)
    messages = list(client.generate_stream(PROMPT, **options))
    assert "".join(m.text for m in messages) == unary.text
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    last = messages[-1]
    assert last.stop_reason == pb.STOP_REASON_MAX_TOKENS and last.generated_token_count == 24
    assert all(m.stop_reason == pb.STOP_REASON_UNSPECIFIED for m in messages[:-1])
    streamed = [r for m in messages for r in m.retrievals]
    assert [r.start_token for r in streamed] == [r.start_token for r in unary.retrievals] == [0, 8, 16]
    assert all(r.end_token == r.start_token for r in streamed)  # open spans in the stream
    assert [[n.chunk_id for n in r.neighbours] for r in streamed] == [
        [n.chunk_id for n in r.neighbours] for r in unary.retrievals
    ]


def test_a_node_js_client_with_only_protos_on_its_include_path_gets_the_python_clients_results(server, client):
    """tests/node_client.js (@grpc/grpc-js + @grpc/proto-loader) loads retroserve/v1/retroserve.proto
    from protos/ alone and calls Info, Generate, GenerateStream and an invalid Generate."""
    import subprocess

    from test_protos import node_tool

    node_tool("@grpc/grpc-js")
    script = Path(__file__).parent / "node_client.js"
    result = subprocess.run(["node", str(script), server.address, PROMPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    node = json.loads(result.stdout)
    python = client.generate(PROMPT, mode="chunk", max_new_tokens=16, return_provenance=True)
    info = client.info()
    assert node["model"]["name"] == info.model.name and node["model"]["fingerprint"] == info.model.fingerprint
    assert node["text"] == node["stream"]["text"] == python.text
    assert node["stop_reason"] == node["stream"]["stop_reason"] == "STOP_REASON_MAX_TOKENS"
    assert node["chunk_ids"] == [[str(n.chunk_id) for n in r.neighbours] for r in python.retrievals]
    assert node["invalid"]["code"] == "INVALID_ARGUMENT" and "temperature" in node["invalid"]["details"]


def test_chunk_retrieval_provenance_matches_exact_search(server, client):
    """Neighbours in provenance equal a direct search of the (Flat, so exact) index, uncached.

    (LMDB allows one open environment per path and process, so the server's Datastore is used.)"""
    reply = client.generate(PROMPT, mode="chunk", neighbours=2, stride=8, query_tokens=16, max_new_tokens=24,
                            return_provenance=True, return_token_ids=True, keep_rank_margin=0)
    assert [(r.start_token, r.end_token) for r in reply.retrievals] == [(0, 8), (8, 16), (16, 24)]
    assert reply.retrievals[-1].end_char == len(reply.text)
    assert reply.timing.retrievals == 3
    datastore = server.running.retrieval.datastore
    assert datastore.manifest["index"]["factory"] == "Flat"
    exact = datastore.search_texts([r.query_text for r in reply.retrievals], 2)
    for retrieval, expected in zip(reply.retrievals, exact):
        assert [n.chunk_id for n in retrieval.neighbours] == [n.chunk_id for n in expected]
        assert [n.score for n in retrieval.neighbours] == pytest.approx([n.score for n in expected], abs=1e-4)
        assert retrieval.neighbours[0].text == expected[0].text
    # The first query is the prompt itself (shorter than query_tokens).
    assert reply.retrievals[0].query_text == PROMPT
    retrieved = client.retrieve(reply.retrievals[1].query_text, neighbours=2)
    assert [n.chunk_id for n in retrieved.neighbours] == [n.chunk_id for n in reply.retrievals[1].neighbours]
    assert retrieved.timing.total_ms > 0


@pytest.mark.parametrize("retriever", ["bm25", "fusion"])
def test_a_server_with_a_sparse_retriever_places_its_ranking_in_the_context(server, prepared_model_dir,
                                                                           server_datastore, retriever):
    """`--retriever bm25|fusion`: provenance equals that ranking of each query (the rankings
    themselves are checked against the BM25 formula and hand-computed fusion in test_sparse.py)
    and Info names the retriever."""
    import dataclasses

    from loopback import second_server

    config = server_config(prepared_model_dir, server_datastore)
    config.retrieval = dataclasses.replace(config.retrieval, retriever=retriever)
    running = second_server(server, config)
    try:
        with RetroserveClient(running.address, timeout=120) as sparse_client:
            assert sparse_client.info().retrieval_defaults.retriever == retriever
            reply = sparse_client.generate(PROMPT, mode="chunk", neighbours=2, stride=8, query_tokens=16,
                                           max_new_tokens=24, return_provenance=True, keep_rank_margin=0)
        queries = [r.query_text for r in reply.retrievals]
        assert len(queries) == 3
        datastore = server.running.retrieval.datastore
        expected = datastore.search_texts(queries, 2, method=retriever)
        for retrieval, row in zip(reply.retrievals, expected):
            assert [n.chunk_id for n in retrieval.neighbours] == [n.chunk_id for n in row]
            assert [n.score for n in retrieval.neighbours] == pytest.approx([n.score for n in row], rel=1e-5)
        assert running.running.retrieval.datastore.method == retriever
    finally:
        running.stop(1)


def test_a_server_with_shorter_neighbours_prefills_only_their_last_tokens(server, client, prepared_model_dir,
                                                                         server_datastore):
    """--neighbour-tokens N: the same retrieval costs the engine exactly the tokens of each
    neighbour that N leaves out against the session server's default, and Info reports N."""
    import dataclasses

    from loopback import second_server

    from server.core import context

    config = server_config(prepared_model_dir, server_datastore)
    config.retrieval = dataclasses.replace(config.retrieval, neighbour_tokens=24)
    running = second_server(server, config)
    request = dict(mode="chunk", neighbours=2, stride=8, max_new_tokens=8, return_provenance=True, keep_rank_margin=0)
    try:
        with RetroserveClient(running.address, timeout=120) as short_client:
            assert short_client.info().retrieval_defaults.neighbour_tokens == 24
            short = short_client.generate(PROMPT, **request)
    finally:
        running.stop(1)
    whole = client.generate(PROMPT, **request)
    ids = [n.chunk_id for n in whole.retrievals[0].neighbours]
    assert ids == [n.chunk_id for n in short.retrievals[0].neighbours] and len(ids) == 2
    chunks = server.running.retrieval.datastore.get_chunks(ids)

    def placed(neighbour_tokens: int) -> int:
        return len(context.neighbour_block(chunks, (), neighbour_tokens))

    cut = placed(client.info().retrieval_defaults.neighbour_tokens) - placed(24)
    assert cut > 0
    assert whole.prefix_cache.engine_prompt_tokens - short.prefix_cache.engine_prompt_tokens == cut


def test_a_rank_margin_reports_the_kept_neighbours_among_each_query_candidates(server, client):
    """With keep_rank_margin M a span may keep earlier neighbours: provenance then names those,
    each among the exact k + M nearest of that span's query, with that query's scores."""
    reply = client.generate(PROMPT, mode="chunk", neighbours=2, stride=4, query_tokens=8, max_new_tokens=32,
                            return_provenance=True, keep_rank_margin=6)
    assert reply.prefix_cache.continued_segments > 0
    datastore = server.running.retrieval.datastore
    exact = datastore.search_texts([r.query_text for r in reply.retrievals], 2 + 6)
    assert any(len(retrieval.neighbours) == 2 for retrieval in reply.retrievals)
    for retrieval, candidates in zip(reply.retrievals, exact):
        scores = {n.chunk_id: n.score for n in candidates}
        # BM25 finds no neighbour for a query that shares no word with the datastore (" 3.14\n**").
        assert len(retrieval.neighbours) == min(2, len(candidates))
        for neighbour in retrieval.neighbours:
            assert neighbour.score == pytest.approx(scores[neighbour.chunk_id], abs=1e-4)


def test_retrieval_changes_the_context(server, client):
    """With neighbours in the context the engine sees more prompt tokens than the user's prompt."""
    plain = client.generate(PROMPT, mode="none", max_new_tokens=8)
    retrieved = client.generate(PROMPT, mode="chunk", max_new_tokens=8, stride=8)
    assert plain.prefix_cache.engine_prompt_tokens == plain.prompt_token_count
    assert retrieved.prefix_cache.engine_prompt_tokens > retrieved.prompt_token_count + 64


def test_prefix_cache_reuse_is_measured(server, client):
    """A prompt of several KV blocks: the after_prompt layout keeps it first, so re-prompts reuse it."""
    from pydoc_data.topics import topics

    prompt = (topics["while"] + topics["for"])[:3000]
    reply = client.generate(prompt, mode="chunk", layout="after_prompt", stride=4, max_new_tokens=12)
    assert reply.prompt_token_count > 256
    assert reply.timing.retrievals == 3
    assert reply.prefix_cache.cached_prompt_tokens >= 256  # later segments reuse the prompt's blocks
    assert reply.prefix_cache.cached_prompt_tokens < reply.prefix_cache.engine_prompt_tokens


class FixedNeighbours:
    """A retrieval batcher that answers every query with the given rows of real datastore
    neighbours in turn, so a test decides when consecutive retrievals return the same chunks."""

    def __init__(self, *rows):
        self.rows = rows
        self.calls = 0

    async def retrieve(self, query_text: str, k: int):
        row = self.rows[self.calls % len(self.rows)]
        self.calls += 1
        return list(row)[:k]


def run_loop(server, batcher, **overrides):
    """One request through the server's generation loop and engine (greedy); its GenerationResult."""
    import uuid

    from server.core.generation import Generator
    from server.core.params import GenerationParams

    settings = GenerationParams(**{"prompt": PROMPT, "max_new_tokens": 24, "retrieval_mode": "chunk", "neighbours": 2,
                               "stride": 6, **overrides})

    async def collect():
        async for delta in Generator(server.running.engine).generate(settings, f"fixed-{uuid.uuid4().hex}",
                                                                    batcher=batcher):
            if delta.result is not None:
                return delta.result

    return server.call(collect(), timeout=LONG_WAIT_S)


def test_the_suffix_layout_keeps_prompt_and_output_cached_across_new_neighbours(server):
    """[prompt][output][neighbours][latest tokens]: a re-prompt with new neighbours finds the text
    before them in the prefix cache, so it computes far fewer tokens than prepend does."""
    from pydoc_data.topics import topics

    from server.core import context

    prompt = (topics["try"] + topics["with"])[:3000]
    found = server.running.retrieval.datastore.search_texts([prompt], 6)[0]
    rows = (found[:2], found[2:4], found[4:])  # disjoint: every retrieval brings new neighbours
    suffix = run_loop(server, FixedNeighbours(*rows), prompt=prompt, stride=4, max_new_tokens=12, layout="suffix")
    prepend = run_loop(server, FixedNeighbours(*rows), prompt=prompt, stride=4, max_new_tokens=12,
                       layout="prepend")
    assert suffix.continued_segments == prepend.continued_segments == 0
    assert suffix.prompt_tokens > 512 and len(suffix.retrievals) == 3
    assert suffix.cached_prompt_tokens >= 2 * 512  # the prompt's blocks, in both later segments
    # Each later segment computes at most: the neighbours, the repeated tail, the text's last partial
    # KV block and the span generated since (the floor plus less than one block).
    separator = context.separator_ids(server.running.engine.tokenizer)
    block = max(len(context.neighbour_block(row, separator)) for row in rows)
    first_segment = suffix.prompt_tokens + len(context.neighbour_block(rows[0], separator)) + context.SUFFIX_REPEAT_TOKENS
    per_segment = block + context.SUFFIX_REPEAT_TOKENS + server.running.engine.config.block_size + 4
    assert suffix.computed_prompt_tokens <= first_segment + 2 * per_segment
    assert suffix.computed_prompt_tokens < prepend.computed_prompt_tokens


@pytest.mark.parametrize("layout", ["prepend", "suffix"])
def test_the_same_neighbours_in_any_order_continue_one_uninterrupted_engine_request(server, layout):
    """Continuing the context across retrievals computes exactly what one engine request over the
    first context computes, and recomputes almost no prompt token."""
    from server.core import context
    from server.core.engine import SegmentSampling
    from server.core.params import GenerationParams

    found = server.running.retrieval.datastore.search_texts([PROMPT], 2)[0]
    kept = run_loop(server, FixedNeighbours(found, found[::-1]), layout=layout)
    assert kept.continued_segments == len(kept.retrievals) - 1 == 3
    engine = server.running.engine
    first = context.build_context(engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"], [], found,
                                  context.separator_ids(engine.tokenizer), engine.max_model_len - 24, layout=layout,
                                  neighbour_tokens=GenerationParams.neighbour_tokens)

    async def uninterrupted():
        tokens = []
        async for delta in engine.generate_segment(first.token_ids, SegmentSampling(max_tokens=24),
                                                   f"uninterrupted-{layout}"):
            tokens.extend(delta.token_ids)
        return tokens

    assert kept.token_ids == server.call(uninterrupted(), timeout=LONG_WAIT_S)
    # Each later segment recomputes at most the partial last KV block of what it continues.
    assert kept.computed_prompt_tokens <= len(first.token_ids) + 3 * engine.config.block_size
    if layout == "suffix":
        # Laid out again, every segment's neighbours follow new text: none of it is cached.
        relaid = run_loop(server, FixedNeighbours(found, found[::-1]), layout=layout, keep_same_neighbours=False)
        assert relaid.continued_segments == 0
        assert kept.computed_prompt_tokens < relaid.computed_prompt_tokens


def test_a_time_limit_stops_chunk_mode_mid_span_and_frees_the_engine(server, client):
    reply = client.generate(PROMPT, mode="chunk", stride=4, max_new_tokens=500, time_limit_ms=300)
    assert reply.stop_reason == pb.STOP_REASON_TIME_LIMIT
    assert reply.generated_token_count < 500
    assert wait_until(lambda: engine_idle(server)), "engine request still running after the time limit"


def test_stop_sequence_cuts_the_text(server, client):
    greedy = client.generate(PROMPT, mode="none", max_new_tokens=24).text
    stop = greedy[8:12]
    cut = client.generate(PROMPT, mode="none", max_new_tokens=24, stop_sequences=[stop])
    assert cut.stop_reason == pb.STOP_REASON_STOP_SEQUENCE and cut.stop_sequence == stop
    assert cut.text == greedy[: greedy.index(stop)]
    kept = client.generate(PROMPT, mode="none", max_new_tokens=24, stop_sequences=[stop], include_stop_sequence=True)
    assert kept.text == greedy[: greedy.index(stop) + len(stop)]


def test_seeded_sampling_is_reproducible_and_reports_its_seed(server, client):
    options = dict(mode="none", max_new_tokens=12, temperature=1.0, top_p=0.95)
    first = client.generate(PROMPT, seed=1234, **options)
    again = client.generate(PROMPT, seed=1234, **options)
    assert first.text == again.text and first.seed == 1234
    unseeded = client.generate(PROMPT, **options)
    assert unseeded.HasField("seed")
    replay = client.generate(PROMPT, seed=unseeded.seed, **options)
    assert replay.text == unseeded.text


def test_time_limit_stops_generation(server, client):
    reply = client.generate(PROMPT, mode="none", max_new_tokens=500, time_limit_ms=300)
    assert reply.stop_reason == pb.STOP_REASON_TIME_LIMIT
    assert reply.generated_token_count < 500
    assert wait_until(lambda: engine_idle(server))


def test_concurrent_requests_share_retrieval_batches(server, client):
    batcher = server.running.retrieval.batcher
    searches_before, calls_before = batcher.stats.searches, batcher.stats.calls
    prompts = [f"{PROMPT} number {i}" for i in range(4)]
    with futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda p: client.generate(p, mode="chunk", max_new_tokens=8, stride=8), prompts))
    assert all(r.stop_reason == pb.STOP_REASON_MAX_TOKENS for r in replies)
    calls = batcher.stats.calls - calls_before
    searches = batcher.stats.searches - searches_before
    assert calls == 4 and searches < calls  # the 50 ms window coalesced concurrent retrievals


# -- refusals, cancellation, overload ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(temperature=-1.0), "sampling.temperature"),
        (dict(max_new_tokens=100_000), "stopping.max_new_tokens"),
        (dict(mode="token"), "retrieval.mode"),
        (dict(mode="chunk", neighbours=99), "retrieval.neighbours"),
        (dict(stride=0), "retrieval.stride"),
    ],
)
def test_invalid_requests_are_refused_with_the_field_named(server, client, options, field):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(PROMPT, **options)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


def test_prompt_longer_than_the_limit_is_refused(server, client):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("word " * 2000, mode="none")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1024" in caught.value.details()


def test_cancelled_stream_aborts_the_engine_request(server, client):
    stream = client.stub.GenerateStream(build_generate_request(PROMPT, mode="chunk", max_new_tokens=400, stride=16))
    first = next(stream)
    assert first.text or first.retrievals
    stream.cancel()
    assert wait_until(lambda: engine_idle(server)), "engine request still running after cancel"
    assert client.health() == "SERVING"


def test_deadline_exceeded_aborts_the_engine_request(server, client):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(PROMPT, mode="none", max_new_tokens=400, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine_idle(server))


def test_requests_beyond_the_queue_bound_get_resource_exhausted(server, client):
    request = build_generate_request(PROMPT, mode="none", max_new_tokens=400)
    streams = [client.stub.GenerateStream(request) for _ in range(4)]
    try:
        for stream in streams:
            next(stream)  # all four admitted and decoding
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(PROMPT, mode="none", max_new_tokens=4)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - started < 2.0  # refused at once, not queued
    finally:
        for stream in streams:
            stream.cancel()
    assert wait_until(lambda: engine_idle(server))
    assert client.generate(PROMPT, mode="none", max_new_tokens=2).generated_token_count == 2


# -- metrics -------------------------------------------------------------------------------------------


def scrape(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10).read()
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_metrics_endpoint_reports_requests_latency_retrieval_and_engine(server, client):
    client.generate(PROMPT, mode="chunk", max_new_tokens=8, stride=4)
    samples = scrape(server)
    assert samples['retroserve_requests_total{code="OK",rpc="Generate"}'] >= 1
    assert samples['retroserve_errors_total{code="INVALID_ARGUMENT",rpc="Generate"}'] >= 1
    assert samples['retroserve_request_duration_seconds_count{mode="chunk",rpc="Generate"}'] >= 1
    assert samples['retroserve_time_to_first_token_seconds_count{mode="chunk"}'] >= 1
    assert samples['retroserve_inter_token_latency_seconds_count{mode="chunk"}'] >= 7
    assert samples["retroserve_retrieval_duration_seconds_count{}"] >= 2
    for phase in ("embed", "search", "payload"):
        assert samples[f'retroserve_retrieval_phase_duration_seconds_count{{phase="{phase}"}}'] >= 1
    assert samples['retroserve_retrieval_cache_hits_total{kind="exact"}'] >= 1  # repeated prompts above
    assert samples["retroserve_retrieval_cache_misses_total{}"] >= 1
    assert samples["retroserve_engine_prompt_tokens_total{}"] > samples["retroserve_prompt_tokens_total{}"]
    assert samples['retroserve_generated_tokens_total{mode="chunk"}'] >= 8
    assert 0 < samples['retroserve_computed_prompt_tokens_total{mode="chunk"}'] <= samples[
        "retroserve_engine_prompt_tokens_total{}"]
    assert samples["retroserve_requests_running{}"] == 0 and samples["retroserve_requests_waiting{}"] == 0
    assert any(name.startswith("vllm:") for name in samples), "vLLM's engine metrics are missing"


# -- CLI and shutdown (last: it stops the module's server) -------------------------------------------


def test_generate_cli_streams_from_the_server(server, capsys):
    from server.cli import main as cli

    code = cli.main(["generate", "--address", server.address, "--mode", "chunk", "--max-new-tokens", "8",
                     "--provenance", PROMPT])
    captured = capsys.readouterr()
    assert code == 0
    assert "8 tokens; stop: max_tokens" in captured.err and "provenance" in captured.out


def test_serve_cli_names_a_missing_model_and_the_fix(tmp_path, capsys):
    from server.cli import main as cli

    code = cli.main(["serve", "--model-dir", str(tmp_path / "missing"), "--address", "127.0.0.1:0",
                     "--metrics-address", "127.0.0.1:0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no prepared model" in err and "retroserve model prepare" in err


def test_shutdown_drains_in_flight_requests(server, prepared_model_dir, server_datastore):
    """A second server on the same engine: SIGTERM's path (shutdown with grace) lets an admitted
    stream finish, then the port closes; the session's server and engine keep running."""
    from prometheus_client import CollectorRegistry

    second = ServerThread(server_config(prepared_model_dir, server_datastore), engine=server.running.engine,
                          registry=CollectorRegistry(), loop=server.loop)
    with RetroserveClient(second.address, timeout=LONG_WAIT_S) as client:
        stream = client.stub.GenerateStream(build_generate_request(PROMPT, mode="none", max_new_tokens=24))
        first = next(stream)
        stopping = futures.ThreadPoolExecutor(1).submit(second.stop, 30.0)
        assert wait_until(lambda: client.health() == "NOT_SERVING", 5)  # probes still answered
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(PROMPT, mode="none", max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)  # the admitted request finishes during the drain
        assert rest[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS
        assert rest[-1].generated_token_count == 24 and (first.text + "".join(m.text for m in rest))
        stopping.result(60)
    assert second.running.stopped.is_set()
    with pytest.raises(grpc.RpcError):
        RetroserveClient(second.address, timeout=2).health()
    with RetroserveClient(server.address, timeout=LONG_WAIT_S) as client:
        assert client.health() == "SERVING"
        assert client.generate(PROMPT, mode="none", max_new_tokens=2).generated_token_count == 2
