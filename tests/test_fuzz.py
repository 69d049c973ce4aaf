"""Fuzzing the gRPC API of a real server on loopback: any request message, and raw bytes.

Every method of `retroserve.v1` gets hypothesis-generated requests (tests/proto_strategies.py) and
arbitrary bytes through a generic channel (identity serializers, so nothing is checked on the
client side). The server must answer each one with a status the .proto documents for it, never
INTERNAL, stay SERVING, and hold no engine request or admission slot afterwards.

The server runs on the session's engine with small limits (4 new tokens, 2 s time limit) so that
requests which pass validation finish in about a second. The default suite tries
FUZZ_EXAMPLES=40 requests per method; `RETROSERVE_FUZZ_EXAMPLES=500` runs a larger search.
"""

from __future__ import annotations

import collections
import os
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proto_strategies
from loopback import second_server, server_config
from retroserve.v1 import admin_pb2, retroserve_pb2 as pb

FUZZ_EXAMPLES = int(os.environ.get("RETROSERVE_FUZZ_EXAMPLES", "40"))
CALL_TIMEOUT_S = 120
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

METHODS = {
    # method path: (request class, server streaming, codes the .proto documents for a lone client)
    "/retroserve.v1.Retroserve/Generate": (pb.GenerateRequest, False, {OK, INVALID}),
    "/retroserve.v1.Retroserve/GenerateStream": (pb.GenerateRequest, True, {OK, INVALID}),
    "/retroserve.v1.Retroserve/Retrieve": (pb.RetrieveRequest, False, {OK, INVALID}),
    "/retroserve.v1.Retroserve/Tokenize": (pb.TokenizeRequest, False, {OK, INVALID}),
    "/retroserve.v1.Retroserve/Info": (pb.InfoRequest, False, {OK, INVALID}),
    "/retroserve.v1.Admin/ReloadDatastore": (admin_pb2.ReloadDatastoreRequest, False, {INVALID, PRECONDITION}),
}
CASES: collections.Counter = collections.Counter()
"""Calls sent per method (printed when the module's server stops: run with -s to see them)."""
NORMAL_STOPS = {pb.STOP_REASON_MAX_TOKENS, pb.STOP_REASON_EOS_TOKEN, pb.STOP_REASON_STOP_SEQUENCE,
                pb.STOP_REASON_TIME_LIMIT}


@pytest.fixture(scope="module")
def fuzz_server(server, prepared_model_dir, server_datastore):
    config = server_config(prepared_model_dir, server_datastore, max_new_tokens=4, default_max_new_tokens=4,
                           max_prompt_tokens=128, max_time_limit_s=2.0, max_queue=2)
    running = second_server(server, config)
    yield running
    running.stop(1)
    print(f"\nfuzz calls sent: {sum(CASES.values())} {dict(sorted(CASES.items()))}")


@pytest.fixture(scope="module")
def channel(fuzz_server):
    with grpc.insecure_channel(fuzz_server.address) as channel:
        yield channel


def call_raw(channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, list[bytes], str]:
    """(status, response messages as bytes, details) of one call with `payload` as the request."""
    _, streaming, _ = METHODS[method]
    CASES[method.rsplit("/", 1)[-1]] += 1
    identity = dict(request_serializer=None, response_deserializer=None)
    try:
        if streaming:
            replies = list(channel.unary_stream(method, **identity)(payload, timeout=CALL_TIMEOUT_S))
        else:
            replies = [channel.unary_unary(method, **identity)(payload, timeout=CALL_TIMEOUT_S)]
    except grpc.RpcError as error:
        return error.code(), [], error.details() or ""
    return OK, replies, ""


def check_answer(method: str, code: grpc.StatusCode, replies: list[bytes], details: str, request) -> None:
    _, _, allowed = METHODS[method]
    assert code in allowed, f"{method} answered {code.name} ({details!r}) to {request!r}"
    name = method.rsplit("/", 1)[-1]
    if code is OK and name in ("Generate", "GenerateStream"):
        final = (pb.GenerateResponse if name == "Generate" else pb.GenerateStreamResponse).FromString(replies[-1])
        assert final.stop_reason in NORMAL_STOPS, f"{method} ended with {final.stop_reason} for {request!r}"


