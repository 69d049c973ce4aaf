"""The error interceptor on a real grpc.aio server on loopback.

The servicer here is a fake that raises on purpose: these tests are about the interceptor (exception
-> status code, metrics by code, request ids, no tracebacks sent to clients), not about generation,
so no engine is involved. The real servicer is tested against the real engine elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry

from retroserve.v1 import retroserve_pb2 as pb
from retroserve.v1 import retroserve_pb2_grpc as pb_grpc
from server import errors
from server.api.errors import ErrorInterceptor
from server.observability.logging_setup import JsonFormatter, RequestIdFilter
from server.observability.metrics import Metrics
from server.core.request_context import current_request

SECRET = "secret-internal-detail-/etc/passwd"

RAISES = {
    "invalid": errors.InvalidArgument("sampling.temperature", "sampling.temperature=-1 must be in [0, 100]"),
    "overloaded": errors.Overloaded("queue full: 64 requests admitted (limits.max_queue=64)"),
    "engine-dead": errors.EngineDead("the engine died"),
    "not-ready": errors.NotReady("loading"),
    "datastore": errors.DatastoreUnavailable("no datastore"),
    "unimplemented": NotImplementedError("token mode comes later"),
    "bug": KeyError(SECRET),
}
EXPECTED = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "engine-dead": grpc.StatusCode.UNAVAILABLE,
    "not-ready": grpc.StatusCode.UNAVAILABLE,
    "datastore": grpc.StatusCode.FAILED_PRECONDITION,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "bug": grpc.StatusCode.INTERNAL,
}


class FakeServicer(pb_grpc.RetroserveServicer):
    """Raises what the prompt names; streams one message before raising; sets the mode label."""

    def __init__(self):
        self.stream_started = asyncio.Event()
        self.stream_cancelled = asyncio.Event()

    async def Generate(self, request, context):
        current_request().mode = "chunk"
        if request.prompt in RAISES:
            raise RAISES[request.prompt]
        return pb.GenerateResponse(text="ok", request_id=current_request().request_id)

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(text="first", request_id=current_request().request_id)
        if request.prompt == "hang":
            self.stream_started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.stream_cancelled.set()
                raise
        if request.prompt in RAISES:
            raise RAISES[request.prompt]
        yield pb.GenerateStreamResponse(stop_reason=pb.STOP_REASON_MAX_TOKENS)

    async def Tokenize(self, request, context):
        return pb.TokenizeResponse(token_count=len(request.text.split()))

    async def Info(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "servicer aborted by itself")

    async def Retrieve(self, request, context):
        from retriever.datastore import DatastoreError

        raise DatastoreError("manifest.json is missing; rebuild it")


class Loopback:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.metrics = Metrics(registry=self.registry)
        self.servicer = FakeServicer()

    async def __aenter__(self):
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor(self.metrics)])
        pb_grpc.add_RetroserveServicer_to_server(self.servicer, self.server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.RetroserveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(0)

    def count(self, name, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def json_log():
    """The interceptor's log lines as JSON objects (the production formatter on a test stream)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("server.api.errors")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(previous)


@pytest.mark.parametrize("trigger", list(RAISES))
def test_unary_exception_maps_to_status(trigger, json_log):
    async def scenario():
        async with Loopback() as loop:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await loop.stub.Generate(pb.GenerateRequest(prompt=trigger), metadata=(("x-request-id", f"req-{trigger}"),))
            code = EXPECTED[trigger].name
            assert loop.count("retroserve_errors_total", rpc="Generate", code=code) == 1
            assert loop.count("retroserve_requests_total", rpc="Generate", code=code) == 1
            assert loop.count("retroserve_request_duration_seconds_count", rpc="Generate", mode="chunk") == 1
            return info.value

    error = run(scenario())
    assert error.code() == EXPECTED[trigger]
    assert dict(error.trailing_metadata())["x-request-id"] == f"req-{trigger}"
    if trigger == "bug":
        assert SECRET not in error.details() and "Traceback" not in error.details()
        assert "req-bug" in error.details()
        record = next(entry for entry in json_log() if entry["level"] == "ERROR")
        assert record["request_id"] == "req-bug" and "KeyError" in record["exc"]
    else:
        assert error.details() == str(RAISES[trigger])
        assert any(entry.get("request_id") == f"req-{trigger}" for entry in json_log())


