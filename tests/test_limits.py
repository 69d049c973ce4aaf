"""Limits that protect the process, on a real server over loopback: per-client concurrent calls,
message size, the default time limit, and Info reporting them.

Prompt-token and new-token bounds are exercised in tests/test_server.py and test_validation.py.
"""

from __future__ import annotations

import grpc
import pytest

from loopback import second_server, server_config
from retroserve.v1 import retroserve_pb2 as pb
from server.client import RetroserveClient
from server.config import SecurityConfig

PROMPT = "The assert statement in Python"
WAIT_S = 60
MESSAGE_BYTES = 64 * 1024
TIME_LIMIT_S = 1.0


@pytest.fixture(scope="module")
def limited(server, prepared_model_dir, tmp_path_factory):
    """A server that checks tokens and bounds each client to 2 calls at once."""
    directory = tmp_path_factory.mktemp("limited")
    tokens = directory / "tokens.txt"
    tokens.write_text("alice\nbob\n")
    config = server_config(prepared_model_dir, directory, security=SecurityConfig(auth_token_file=tokens),
                           max_queue=8, max_streams_per_client=2, max_message_bytes=MESSAGE_BYTES)
    running = second_server(server, config, with_datastore=False)
    yield running
    running.stop(1)


@pytest.fixture(scope="module")
def short_time_limit(server, prepared_model_dir, tmp_path_factory):
    config = server_config(prepared_model_dir, tmp_path_factory.mktemp("short"), max_time_limit_s=TIME_LIMIT_S)
    running = second_server(server, config, with_datastore=False)
    yield running
    running.stop(1)


@pytest.fixture(scope="module")
def by_address(server, prepared_model_dir, tmp_path_factory):
    """A server without tokens: clients are told apart by address (all of ours share 127.0.0.1)."""
    config = server_config(prepared_model_dir, tmp_path_factory.mktemp("by-address"), max_queue=8,
                           max_streams_per_client=1)
    running = second_server(server, config, with_datastore=False)
    yield running
    running.stop(1)


def open_streams(client: RetroserveClient, count: int) -> list:
    """`count` long generations, each past its first message (admitted and decoding); close()
    cancels one."""
    streams = []
    for _ in range(count):
        stream = client.generate_stream(PROMPT, mode="none", max_new_tokens=400)
        next(stream)
        streams.append(stream)
    return streams


def test_info_reports_the_limits(limited):
    with RetroserveClient(limited.address, timeout=WAIT_S, token="alice") as client:
        limits = client.info().limits
    assert limits.max_streams_per_client == 2
    assert limits.max_message_bytes == MESSAGE_BYTES
    assert limits.max_time_limit_s == 600.0
    assert (limits.max_prompt_tokens, limits.max_new_tokens, limits.max_queue) == (1024, 512, 8)


def test_a_client_beyond_its_stream_limit_gets_resource_exhausted(limited):
    with RetroserveClient(limited.address, timeout=WAIT_S, token="alice") as alice, \
            RetroserveClient(limited.address, timeout=WAIT_S, token="bob") as bob:
        streams = open_streams(alice, 2)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                alice.tokenize("one more call")
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_client=2" in caught.value.details()
            assert bob.tokenize("another client").token_count > 0  # bob has his own budget
            assert alice.health() == "SERVING"  # health is not counted
        finally:
            for stream in streams:
                stream.close()
        assert alice.tokenize("after the streams ended").token_count > 0


def test_clients_without_checked_tokens_are_told_apart_by_address(by_address):
    with RetroserveClient(by_address.address, timeout=WAIT_S) as first, \
            RetroserveClient(by_address.address, timeout=WAIT_S, token="made-up") as second:
        streams = open_streams(first, 1)
        try:
            with pytest.raises(grpc.RpcError) as caught:  # an unchecked token does not make a new client
                second.tokenize("same address")
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "peer:127.0.0.1" in caught.value.details()
        finally:
            for stream in streams:
                stream.close()


def test_messages_beyond_the_size_limit_are_refused(limited):
    with RetroserveClient(limited.address, timeout=WAIT_S, token="alice") as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.tokenize("x" * (MESSAGE_BYTES + 1))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.tokenize("x" * 1000).token_count > 0


def test_requests_without_a_time_limit_get_the_servers(short_time_limit):
    with RetroserveClient(short_time_limit.address, timeout=WAIT_S) as client:
        assert client.info().limits.max_time_limit_s == TIME_LIMIT_S
        reply = client.generate(PROMPT, mode="none", max_new_tokens=500)
    assert reply.stop_reason == pb.STOP_REASON_TIME_LIMIT
    assert reply.generated_token_count < 500
    assert reply.timing.total_ms < (TIME_LIMIT_S + 5) * 1000
