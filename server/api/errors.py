"""Interceptors that turn exceptions into gRPC statuses, and refuse requests that do not decode.

Servicer code raises domain exceptions (server/errors.py: `raise Overloaded(...)`) and never touches
status codes; `ErrorInterceptor` maps each exception to its code in one place, counts RPCs and
errors by code, logs with the request id and sends the client a message without a traceback.
Unexpected exceptions become INTERNAL with a message pointing at the server log (by request id),
where the traceback is.

Install it once, when the server is built:

    server = grpc.aio.server(interceptors=[ErrorInterceptor(metrics)])

It wraps the methods of every service in the `retroserve.v1` package (health and reflection pass
through untouched, so probes do not flood the metrics).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Callable

import grpc

from server.core import request_context

HANDLER_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)
"""(attribute of a grpc.RpcMethodHandler, constructor of that kind of handler): how interceptors
rebuild a handler of the same kind around new behaviour (errors here, auth refusals)."""
from server.core.request_context import REQUEST_ID_METADATA_KEY, RequestContext
from server.errors import InvalidArgument, RetroserveError

log = logging.getLogger(__name__)

API_PACKAGE_PREFIX = "/retroserve.v1."
"""Fully-qualified method names start with this for every service the interceptor wraps."""


_FOREIGN_ERRORS = (
    ("retriever.fanout", "ShardsUnavailable", grpc.StatusCode.UNAVAILABLE),
    ("retriever.shard_service", "BadShardRequest", grpc.StatusCode.INVALID_ARGUMENT),
    ("retriever.datastore", "DatastoreError", grpc.StatusCode.FAILED_PRECONDITION),
    ("retriever.encoder", "EncoderError", grpc.StatusCode.FAILED_PRECONDITION),
)
"""Library errors and their codes: datastore shards that did not answer (UNAVAILABLE: retry
later), a bad request to a shard, and "the datastore side is not usable" (FAILED_PRECONDITION).
Looked up in sys.modules rather than imported, so this module does not pull in FAISS; an exception
of such a class can only exist if its module was imported. First match wins."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, client-safe message) for an exception raised while serving."""
    if isinstance(exc, RetroserveError):
        return exc.code, str(exc)
    for module_name, class_name, code in _FOREIGN_ERRORS:
        module = sys.modules.get(module_name)
        error_class = getattr(module, class_name, None) if module is not None else None
        if error_class is not None and isinstance(exc, error_class):
            return code, str(exc)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    return grpc.StatusCode.INTERNAL, "internal error"


def _request_id_field(request) -> str:
    """GenerateRequest.request_id (or any message's `request_id`), '' when absent or unset."""
    value = getattr(request, "request_id", "") if hasattr(request, "DESCRIPTOR") else ""
    return value if isinstance(value, str) else ""


