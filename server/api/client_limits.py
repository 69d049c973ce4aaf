"""At most `Limits.max_streams_per_client` concurrent Retroserve calls per client.

`max_queue` bounds the whole server; this bound keeps one client (a runaway batch job, a retry
loop) from taking every admission slot. A client is named by the most specific identity the server
has verified: its bearer token (by digest, never the token itself) when the server checks tokens,
else the common name of its TLS client certificate (mutual TLS), else its IP address. An unchecked
token names nobody: a client could otherwise dodge the bound by sending a new one per call. Behind
a proxy every client shares the proxy's address, which is why the bound is off (0) unless
configured.

A call beyond the bound fails at once with RESOURCE_EXHAUSTED naming the limit; the interceptor
raises a domain error, so server.api.errors.ErrorInterceptor (installed before it) logs and counts it.
"""

from __future__ import annotations

import inspect
from collections import Counter

import grpc

from server.api.auth import bearer_token, token_identity
from server.errors import ClientOverLimit

LIMITED_METHOD_PREFIX = "/retroserve.v1.Retroserve/"
"""The data-plane service; health, reflection and Admin are not counted."""


def client_identity(metadata: dict, context, tokens_checked: bool) -> str:
    """"token:<digest>", "cert:<common name>" or "peer:<ip>" for one call."""
    token = bearer_token(metadata) if tokens_checked else None
    if token is not None:
        return token_identity(token)
    common_names = (context.auth_context() or {}).get("x509_common_name")
    if common_names:
        return "cert:" + common_names[0].decode("utf-8", "replace")
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rsplit(":", 1)[0]  # drop the port: one client, many connections
    return "peer:" + address


class ClientStreamLimiter(grpc.aio.ServerInterceptor):
    """Counts calls in progress per client identity and refuses those beyond `limit`."""

    def __init__(self, limit: int, tokens_checked: bool):
        """`tokens_checked`: a BearerTokenInterceptor runs before this one (tokens are verified)."""
        if limit < 1:
            raise ValueError(f"{limit=} must be >= 1 (leave the interceptor out for no bound)")
        self.limit = limit
        self.tokens_checked = tokens_checked
        self.in_progress: Counter[str] = Counter()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(LIMITED_METHOD_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _enter(self, metadata: dict, context) -> str:
        identity = client_identity(metadata, context, self.tokens_checked)
        if self.in_progress[identity] >= self.limit:
            raise ClientOverLimit(
                f"client {identity} already has {self.in_progress[identity]} calls in progress, the "
                f"most this server allows one client (max_streams_per_client={self.limit}); wait "
                "for one to finish"
            )
        self.in_progress[identity] += 1
        return identity

    def _leave(self, identity: str) -> None:
        self.in_progress[identity] -= 1
        if self.in_progress[identity] <= 0:
            del self.in_progress[identity]

    def _wrap_unary(self, behavior, metadata):
        async def limited(request, context):
            identity = self._enter(metadata, context)
            try:
                return await behavior(request, context)
            finally:
                self._leave(identity)

        return limited

    def _wrap_stream(self, behavior, metadata):
        async def limited(request, context):
            identity = self._enter(metadata, context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self._leave(identity)

        return limited
