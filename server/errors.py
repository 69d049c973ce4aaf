"""Error taxonomy of the server: the domain exceptions its parts raise, each naming the gRPC status it becomes.

Code raises these (`raise Overloaded(...)`) and never touches status codes; the interceptor in
server/api/errors.py maps each to its status in one place. Kept beside config.py and free of
project imports, so the generation core (server/core/) raises them without importing the API layer.
"""

from __future__ import annotations

import logging

import grpc


class RetroserveError(Exception):
    """Base of the errors a client may see; `code` is the gRPC status they become."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    log_level: int = logging.ERROR
    """Client mistakes log at WARNING (not the operator's problem); server faults at ERROR."""


class InvalidArgument(RetroserveError):
    """A request field is out of bounds; the message names the field, the value and the bound."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    log_level = logging.WARNING

    def __init__(self, field_path: str, message: str):
        super().__init__(message)
        self.field_path = field_path
        self.message = message


class Overloaded(RetroserveError):
    """The admission queue is full; the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    log_level = logging.WARNING


class ClientOverLimit(Overloaded):
    """This client already holds `Limits.max_streams_per_client` calls; others may still be served."""


class NotReady(RetroserveError):
    """Still loading, or draining for shutdown: another replica (or a later retry) can serve."""

    code = grpc.StatusCode.UNAVAILABLE
    log_level = logging.WARNING


class EngineDead(RetroserveError):
    """The vLLM engine died; this replica will exit and be restarted."""

    code = grpc.StatusCode.UNAVAILABLE


class DatastoreUnavailable(RetroserveError):
    """The datastore is missing, inconsistent or of the wrong kind for the request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DatastoreRejected(RetroserveError):
    """A datastore offered for a hot swap failed verification; the previous one keeps serving."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    log_level = logging.WARNING