def test_stream_error_after_first_message_maps_to_status():
    async def scenario():
        async with Loopback() as loop:
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for message in loop.stub.GenerateStream(pb.GenerateRequest(prompt="overloaded")):
                    received.append(message.text)
            assert received == ["first"]
            assert loop.count("retroserve_errors_total", rpc="GenerateStream", code="RESOURCE_EXHAUSTED") == 1
            return info.value

    assert run(scenario()).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_success_counts_ok_and_echoes_request_ids():
    async def scenario():
        async with Loopback() as loop:
            call = loop.stub.Generate(pb.GenerateRequest(prompt="fine", request_id="from-field"))
            response = await call
            assert response.request_id == "from-field"
            assert dict(await call.trailing_metadata())["x-request-id"] == "from-field"
            # Metadata wins over the field.
            response = await loop.stub.Generate(
                pb.GenerateRequest(prompt="fine", request_id="from-field"), metadata=(("x-request-id", "from-metadata"),)
            )
            assert response.request_id == "from-metadata"
            # Neither: the server makes one.
            response = await loop.stub.Generate(pb.GenerateRequest(prompt="fine"))
            assert len(response.request_id) == 32
            streamed = [m async for m in loop.stub.GenerateStream(pb.GenerateRequest(prompt="fine"))]
            assert streamed[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS
            assert loop.count("retroserve_requests_total", rpc="Generate", code="OK") == 3
            assert loop.count("retroserve_requests_total", rpc="GenerateStream", code="OK") == 1
            assert loop.count("retroserve_errors_total", rpc="Generate", code="OK") == 0

    run(scenario())


def test_unprintable_request_id_is_invalid_argument():
    async def scenario():
        async with Loopback() as loop:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await loop.stub.Tokenize(pb.TokenizeRequest(text="a"), metadata=(("x-request-id", "x" * 200),))
            return info.value

    error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1..128 printable ASCII" in error.details()


def test_servicer_abort_passes_through_and_is_counted():
    async def scenario():
        async with Loopback() as loop:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await loop.stub.Info(pb.InfoRequest())
            assert loop.count("retroserve_errors_total", rpc="Info", code="PERMISSION_DENIED") == 1
            return info.value

    error = run(scenario())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "servicer aborted by itself"


def test_datastore_error_is_failed_precondition():
    pytest.importorskip("faiss")

    async def scenario():
        async with Loopback() as loop:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await loop.stub.Retrieve(pb.RetrieveRequest(query="q"))
            return info.value

    error = run(scenario())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "manifest.json is missing" in error.details()


def test_client_cancellation_cancels_the_handler_and_counts_cancelled():
    async def scenario():
        async with Loopback() as loop:
            call = loop.stub.GenerateStream(pb.GenerateRequest(prompt="hang"))
            assert (await call.read()).text == "first"
            await asyncio.wait_for(loop.servicer.stream_started.wait(), 5)
            call.cancel()
            await asyncio.wait_for(loop.servicer.stream_cancelled.wait(), 5)
            for _ in range(100):
                if loop.count("retroserve_requests_total", rpc="GenerateStream", code="CANCELLED"):
                    break
                await asyncio.sleep(0.01)
            assert loop.count("retroserve_requests_total", rpc="GenerateStream", code="CANCELLED") == 1

    run(scenario())


def test_health_and_other_services_pass_through_uncounted():
    async def scenario():
        async with Loopback() as loop:
            reply = await loop.health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            samples = [s for family in loop.registry.collect() if family.name == "retroserve_requests"
                       for s in family.samples]
            assert samples == []

    run(scenario())


def test_undecodable_requests_are_invalid_argument_after_authentication(tmp_path):
    """Bytes that do not decode as the request type: INVALID_ARGUMENT, counted, for unary and
    streaming methods (grpc alone answers UNKNOWN with the parser's exception text); a caller
    without a token still gets UNAUTHENTICATED first. The chain is app.interceptors_for's."""
    from server.api.app import interceptors_for
    from server.api.auth import BearerTokens
    from server.config import SecurityConfig, ServerConfig

    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text("good-token\n")
    config = ServerConfig(security=SecurityConfig(auth_token_file=tokens_file))

    async def scenario():
        loopback = Loopback()
        loopback.server = grpc.aio.server(
            interceptors=interceptors_for(config, loopback.metrics, BearerTokens.from_config(config.security)))
        pb_grpc.add_RetroserveServicer_to_server(loopback.servicer, loopback.server)
        port = loopback.server.add_insecure_port("127.0.0.1:0")
        await loopback.server.start()
        results = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, token in (("Tokenize", "good-token"), ("GenerateStream", "good-token"), ("Tokenize", None)):
                metadata = (("authorization", f"Bearer {token}"),) if token else ()
                path = f"/retroserve.v1.Retroserve/{method}"
                call = (channel.unary_stream if method == "GenerateStream" else channel.unary_unary)(path)
                try:
                    reply = call(b"\x0a\x02\xc3\x28", metadata=metadata, timeout=10)
                    if method == "GenerateStream":
                        [message async for message in reply]
                    else:
                        await reply
                    results.append((grpc.StatusCode.OK, ""))
                except grpc.aio.AioRpcError as error:
                    results.append((error.code(), error.details()))
            good = await channel.unary_unary("/retroserve.v1.Retroserve/Tokenize")(
                pb.TokenizeRequest(text="a b").SerializeToString(), metadata=(("authorization", "Bearer good-token"),),
                timeout=10)
        await loopback.server.stop(0)
        return results, pb.TokenizeResponse.FromString(good), loopback

    results, good, loopback = run(scenario())
    (tokenize, tokenize_details), (stream, _), (anonymous, _) = results
    assert tokenize == stream == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in tokenize_details and "Traceback" not in tokenize_details
    assert anonymous == grpc.StatusCode.UNAUTHENTICATED
    assert good.token_count == 2
    assert loopback.count("retroserve_errors_total", rpc="Tokenize", code="INVALID_ARGUMENT") == 1