class _Call:
    """Bookkeeping for one RPC: request id, context binding, timing, the final status."""

    def __init__(self, interceptor: "ErrorInterceptor", rpc: str, metadata_request_id: str | None):
        self.interceptor = interceptor
        self.rpc = rpc
        self.metadata_request_id = metadata_request_id
        self.started = time.perf_counter()
        self.context = RequestContext(request_context.new_request_id(), rpc)
        self.token = request_context.bind(self.context)

    def resolve_request_id(self, request, grpc_context) -> None:
        """Metadata id, else the request's own field, else the generated one; echo it in trailers.

        Raises InvalidArgument for an id that could not be logged or echoed safely; by then the
        generated id is current, so that refusal is still logged under some id.
        """
        for source, value in (
            (f"metadata {REQUEST_ID_METADATA_KEY}", self.metadata_request_id),
            ("request_id", _request_id_field(request)),
        ):
            if not value:
                continue
            if not request_context.is_valid_request_id(value):
                raise InvalidArgument(
                    source,
                    f"{source} must be 1..{request_context.MAX_REQUEST_ID_CHARS} printable ASCII "
                    f"characters (got {len(value)} characters)",
                )
            self.context.request_id = value
            break
        grpc_context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, self.context.request_id),))

    async def fail(self, exc: Exception, grpc_context) -> None:
        """Log `exc`, record its code, and abort the RPC with a client-safe message (raises)."""
        code, message = status_for(exc)
        request_id = self.context.request_id
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", self.rpc, type(exc).__name__, exc_info=exc,
                      extra={"rpc": self.rpc, "code": code.name})
            message = f"internal error; the server log has details under request id {request_id}"
        else:
            level = exc.log_level if isinstance(exc, RetroserveError) else logging.ERROR
            log.log(level, "%s refused: %s: %s", self.rpc, code.name, message,
                    extra={"rpc": self.rpc, "code": code.name})
        self.finish(code)
        await grpc_context.abort(code, message,
                                 trailing_metadata=((REQUEST_ID_METADATA_KEY, request_id),))

    def finish(self, code: grpc.StatusCode) -> None:
        """Record the outcome once; later calls (e.g. after abort re-raises) do nothing."""
        if self.token is None:
            return
        seconds = time.perf_counter() - self.started
        metrics = self.interceptor.metrics
        if metrics is not None:
            metrics.observe_rpc(self.rpc, self.context.mode, code.name, seconds)
        if code is grpc.StatusCode.OK:
            log.info("%s ok in %.1f ms", self.rpc, seconds * 1000,
                     extra={"rpc": self.rpc, "code": code.name, "duration_ms": round(seconds * 1000, 3)})
        request_context.unbind(self.token)
        self.token = None

    def finish_interrupted(self, grpc_context, exc: BaseException) -> None:
        """The handler ended by cancellation or by an abort the servicer itself called."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
            log.info("%s cancelled by the client", self.rpc, extra={"rpc": self.rpc, "code": code.name})
        else:
            code = _code_of(grpc_context) or grpc.StatusCode.UNKNOWN
        self.finish(code)


def _code_of(grpc_context) -> grpc.StatusCode | None:
    try:
        return grpc_context.code()
    except Exception:  # older grpc.aio contexts have no code(); the metric then says UNKNOWN
        return None


_PASS_THROUGH = (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError)
"""Already a status (abort) or not ours to answer (cancellation): record and re-raise."""


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes, counts RPCs by code, logs with the request id.

    `metrics` is a server.observability.metrics.Metrics (or anything with `observe_rpc(rpc, mode, code, seconds)`),
    or None to skip counting.
    """

    def __init__(self, metrics=None, package_prefix: str = API_PACKAGE_PREFIX):
        self.metrics = metrics
        self.package_prefix = package_prefix

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self.package_prefix):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        metadata = dict(handler_call_details.invocation_metadata or ())
        metadata_request_id = metadata.get(REQUEST_ID_METADATA_KEY)
        if isinstance(metadata_request_id, bytes):
            metadata_request_id = metadata_request_id.decode("ascii", "replace")

        def wrap(behavior: Callable) -> Callable:
            if inspect.isasyncgenfunction(behavior):
                return self._wrap_stream(behavior, rpc, metadata_request_id)
            return self._wrap_coroutine(behavior, rpc, metadata_request_id)

        for attribute, make_handler in HANDLER_KINDS:
            behavior = getattr(handler, attribute)
            if behavior is not None:
                return make_handler(
                    wrap(behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _wrap_coroutine(self, behavior, rpc, metadata_request_id):
        async def wrapped(request, grpc_context):
            call = _Call(self, rpc, metadata_request_id)
            try:
                call.resolve_request_id(request, grpc_context)
                response = await behavior(request, grpc_context)
            except _PASS_THROUGH as exc:
                call.finish_interrupted(grpc_context, exc)
                raise
            except Exception as exc:
                await call.fail(exc, grpc_context)
                raise  # unreachable: abort raises
            finally:
                call.finish(_code_of(grpc_context) or grpc.StatusCode.OK)
            return response

        return wrapped

    def _wrap_stream(self, behavior, rpc, metadata_request_id):
        async def wrapped(request, grpc_context):
            call = _Call(self, rpc, metadata_request_id)
            try:
                call.resolve_request_id(request, grpc_context)
                async for response in behavior(request, grpc_context):
                    yield response
            except _PASS_THROUGH as exc:
                call.finish_interrupted(grpc_context, exc)
                raise
            except Exception as exc:
                await call.fail(exc, grpc_context)
                raise
            finally:
                call.finish(_code_of(grpc_context) or grpc.StatusCode.OK)

        return wrapped


class _Undecodable:
    """Stands in for a request whose bytes did not decode, so a handler can refuse it."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # protobuf's DecodeError, or whatever a parser raises
            return _Undecodable(error)

    return deserialize


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Refuses requests whose bytes do not decode with INVALID_ARGUMENT.

    Without it grpc answers a failing deserializer with INTERNAL before any of our code runs
    (neither logged nor counted), though the fault is the client's. Install it innermost: the
    tolerant deserializer it installs is what the outer interceptors pass on, and its refusal
    runs only for calls that authentication and the per-client bound let through, so an
    unauthenticated client still gets UNAUTHENTICATED. The InvalidArgument it raises reaches
    ErrorInterceptor like any servicer error. Only single-request methods (all of the API's)
    are guarded."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not (handler_call_details.method or "").startswith(API_PACKAGE_PREFIX):
            return handler
        if handler.request_deserializer is None or not (handler.unary_unary or handler.unary_stream):
            return handler

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request, context):
                _refuse_undecodable(request)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_tolerant(handler.request_deserializer),
                                                       response_serializer=handler.response_serializer)
        behavior = handler.unary_stream

        async def stream(request, context):
            _refuse_undecodable(request)
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=_tolerant(handler.request_deserializer),
                                                    response_serializer=handler.response_serializer)


def _refuse_undecodable(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", f"the request message could not be decoded ({request.error}); "
                                         "send a message of the method's request type")