def assert_idle(fuzz_server) -> None:
    """No engine request, admission slot or retired datastore left behind; health SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = fuzz_server.running
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (running.engine.num_unfinished_requests()
                                           or running.service.admission.admitted):
        time.sleep(0.1)
    assert running.engine.num_unfinished_requests() == 0
    assert running.service.admission.admitted == 0
    assert not running.datastores.retired_open
    with grpc.insecure_channel(fuzz_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuzzed_requests_get_only_documented_codes(fuzz_server, channel, method):
    request_class, _, _ = METHODS[method]
    strategy = proto_strategies.message(request_class)
    if request_class is admin_pb2.ReloadDatastoreRequest:
        # An empty path reloads the datastore serving now: a real swap, not a fuzz case.
        strategy = strategy.filter(lambda request: request.path != "")

    @FUZZ_SETTINGS
    @given(strategy)
    def one(request):
        code, replies, details = call_raw(channel, method, request.SerializeToString())
        check_answer(method, code, replies, details, request)

    one()
    assert_idle(fuzz_server)


# Bytes that are not a valid encoding of any message: a truncated varint, a length past the end,
# a reserved wire type, a group that never ends, an overlong tag, a huge length, a cut length.
MALFORMED = (b"\x08", b"\x0a\x05ab", b"\x0f", b"\x0b", b"\xff" * 11, b"\x12\xff\xff\xff\xff\x0f", b"\x0a\x80")
INVALID_UTF8_IN_FIELD_1 = b"\x0a\x02\xc3\x28"
"""Undecodable where field 1 is a string (prompt, query, text, path); an unknown field elsewhere."""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_raw_bytes_get_only_documented_codes(fuzz_server, channel, method):
    """Undecodable requests are INVALID_ARGUMENT (they never reach the servicer); bytes that
    happen to decode are ordinary requests."""
    request_class, _, _ = METHODS[method]
    first = request_class.DESCRIPTOR.fields_by_number.get(1)
    string_first = first is not None and first.type == first.TYPE_STRING
    for payload in MALFORMED + ((INVALID_UTF8_IN_FIELD_1,) if string_first else ()):
        code, _, details = call_raw(channel, method, payload)
        assert code is INVALID, f"{method} answered {code.name} ({details!r}) to {payload!r}"
        assert "could not be decoded" in details

    @FUZZ_SETTINGS
    @given(st.binary(max_size=200))
    def one(payload):
        try:
            request = request_class.FromString(payload)
        except Exception:
            request = None
        if request is not None and method.endswith("ReloadDatastore") and request.path == "":
            return  # a real reload of the serving datastore, not a fuzz case
        code, replies, details = call_raw(channel, method, payload)
        if request is None:
            assert code is INVALID, f"{method} answered {code.name} ({details!r}) to undecodable {payload!r}"
        else:
            check_answer(method, code, replies, details, payload)

    one()
    assert_idle(fuzz_server)


@pytest.mark.parametrize("path", ["x" * 5000, "/proc/1/root/datastore", "a\x00b", "."])
def test_reload_of_an_unreadable_path_is_a_failed_precondition(fuzz_server, channel, path):
    """A name too long or a directory the server may not read was INTERNAL (OSError escaped)."""
    request = admin_pb2.ReloadDatastoreRequest(path=path)
    code, _, details = call_raw(channel, "/retroserve.v1.Admin/ReloadDatastore", request.SerializeToString())
    assert code is PRECONDITION, f"{code.name}: {details}"
    assert "still serving" in details


def in_bounds_generation_requests():
    """Requests inside every bound of the fuzz server, edges included (stride 1, 16 neighbours,
    query of 1 token, top_k at its maximum, odd stop sequences), so they reach the generation loop
    rather than validation."""
    texts = st.one_of(st.sampled_from([t for t in proto_strategies.TEXTS if t.strip() and len(t) < 200]),
                      st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=80).filter(str.strip))
    stops = st.lists(st.one_of(st.sampled_from([" ", "\n", "the", "é", "🙂", "<|im_end|>"]),
                               st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)),
                     max_size=3)
    return st.builds(
        lambda prompt, temperature, top_p, top_k, seed, max_new, stop_sequences, include, time_ms, mode, layout,
        neighbours, stride, query_tokens, provenance, ids, logprobs: pb.GenerateRequest(
            prompt=prompt,
            sampling=pb.SamplingParameters(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            stopping=pb.StoppingCriteria(max_new_tokens=max_new, stop_sequences=stop_sequences,
                                         include_stop_sequence=include, time_limit_ms=time_ms),
            retrieval=pb.RetrievalParameters(mode=mode, layout=layout, neighbours=neighbours, stride=stride,
                                             query_tokens=query_tokens, return_provenance=provenance),
            response=pb.ResponseOptions(return_token_ids=ids, return_logprobs=logprobs)),
        texts, st.sampled_from([0.0, 0.0, 1e-6, 0.7, 1.0, 2.0]), st.sampled_from([1e-6, 0.5, 1.0]),
        st.sampled_from([0, 1, 50, 262_144]), st.integers(0, 2**31 - 1), st.integers(1, 4), stops,
        st.booleans(), st.sampled_from([0, 1, 500, 2000]),
        st.sampled_from([pb.RETRIEVAL_MODE_NONE, pb.RETRIEVAL_MODE_CHUNK]),
        st.sampled_from([pb.CONTEXT_LAYOUT_PREPEND, pb.CONTEXT_LAYOUT_AFTER_PROMPT]),
        st.sampled_from([1, 2, 16]), st.sampled_from([1, 2, 1024]), st.sampled_from([1, 32, 256]),
        st.booleans(), st.booleans(), st.booleans())


@pytest.mark.parametrize("method", ["/retroserve.v1.Retroserve/Generate", "/retroserve.v1.Retroserve/GenerateStream"])
def test_fuzzed_in_bounds_generation_completes_normally(fuzz_server, channel, method):
    @settings(FUZZ_SETTINGS, max_examples=max(10, FUZZ_EXAMPLES // 2))
    @given(in_bounds_generation_requests())
    def one(request):
        code, replies, details = call_raw(channel, method, request.SerializeToString())
        assert code is OK, f"{method} answered {code.name} ({details!r}) to {request!r}"
        check_answer(method, code, replies, details, request)
        response_class = pb.GenerateResponse if method.endswith("Generate") else pb.GenerateStreamResponse
        final = response_class.FromString(replies[-1])
        assert final.generated_token_count <= request.stopping.max_new_tokens
        if request.response.return_token_ids:
            token_ids = [t for reply in replies for t in response_class.FromString(reply).token_ids]
            assert len(token_ids) == final.generated_token_count

    one()
    assert_idle(fuzz_server)


def test_temperatures_the_engine_refuses_are_refused_by_validation(fuzz_server, channel):
    """The bound was 100 while vLLM refuses more than 2: temperature 3 passed validation and the
    request failed inside the engine with INTERNAL."""
    for temperature, expected in ((2.0, OK), (2.5, INVALID), (100.0, INVALID)):
        request = pb.GenerateRequest(prompt="The assert statement", sampling=pb.SamplingParameters(
            temperature=temperature), stopping=pb.StoppingCriteria(max_new_tokens=2))
        code, _, details = call_raw(channel, "/retroserve.v1.Retroserve/Generate", request.SerializeToString())
        assert code is expected, f"temperature {temperature}: {code.name} {details}"


def test_a_stream_ended_by_a_stop_sequence_still_sends_its_last_tokens_and_retrievals(fuzz_server, channel):
    """The delta in which a stop sequence matched was dropped from the stream: its token ids (and a
    retrieval made just before it) never reached streaming clients, though generated_token_count
    and the unary reply counted them. Found by the in-bounds fuzz. (Common characters as stop
    sequences: greedy output shifts with what the prefix cache holds, so no one text is assumed.)"""
    stopped = 0
    for prompt in ("The assert statement in Python", "The with statement", "A for loop over a list"):
        request = pb.GenerateRequest(
            prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=4, stop_sequences=list(" etaos.\n")),
            retrieval=pb.RetrievalParameters(mode=pb.RETRIEVAL_MODE_CHUNK, stride=1, return_provenance=True),
            response=pb.ResponseOptions(return_token_ids=True, return_logprobs=True))
        code, replies, details = call_raw(channel, "/retroserve.v1.Retroserve/GenerateStream",
                                          request.SerializeToString())
        assert code is OK, details
        messages = [pb.GenerateStreamResponse.FromString(reply) for reply in replies]
        final = messages[-1]
        stopped += final.stop_reason == pb.STOP_REASON_STOP_SEQUENCE
        assert sum(len(m.token_ids) for m in messages) == final.generated_token_count
        assert sum(len(m.logprobs) for m in messages) == final.generated_token_count
        assert sum(len(m.retrievals) for m in messages) == final.timing.retrievals
    assert stopped, "no request ended on a stop sequence"
