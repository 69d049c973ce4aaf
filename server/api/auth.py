"""Bearer-token authentication: the tokens a server accepts, and the interceptor that checks them.

Tokens come from `--auth-token-file` (one per line) and/or the RETROSERVE_AUTH_TOKENS environment
variable (comma or whitespace separated); with none configured, authentication is off. Every RPC
must then carry `authorization: Bearer TOKEN` metadata, or it fails with UNAUTHENTICATED, except
the standard health service, which kubelet probes call without credentials.

Only SHA-256 digests of the tokens are kept, and a presented token is compared with every one of
them by `hmac.compare_digest` on equal-length digests, so the time a refusal takes says nothing
about how much of a token was right. The token file is read again when it changes (checked at
most once a second), so tokens rotate without a restart; a file that becomes empty or unreadable
is logged and the previous tokens stay in force (authentication never silently turns off).

The environment variables retroserve's auth reads are named here and read nowhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

from server.config import SecurityConfig
from server.api.errors import HANDLER_KINDS

log = logging.getLogger(__name__)

SERVER_TOKENS_ENV = "RETROSERVE_AUTH_TOKENS"
"""Server side: tokens accepted, comma or whitespace separated (in addition to the token file)."""
CLIENT_TOKEN_ENV = "RETROSERVE_TOKEN"
"""Client side (`retroserve generate`, RetroserveClient): the token to send."""
AUTHORIZATION_METADATA_KEY = "authorization"
BEARER_PREFIX = "bearer "
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods callable without a token: health checks (kubelet's gRPC probes send no metadata)."""
FILE_CHECK_INTERVAL_S = 1.0


class TokenFileError(RuntimeError):
    """The token file is missing, unreadable or empty; the message names the file and the fix."""


def client_token_from_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """The token a client sends when none is given explicitly (RETROSERVE_TOKEN)."""
    return environ.get(CLIENT_TOKEN_ENV, "").strip() or None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_token_file(text: str) -> list[str]:
    """One token per line; blank lines and '#' comments are skipped."""
    tokens = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tokens.append(line)
    return tokens


def parse_token_list(value: str) -> list[str]:
    return [token for token in value.replace(",", " ").split() if token]


def bearer_token(metadata: Mapping[str, str | bytes]) -> str | None:
    """The token of an `authorization: Bearer TOKEN` header (scheme case-insensitive), else None."""
    value = metadata.get(AUTHORIZATION_METADATA_KEY)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value or not value.lower().startswith(BEARER_PREFIX):
        return None
    return value[len(BEARER_PREFIX):].strip() or None


def token_identity(token: str) -> str:
    """A name for a token in logs and per-client limits that does not reveal the token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class BearerTokens:
    """The accepted tokens (as digests); the file's are re-read when it changes."""

    def __init__(self, file: Path | None = None, fixed_tokens: list[str] = ()):
        self.file = None if file is None else Path(file)
        self._fixed = [_digest(token) for token in fixed_tokens]
        self._from_file: list[bytes] = []
        self._file_stamp = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if self.file is not None:
            self._from_file = self._read_file()
        if not self._fixed and not self._from_file:
            raise TokenFileError("no bearer tokens configured")

    @classmethod
    def from_config(cls, security: SecurityConfig, environ: Mapping[str, str] = os.environ) -> "BearerTokens | None":
        """The tokens of `--auth-token-file` and RETROSERVE_AUTH_TOKENS, or None when neither is set."""
        fixed = parse_token_list(environ.get(SERVER_TOKENS_ENV, ""))
        if security.auth_token_file is None and not fixed:
            return None
        return cls(security.auth_token_file, fixed)

    def _stamp(self) -> tuple:
        status = os.stat(self.file)
        return (status.st_ino, status.st_size, status.st_mtime_ns)

    def _read_file(self) -> list[bytes]:
        try:
            stamp = self._stamp()
            tokens = parse_token_file(self.file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise TokenFileError(
                f"cannot read the token file {self.file} ({reason}); fix the path given to "
                "--auth-token-file (one token per line)"
            ) from error
        if not tokens:
            raise TokenFileError(
                f"the token file {self.file} holds no tokens; write one token per line, or drop "
                "--auth-token-file to serve without authentication"
            )
        self._file_stamp = stamp
        return [_digest(token) for token in tokens]

    def _refresh(self) -> None:
        """Re-read the file if it changed since the last look (at most once a second)."""
        now = time.monotonic()
        if self.file is None or now - self._checked_at < FILE_CHECK_INTERVAL_S:
            return
        with self._lock:
            self._checked_at = now
            try:
                changed = self._stamp() != self._file_stamp
            except OSError:
                changed = True
            if not changed:
                return
            try:
                self._from_file = self._read_file()
                log.info("token file %s changed: %d tokens now accepted", self.file, len(self._from_file))
            except TokenFileError as error:
                self._file_stamp = None  # look again next time
                log.error("%s; the previous tokens stay in force", error)

    def accepts(self, token: str | None) -> bool:
        """Whether `token` is one of the accepted tokens, compared in constant time."""
        if not token:
            return False
        self._refresh()
        presented = _digest(token)
        matched = False
        for known in self._fixed + self._from_file:
            matched |= hmac.compare_digest(presented, known)
        return matched


def _refusal_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails the call with UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    for attribute, make_handler in HANDLER_KINDS:
        if getattr(handler, attribute) is not None:
            return make_handler(refuse, request_deserializer=handler.request_deserializer,
                                response_serializer=handler.response_serializer)
    return handler


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Fails every call without an accepted bearer token with UNAUTHENTICATED (health excepted).

    Install it after server.api.errors.ErrorInterceptor, so refusals are counted in the RPC metrics."""

    def __init__(self, tokens: BearerTokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_token(dict(handler_call_details.invocation_metadata or ()))
        if self.tokens.accepts(token):
            return handler
        reason = "no bearer token" if token is None else "a bearer token this server does not accept"
        log.warning("%s refused: %s", method, reason)
        return _refusal_handler(
            handler,
            f"this server requires `authorization: Bearer TOKEN` metadata; the call carried {reason}",
        )
