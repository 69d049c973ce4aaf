"""`retroserve generate "prompt"`: try the server in one line.

Streams the text to the terminal as it is generated, then (with --provenance) lists which
documents each retrieval brought in and the output span they informed, then a one-line summary on
stderr. `--json` prints the unary response as JSON instead, for scripts.

The entry point (server/cli/main.py) wires it in:

    sub = subparsers.add_parser("generate", help=...)
    add_generate_arguments(sub)
    ... return run_generate(args)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import grpc
from google.protobuf import json_format

from retroserve.v1 import retroserve_pb2 as pb
from server.api.auth import CLIENT_TOKEN_ENV, client_token_from_environment
from server.client import DEFAULT_ADDRESS, LAYOUTS, MODES, RetroserveClient

EXIT_RPC_ERROR = 1
EXIT_INTERRUPTED = 130
SNIPPET_CHARS = 100


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to continue (no chat template is applied)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print the whole response as JSON (unary call, no streaming)")
    parser.add_argument("--max-new-tokens", type=int, help="most tokens to generate (server default if unset)")
    parser.add_argument("--temperature", type=float, help="0 or unset: greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop sequence (repeat for several)")
    parser.add_argument("--time-limit-ms", type=int, default=0, help="0: none")
    parser.add_argument("--mode", choices=[name for name in MODES if name is not None],
                        help="retrieval mode (server default if unset)")
    parser.add_argument("--k", "--neighbours", dest="neighbours", type=int, help="neighbours per retrieval")
    parser.add_argument("--stride", type=int, help="generated tokens between retrievals")
    parser.add_argument("--query-tokens", type=int, help="latest tokens that form a retrieval query")
    parser.add_argument("--layout", choices=[name for name in LAYOUTS if name is not None])
    parser.add_argument("--provenance", action="store_true",
                        help="show the documents each retrieval brought in and the span they informed")
    parser.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    parser.add_argument("--request-id", help="sent as x-request-id (appears in the server log)")
    security = parser.add_argument_group("security (servers with TLS or bearer tokens)")
    security.add_argument("--token", default=None,
                          help=f"bearer token to send (default: ${CLIENT_TOKEN_ENV}; the variable keeps it out "
                               "of the process list)")
    security.add_argument("--tls", action="store_true",
                          help="connect with TLS, trusting the system's CAs (implied by the --tls-* files)")
    security.add_argument("--tls-ca-file", type=Path, help="PEM CA certificate(s) to trust for the server")
    security.add_argument("--tls-cert-file", type=Path, help="PEM client certificate (mutual TLS)")
    security.add_argument("--tls-key-file", type=Path, help="PEM private key of --tls-cert-file")
    security.add_argument("--tls-server-name",
                          help="name to check the server certificate against, when it differs from --address")


def request_options(args: argparse.Namespace) -> dict:
    """Keyword options for RetroserveClient.generate* from parsed arguments."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop_sequences": args.stop,
        "time_limit_ms": args.time_limit_ms,
        "mode": args.mode,
        "neighbours": args.neighbours,
        "stride": args.stride,
        "query_tokens": args.query_tokens,
        "layout": args.layout,
        "return_provenance": args.provenance,
    }


def client_security(args: argparse.Namespace) -> dict:
    """RetroserveClient keyword arguments for the token and TLS flags."""
    return {
        "token": getattr(args, "token", None) or client_token_from_environment(),
        "tls": getattr(args, "tls", False),
        "tls_root_cert": getattr(args, "tls_ca_file", None),
        "tls_client_cert": getattr(args, "tls_cert_file", None),
        "tls_client_key": getattr(args, "tls_key_file", None),
        "tls_server_name": getattr(args, "tls_server_name", None),
    }


def run_generate(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one generation against a server; returns the process exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        client = RetroserveClient(args.address, timeout=args.timeout, request_id=args.request_id,
                                  **client_security(args))
    except (OSError, ValueError) as error:
        err.write(f"error: {error}\n")
        return EXIT_RPC_ERROR
    with client:
        try:
            if args.json:
                response = client.generate(args.prompt, **request_options(args))
                out.write(json_format.MessageToJson(response, preserving_proto_field_name=True) + "\n")
                return 0
            return _stream(client, args, out, err)
        except grpc.RpcError as error:
            err.write(f"error: {_describe(error, args.address)}\n")
            return EXIT_RPC_ERROR
        except KeyboardInterrupt:
            err.write("\ninterrupted; the request was cancelled\n")
            return EXIT_INTERRUPTED


def _stream(client: RetroserveClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    retrievals: list[pb.Retrieval] = []
    final = None
    for message in client.generate_stream(args.prompt, **request_options(args)):
        retrievals.extend(message.retrievals)
        if message.text:
            out.write(message.text)
            out.flush()
        if message.stop_reason != pb.STOP_REASON_UNSPECIFIED:
            final = message
    out.write("\n")
    if args.provenance:
        out.write(format_provenance(retrievals, final.generated_token_count if final else 0))
    if final is not None:
        err.write(format_summary(final) + "\n")
    return 0


def format_provenance(retrievals: list[pb.Retrieval], generated_token_count: int) -> str:
    """A readable list of retrievals, closing the spans a stream leaves open (see Retrieval)."""
    if not retrievals:
        return "--- provenance: no retrievals ---\n"
    lines = [f"--- provenance: {len(retrievals)} retrieval{'s' if len(retrievals) != 1 else ''} ---"]
    for index, retrieval in enumerate(retrievals):
        end = retrieval.end_token
        if end <= retrieval.start_token:
            end = retrievals[index + 1].start_token if index + 1 < len(retrievals) else generated_token_count
        lines.append(f"[{index + 1}] output tokens [{retrieval.start_token}, {end}) "
                     f"query {_snippet(retrieval.query_text)!r}")
        for neighbour in retrieval.neighbours:
            label = neighbour.title or neighbour.source
            lines.append(f"    {neighbour.score:6.3f}  doc {neighbour.doc_id} chunk {neighbour.chunk_id}  "
                         f"{label}: {_snippet(neighbour.text)!r}")
    return "\n".join(lines) + "\n"


def format_summary(final: pb.GenerateStreamResponse) -> str:
    reason = pb.StopReason.Name(final.stop_reason).removeprefix("STOP_REASON_").lower()
    parts = [
        f"{final.generated_token_count} tokens",
        f"stop: {reason}" + (f" ({final.stop_sequence!r})" if final.stop_sequence else ""),
        f"ttft {final.timing.ttft_ms:.0f} ms",
        f"total {final.timing.total_ms:.0f} ms",
    ]
    if final.timing.retrievals:
        parts.append(f"{final.timing.retrievals} retrievals ({final.timing.retrieval_ms:.0f} ms)")
    if final.HasField("seed"):
        parts.append(f"seed {final.seed}")
    parts.append(f"request {final.request_id}")
    return "; ".join(parts)


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…"


def _describe(error: grpc.RpcError, address: str) -> str:
    code = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or not details):
        return (f"UNAVAILABLE: no server answered at {address}; is `retroserve serve` running? If it "
                f"serves TLS, pass --tls-ca-file (or --tls). ({details})")
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return f"UNAUTHENTICATED: {details}; pass --token or set ${CLIENT_TOKEN_ENV}"
    return f"{code.name}: {details}"
