"""The request being served, visible to logs and metrics without passing it through every call.

The error interceptor (server/api/errors.py) binds a RequestContext for the duration of each RPC; the
servicer fills in what only it learns (the retrieval mode, after validation); the JSON log
formatter (server/observability/logging_setup.py) stamps every record with its request id. A ContextVar follows
the asyncio task, so concurrent requests never see each other's context.
"""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass

REQUEST_ID_METADATA_KEY = "x-request-id"
"""gRPC metadata key a client may set to choose the request id; the server echoes it in trailers."""
MAX_REQUEST_ID_CHARS = 128


@dataclass
class RequestContext:
    request_id: str
    rpc: str
    """RPC method name, e.g. "Generate"."""
    mode: str = "none"
    """Retrieval mode the request runs with (one of config.RETRIEVAL_MODES); a metrics label."""


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "retroserve_request", default=None
)


def current_request() -> RequestContext | None:
    return _current.get()


def current_request_id() -> str | None:
    context = _current.get()
    return None if context is None else context.request_id


def bind(context: RequestContext) -> contextvars.Token:
    """Make `context` current; pass the token to `unbind` when the request ends."""
    return _current.set(context)


def unbind(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:
        # An async generator finalized from another context (e.g. by the garbage collector):
        # that context is not ours to reset, and this one never saw the binding.
        pass


def new_request_id() -> str:
    return uuid.uuid4().hex


def is_valid_request_id(value: str) -> bool:
    """1..128 printable ASCII characters: safe to log and to send back as gRPC metadata."""
    return 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable()
