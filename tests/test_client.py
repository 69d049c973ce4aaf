"""The Python client and `retroserve generate` against a loopback server with a scripted servicer.

The servicer is a fake on purpose: these tests check what the client sends (fields set/unset,
metadata), how it reads streams and errors, and what the CLI prints; generation itself is tested
against the real engine elsewhere.
"""

from __future__ import annotations

import argparse
import io
import json
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from retroserve.v1 import retroserve_pb2 as pb
from retroserve.v1 import retroserve_pb2_grpc as pb_grpc
from server.client import RetroserveClient, build_generate_request
from server.cli.generate import add_generate_arguments, format_provenance, run_generate

NEIGHBOUR = pb.Neighbour(chunk_id=7, doc_id=2, source="pydoc_data.topics:assert", title="assert",
                         text="Assert statements are a convenient way to insert debugging assertions",
                         score=0.83)


class ScriptedServicer(pb_grpc.RetroserveServicer):
    def __init__(self):
        self.requests = []
        self.metadata = []

    def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.prompt == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature=-1 must be in [0, 100]")
        return pb.GenerateResponse(text=" world", generated_token_count=2, stop_reason=pb.STOP_REASON_MAX_TOKENS,
                                   request_id="rid")

    def GenerateStream(self, request, context):
        self.requests.append(request)
        yield pb.GenerateStreamResponse(
            text="Hello", prompt_token_count=3,
            retrievals=[pb.Retrieval(query_text="q one", start_token=0, end_token=0, neighbours=[NEIGHBOUR])],
        )
        yield pb.GenerateStreamResponse(
            text=" there", retrievals=[pb.Retrieval(query_text="q two", start_token=4, end_token=4)]
        )
        final = pb.GenerateStreamResponse(text="!", stop_reason=pb.STOP_REASON_STOP_SEQUENCE, stop_sequence="\n",
                                          generated_token_count=6, request_id="rid", seed=11)
        final.timing.retrievals = 2
        yield final

    def Retrieve(self, request, context):
        self.requests.append(request)
        return pb.RetrieveResponse(neighbours=[NEIGHBOUR] * request.neighbours)

    def Tokenize(self, request, context):
        return pb.TokenizeResponse(token_ids=[1, 2], token_count=2, tokens=["a", "b"] if request.return_tokens else [])

    def Info(self, request, context):
        return pb.InfoResponse(version="0.1.0")


@pytest.fixture
def server():
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = ScriptedServicer()
    pb_grpc.add_RetroserveServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", servicer
    grpc_server.stop(0)


def test_build_request_leaves_unset_options_unset():
    request = build_generate_request("hi")
    assert not request.sampling.HasField("temperature")
    assert not request.stopping.HasField("max_new_tokens")
    assert not request.retrieval.HasField("stride")
    assert request.retrieval.mode == pb.RETRIEVAL_MODE_UNSPECIFIED
    request = build_generate_request("hi", temperature=0.0, max_new_tokens=5, mode="chunk", stride=8,
                                      layout="after_prompt", stop_sequences=["\n"])
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert (request.stopping.max_new_tokens, request.retrieval.stride) == (5, 8)
    assert request.retrieval.mode == pb.RETRIEVAL_MODE_CHUNK
    assert request.retrieval.layout == pb.CONTEXT_LAYOUT_AFTER_PROMPT
    with pytest.raises(ValueError, match="must be one of"):
        build_generate_request("hi", mode="knn")
    with pytest.raises(TypeError):
        build_generate_request("hi", temprature=1.0)


def test_client_calls(server):
    address, servicer = server
    with RetroserveClient(address, timeout=5, request_id="client-default") as client:
        assert client.health() == "SERVING"
        response = client.generate("Hello", max_new_tokens=2, mode="none")
        assert response.text == " world"
        assert servicer.metadata[-1]["x-request-id"] == "client-default"
        client.generate("Hello", request_id="per-call")
        assert servicer.metadata[-1]["x-request-id"] == "per-call"
        deltas = list(client.generate_stream("Hello"))
        assert "".join(d.text for d in deltas) == "Hello there!"
        assert deltas[-1].stop_reason == pb.STOP_REASON_STOP_SEQUENCE
        assert len(client.retrieve("assert", neighbours=3).neighbours) == 3
        assert client.tokenize("a b", return_tokens=True).tokens == ["a", "b"]
        assert client.info().version == "0.1.0"
        with pytest.raises(grpc.RpcError) as info:
            client.generate("bad")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def parse(argv):
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return parser.parse_args(argv)


def test_cli_streams_and_prints_provenance(server):
    address, servicer = server
    out, err = io.StringIO(), io.StringIO()
    code = run_generate(parse(["Hi", "--address", address, "--mode", "chunk", "--k", "3", "--stride", "4",
                               "--provenance", "--max-new-tokens", "6"]), out, err)
    assert code == 0
    text = out.getvalue()
    assert text.startswith("Hello there!\n")
    assert "--- provenance: 2 retrievals ---" in text
    assert "[1] output tokens [0, 4)" in text and "[2] output tokens [4, 6)" in text  # open spans closed
    assert "0.830  doc 2 chunk 7  assert: 'Assert statements" in text
    request = servicer.requests[-1]
    assert (request.retrieval.neighbours, request.retrieval.stride, request.stopping.max_new_tokens) == (3, 4, 6)
    assert request.retrieval.return_provenance
    summary = err.getvalue()
    assert "6 tokens" in summary and "stop: stop_sequence" in summary and "seed 11" in summary


def test_cli_json(server):
    address, _ = server
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(parse(["Hi", "--address", address, "--json"]), out, err) == 0
    document = json.loads(out.getvalue())
    assert document["text"] == " world" and document["stop_reason"] == "STOP_REASON_MAX_TOKENS"


def test_cli_reports_errors_without_a_traceback(server):
    address, _ = server
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(parse(["bad", "--address", address, "--json"]), out, err) == 1
    assert err.getvalue() == "error: INVALID_ARGUMENT: sampling.temperature=-1 must be in [0, 100]\n"


def test_cli_without_a_server_says_so():
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(parse(["Hi", "--address", f"127.0.0.1:{port}", "--timeout", "5"]), out, err) == 1
    assert "is `retroserve serve` running?" in err.getvalue()


def test_format_provenance_without_retrievals():
    assert format_provenance([], 0) == "--- provenance: no retrievals ---\n"
