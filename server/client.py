"""Python client of the retroserve.v1 API.

    with RetroserveClient("127.0.0.1:50051") as client:
        print(client.generate("The assert statement", max_new_tokens=32, mode="chunk").text)
        for delta in client.generate_stream("Explain nonlocal", stride=16, return_provenance=True):
            print(delta.text, end="", flush=True)

A server with TLS and bearer tokens (README "Security"):

    RetroserveClient("server:50051", tls_root_cert="ca.pem", token=os.environ["RETROSERVE_TOKEN"])

Add `tls_client_cert` and `tls_client_key` for a server that requires mutual TLS.

Keyword options are the API's field names, flattened (see `build_generate_request`); values left
out stay unset, so the server's defaults apply. Errors arrive as grpc.RpcError with the server's
status code and a message naming the field and its bound.

Blocking (grpc's synchronous channel): the common use is a script or a CLI. An asyncio program can
use the generated `RetroserveStub` on a grpc.aio channel with the same request builders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retroserve.v1 import admin_pb2, admin_pb2_grpc
from retroserve.v1 import retroserve_pb2 as pb
from retroserve.v1 import retroserve_pb2_grpc as pb_grpc
from retroserve.v1.names import LAYOUT_TO_PB, MODE_TO_PB, SHARD_POLICY_TO_PB
from server.api.auth import AUTHORIZATION_METADATA_KEY
from server.config import Limits
from server.core.request_context import REQUEST_ID_METADATA_KEY

DEFAULT_ADDRESS = "127.0.0.1:50051"

MODES = {None: pb.RETRIEVAL_MODE_UNSPECIFIED, **MODE_TO_PB}
LAYOUTS = {None: pb.CONTEXT_LAYOUT_UNSPECIFIED, **LAYOUT_TO_PB}
SHARD_POLICIES = {None: pb.SHARD_POLICY_UNSPECIFIED, **SHARD_POLICY_TO_PB}
"""Each request enum by name; None leaves it unspecified (the server's default)."""


def _enum(value, names: dict, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # an enum number, passed through (the server validates it)
    if value not in names:
        raise ValueError(f"{what}={value!r} must be one of {[n for n in names if n is not None]}")
    return names[value]


def build_generate_request(
    prompt: str,
    *,
    request_id: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    stop_sequences: Sequence[str] = (),
    time_limit_ms: int = 0,
    include_stop_sequence: bool = False,
    mode: str | int | None = None,
    neighbours: int | None = None,
    stride: int | None = None,
    query_tokens: int | None = None,
    layout: str | int | None = None,
    shard_policy: str | int | None = None,
    return_provenance: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    knn_lambda: float | None = None,
    knn_k: int | None = None,
    knn_temperature: float | None = None,
    knn_skip_above_prob: float | None = None,
    knn_pointer_min: int | None = None,
    keep_rank_margin: int | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; None leaves a field unset (server default).

    `mode` is "none" | "chunk" | "token" | "hybrid" (or a RetrievalMode number); `layout` is "prepend" |
    "suffix" | "after_prompt"; `shard_policy` is "partial" | "require_all". Bounds are checked by the server, not here, so one place states them.
    """
    request = pb.GenerateRequest(prompt=prompt)
    if request_id is not None:
        request.request_id = request_id
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(request.sampling, name, value)
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    request.stopping.stop_sequences.extend(stop_sequences)
    request.stopping.time_limit_ms = time_limit_ms
    request.stopping.include_stop_sequence = include_stop_sequence
    request.retrieval.mode = _enum(mode, MODES, "mode")
    request.retrieval.layout = _enum(layout, LAYOUTS, "layout")
    request.retrieval.shard_policy = _enum(shard_policy, SHARD_POLICIES, "shard_policy")
    for name, value in (("neighbours", neighbours), ("stride", stride), ("query_tokens", query_tokens),
                        ("knn_lambda", knn_lambda), ("knn_k", knn_k), ("knn_temperature", knn_temperature),
                        ("knn_skip_above_prob", knn_skip_above_prob), ("knn_pointer_min", knn_pointer_min),
                        ("keep_rank_margin", keep_rank_margin)):
        if value is not None:
            setattr(request.retrieval, name, value)
    request.retrieval.return_provenance = return_provenance
    request.response.return_token_ids = return_token_ids
    request.response.return_logprobs = return_logprobs
    return request


def build_retrieve_request(query: str, neighbours: int | None = None,
                           shard_policy: str | int | None = None) -> pb.RetrieveRequest:
    request = pb.RetrieveRequest(query=query, shard_policy=_enum(shard_policy, SHARD_POLICIES, "shard_policy"))
    if neighbours is not None:
        request.neighbours = neighbours
    return request


def _pem(value: str | Path | bytes | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_credentials(tls_root_cert=None, tls_client_cert=None, tls_client_key=None) -> grpc.ChannelCredentials:
    """TLS credentials; each argument is PEM bytes or a file path. No root certificate: the
    system's trusted CAs. Client certificate and key go together (mutual TLS)."""
    if (tls_client_cert is None) != (tls_client_key is None):
        raise ValueError("tls_client_cert and tls_client_key go together (mutual TLS needs both)")
    return grpc.ssl_channel_credentials(_pem(tls_root_cert), _pem(tls_client_key), _pem(tls_client_cert))


class RetroserveClient:
    """Blocking client; a context manager that closes its channel.

    `timeout` (seconds) is the default deadline of each call (None: no deadline); `request_id`
    is sent as `x-request-id` metadata on every call unless a call passes its own. `token` is sent
    as `authorization: Bearer TOKEN` on every call. TLS is on when `tls` is true or any tls_*
    argument is given (PEM bytes or file paths); `tls_server_name` overrides the name checked
    against the server's certificate (e.g. connecting by IP to a certificate for a host name).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = None,
        request_id: str | None = None,
        max_message_bytes: int = Limits.max_message_bytes,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_root_cert: str | Path | bytes | None = None,
        tls_client_cert: str | Path | bytes | None = None,
        tls_client_key: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
    ):
        self.address = address
        self.timeout = timeout
        self.request_id = request_id
        self.token = token
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or any(value is not None for value in (tls_root_cert, tls_client_cert, tls_client_key)):
            credentials = channel_credentials(tls_root_cert, tls_client_cert, tls_client_key)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.RetroserveStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "RetroserveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call_options(self, timeout: float | None, request_id: str | None) -> dict:
        request_id = request_id if request_id is not None else self.request_id
        metadata = []
        if request_id:
            metadata.append((REQUEST_ID_METADATA_KEY, request_id))
        if self.token:
            metadata.append((AUTHORIZATION_METADATA_KEY, f"Bearer {self.token}"))
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": tuple(metadata) or None}

    def generate(self, prompt: str, *, timeout: float | None = None, request_id: str | None = None,
                 **options) -> pb.GenerateResponse:
        """Generate and return the whole response; `options` as for build_generate_request."""
        request = build_generate_request(prompt, **options)
        return self.stub.Generate(request, **self._call_options(timeout, request_id))

    def generate_stream(self, prompt: str, *, timeout: float | None = None, request_id: str | None = None,
                        **options) -> Iterator[pb.GenerateStreamResponse]:
        """Yield stream messages as the server sends them; the last one has stop_reason set.

        Leaving the loop early (break, exception, KeyboardInterrupt) cancels the call, which
        aborts the request on the server.
        """
        request = build_generate_request(prompt, **options)
        call = self.stub.GenerateStream(request, **self._call_options(timeout, request_id))
        try:
            yield from call
        finally:
            call.cancel()

    def retrieve(self, query: str, neighbours: int | None = None, *, shard_policy: str | int | None = None,
                 timeout: float | None = None, request_id: str | None = None) -> pb.RetrieveResponse:
        request = build_retrieve_request(query, neighbours, shard_policy)
        return self.stub.Retrieve(request, **self._call_options(timeout, request_id))

    def tokenize(self, text: str, return_tokens: bool = False, *, timeout: float | None = None,
                 request_id: str | None = None) -> pb.TokenizeResponse:
        return self.stub.Tokenize(pb.TokenizeRequest(text=text, return_tokens=return_tokens),
                                  **self._call_options(timeout, request_id))

    def info(self, *, timeout: float | None = None) -> pb.InfoResponse:
        return self.stub.Info(pb.InfoRequest(), **self._call_options(timeout, None))

    def reload_datastore(self, path: str | Path | None = None, *, timeout: float | None = None
                         ) -> admin_pb2.ReloadDatastoreResponse:
        """Hot-swap the server's datastore (admin.proto); None re-reads the one serving now."""
        request = admin_pb2.ReloadDatastoreRequest(path=str(path) if path is not None else "")
        return self.admin.ReloadDatastore(request, **self._call_options(timeout, None))

    def health(self, service: str = "", *, timeout: float | None = None, wait_for_ready: bool = False) -> str:
        """The standard gRPC health status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"...

        `service` "" asks about the server as a whole; "retroserve.v1.Retroserve" about the API.
        With wait_for_ready the call waits (up to the timeout) for the server to come up instead
        of failing with UNAVAILABLE while nothing listens yet.
        """
        reply = self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=timeout if timeout is not None else self.timeout,
            wait_for_ready=wait_for_ready,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
