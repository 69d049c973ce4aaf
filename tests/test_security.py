"""Transport security and bearer tokens on a real server over loopback.

Servers here run on the session's vLLM engine (tests/conftest.py) without a datastore; the
certificates come from throwaway CAs (tests/certs.py). Refused TLS handshakes reach the client as
UNAVAILABLE: gRPC reports a failed connection, not a status from the server.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from certs import CertificateAuthority
from loopback import second_server, server_config
from server.api.auth import BearerTokens, TokenFileError, parse_token_file
from server.client import RetroserveClient
from server.config import SecurityConfig
from server.cli.generate import add_generate_arguments, run_generate
from server.api.tls import ReloadingCertificates, TlsSetupError

PROMPT = "The assert statement in Python"
WAIT_S = 60


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two unrelated CAs; a server certificate and a client certificate from each."""
    directory = tmp_path_factory.mktemp("pki")
    trusted, other = CertificateAuthority("retroserve test CA"), CertificateAuthority("another CA")
    files = {
        "ca": trusted.write(directory, "ca"),
        "other_ca": other.write(directory, "other-ca"),
        "client": trusted.client("client-one").write(directory, "client"),
        "other_client": other.client("stranger").write(directory, "other-client"),
    }
    files["server_cert"], files["server_key"] = trusted.server().write(directory, "server")
    files["other_server"] = other.server()
    files["trusted"] = trusted
    files["dir"] = directory
    return files


def tls_config(pki, tmp_path, mutual: bool = False) -> SecurityConfig:
    """Copies of the server certificate files in `tmp_path` (tests may rotate them)."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki["server_cert"].read_bytes())
    key.write_bytes(pki["server_key"].read_bytes())
    return SecurityConfig(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki["ca"] if mutual else None)


def health_or_code(address: str, **client_options) -> str:
    """"SERVING", or the status code name the call failed with."""
    with RetroserveClient(address, timeout=10, **client_options) as client:
        try:
            return client.health()
        except grpc.RpcError as error:
            return error.code().name


def parse_generate(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return parser.parse_args(argv)


def replace_file(path, content: bytes) -> None:
    """Write beside and rename over, as a secret mounter would."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(content)
    os.replace(staged, path)


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_clients_connect_and_plaintext_clients_cannot(server, pki, prepared_model_dir, tmp_path):
    config = server_config(prepared_model_dir, tmp_path, security=tls_config(pki, tmp_path))
    tls_server = second_server(server, config, with_datastore=False)
    try:
        address = tls_server.address
        with RetroserveClient(address, timeout=WAIT_S, tls_root_cert=pki["ca"]) as client:
            assert client.health() == "SERVING"
            assert client.generate(PROMPT, mode="none", max_new_tokens=2).generated_token_count == 2
        assert health_or_code(address) == "UNAVAILABLE"  # plaintext
        assert health_or_code(address, tls_root_cert=pki["other_ca"]) == "UNAVAILABLE"  # untrusted server
        out, err = io.StringIO(), io.StringIO()
        args = parse_generate([PROMPT, "--address", address, "--tls-ca-file", str(pki["ca"]), "--mode", "none",
                      "--max-new-tokens", "2", "--timeout", str(WAIT_S)])
        assert run_generate(args, out, err) == 0, err.getvalue()
        assert "2 tokens" in err.getvalue()
    finally:
        tls_server.stop(1)


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(server, pki, prepared_model_dir, tmp_path):
    config = server_config(prepared_model_dir, tmp_path, security=tls_config(pki, tmp_path, mutual=True),
                           max_streams_per_client=1)
    mtls_server = second_server(server, config, with_datastore=False)
    try:
        address = mtls_server.address
        client_cert, client_key = pki["client"]
        stranger_cert, stranger_key = pki["other_client"]
        assert health_or_code(address, tls_root_cert=pki["ca"], tls_client_cert=client_cert,
                              tls_client_key=client_key) == "SERVING"
        assert health_or_code(address, tls_root_cert=pki["ca"]) == "UNAVAILABLE"  # no client certificate
        assert health_or_code(address, tls_root_cert=pki["ca"], tls_client_cert=stranger_cert,
                              tls_client_key=stranger_key) == "UNAVAILABLE"  # another CA's certificate
        assert mtls_server.running.certificates.mutual
        # The per-client limit knows this client by its certificate's common name.
        with RetroserveClient(address, timeout=WAIT_S, tls_root_cert=pki["ca"], tls_client_cert=client_cert,
                              tls_client_key=client_key) as client:
            stream = client.generate_stream(PROMPT, mode="none", max_new_tokens=400)
            next(stream)
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    client.tokenize("a second call")
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "client cert:client-one" in caught.value.details()
            finally:
                stream.close()
    finally:
        mtls_server.stop(1)


def test_rotated_certificate_files_serve_new_connections_without_restart(server, pki, prepared_model_dir,
                                                                          tmp_path):
    security = tls_config(pki, tmp_path)
    tls_server = second_server(server, server_config(prepared_model_dir, tmp_path, security=security),
                               with_datastore=False)
    try:
        address = tls_server.address
        certificates = tls_server.running.certificates
        assert health_or_code(address, tls_root_cert=pki["ca"]) == "SERVING"
        rotated = pki["other_server"]  # a certificate from the other CA: clients must trust that one now
        replace_file(security.tls_key_file, rotated.key_pem)
        replace_file(security.tls_cert_file, rotated.cert_pem)
        assert health_or_code(address, tls_root_cert=pki["other_ca"]) == "SERVING"
        assert health_or_code(address, tls_root_cert=pki["ca"]) == "UNAVAILABLE"
        assert certificates.reloads == 1
        # A half-done rotation (certificate without its key) is skipped: the last good one serves on.
        replace_file(security.tls_cert_file, pki["server_cert"].read_bytes())
        assert health_or_code(address, tls_root_cert=pki["other_ca"]) == "SERVING"
        assert certificates.reloads == 1
        replace_file(security.tls_key_file, pki["server_key"].read_bytes())  # the rotation completes
        assert health_or_code(address, tls_root_cert=pki["ca"]) == "SERVING"
        assert certificates.reloads == 2
    finally:
        tls_server.stop(1)


def test_unusable_certificate_files_are_named_at_startup(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsSetupError, match="missing.pem"):
        ReloadingCertificates(missing, pki["server_key"])
    _, other_key = pki["client"]
    with pytest.raises(TlsSetupError, match="not a PEM certificate chain and its private key") as caught:
        ReloadingCertificates(pki["server_cert"], other_key)  # a key that is not the certificate's
    assert str(pki["server_cert"]) in str(caught.value) and str(other_key) in str(caught.value)
    with pytest.raises(TlsSetupError, match="--tls-client-ca-file"):
        ReloadingCertificates(pki["server_cert"], pki["server_key"], client_ca_file=pki["server_key"])


@pytest.fixture()
def cli_logging():
    """`retroserve` installs a log handler on the test's captured stderr; take it off afterwards."""
    import logging

    from server.observability import logging_setup

    yield
    if logging_setup._installed_handler is not None:
        logging.getLogger().removeHandler(logging_setup._installed_handler)
        logging_setup._installed_handler = None


def test_serve_cli_stops_on_a_bad_certificate_path_with_the_fix(prepared_model_dir, pki, tmp_path, capsys,
                                                                cli_logging):
    from server.cli import main as cli

    base = ["serve", "--model-dir", str(prepared_model_dir), "--address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0"]
    code = cli.main(base + ["--tls-cert-file", str(tmp_path / "nope.pem"), "--tls-key-file", str(pki["server_key"])])
    err = capsys.readouterr().err
    assert code == 2
    assert "nope.pem" in err and "--tls-cert-file" in err
    with pytest.raises(SystemExit, match="needs TLS"):  # a contradiction in the flags themselves
        cli.main(base + ["--tls-client-ca-file", str(pki["ca"])])
    code = cli.main(base + ["--auth-token-file", str(tmp_path / "no-tokens.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "no-tokens.txt" in err and "--auth-token-file" in err


# -- bearer tokens -----------------------------------------------------------------------------------


def test_token_file_parsing_and_refusals(tmp_path):
    assert parse_token_file("# operators\nalpha\n\n  beta  # ci\n") == ["alpha", "beta"]
    empty = tmp_path / "tokens.txt"
    empty.write_text("# nothing yet\n")
    with pytest.raises(TokenFileError, match="holds no tokens"):
        BearerTokens(empty)
    assert BearerTokens.from_config(SecurityConfig(), environ={}) is None  # authentication off
    tokens = BearerTokens.from_config(SecurityConfig(), environ={"RETROSERVE_AUTH_TOKENS": "one, two"})
    assert tokens.accepts("one") and tokens.accepts("two")
    assert not tokens.accepts("on") and not tokens.accepts("") and not tokens.accepts(None)


@pytest.fixture()
def token_server(server, prepared_model_dir, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# retroserve test tokens\nfile-token-1\nfile-token-2\n")
    monkeypatch.setenv("RETROSERVE_AUTH_TOKENS", "env-token")
    config = server_config(prepared_model_dir, tmp_path, security=SecurityConfig(auth_token_file=tokens))
    running = second_server(server, config, with_datastore=False)
    yield running, tokens
    running.stop(1)


def code_of(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def test_bearer_tokens_guard_every_rpc_but_health(token_server):
    running, _ = token_server
    address = running.address
    with RetroserveClient(address, timeout=WAIT_S) as anonymous:
        assert anonymous.health() == "SERVING"  # kubelet probes carry no token
        assert code_of(anonymous.info) == "UNAUTHENTICATED"
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.generate(PROMPT, mode="none", max_new_tokens=2)
        assert "authorization: Bearer TOKEN" in caught.value.details()
        assert code_of(anonymous.reload_datastore) == "UNAUTHENTICATED"
        reflection = reflection_pb2_grpc.ServerReflectionStub(anonymous.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        assert code_of(lambda: list(reflection.ServerReflectionInfo(iter([request]), timeout=10))) == "UNAUTHENTICATED"
    with RetroserveClient(address, timeout=WAIT_S, token="file-token-") as wrong:
        assert code_of(wrong.info) == "UNAUTHENTICATED"
    for token in ("file-token-1", "file-token-2", "env-token"):
        with RetroserveClient(address, timeout=WAIT_S, token=token) as client:
            assert client.info().limits.max_queue == 4
    with RetroserveClient(address, timeout=WAIT_S, token="env-token") as client:
        assert client.generate(PROMPT, mode="none", max_new_tokens=2).generated_token_count == 2
        assert code_of(client.reload_datastore) == "FAILED_PRECONDITION"  # authenticated; no datastore here
    body = urllib.request.urlopen(f"http://127.0.0.1:{running.running.metrics_port}/metrics", timeout=10).read()
    assert 'retroserve_errors_total{code="UNAUTHENTICATED",rpc="Info"} 2.0' in body.decode()


def test_token_file_changes_take_effect_without_restart(token_server):
    running, tokens = token_server
    replace_file(tokens, b"rotated-token\n")
    deadline = time.monotonic() + 10
    with RetroserveClient(running.address, timeout=WAIT_S, token="rotated-token") as client:
        while code_of(client.info) != "OK" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert code_of(client.info) == "OK"
    with RetroserveClient(running.address, timeout=WAIT_S, token="file-token-1") as revoked:
        assert code_of(revoked.info) == "UNAUTHENTICATED"
    replace_file(tokens, b"")  # an emptied file does not turn authentication off
    time.sleep(1.2)
    with RetroserveClient(running.address, timeout=WAIT_S) as anonymous:
        assert code_of(anonymous.info) == "UNAUTHENTICATED"
    with RetroserveClient(running.address, timeout=WAIT_S, token="rotated-token") as client:
        assert code_of(client.info) == "OK"


def test_generate_cli_sends_the_token_from_flag_or_environment(token_server, monkeypatch):
    running, _ = token_server
    argv = [PROMPT, "--address", running.address, "--mode", "none", "--max-new-tokens", "2", "--timeout", "60"]
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(parse_generate(argv), out, err) == 1
    assert "UNAUTHENTICATED" in err.getvalue() and "RETROSERVE_TOKEN" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(parse_generate(argv + ["--token", "file-token-2"]), out, err) == 0, err.getvalue()
    monkeypatch.setenv("RETROSERVE_TOKEN", "file-token-1")
    out, err = io.StringIO(), io.StringIO()
    assert run_generate(parse_generate(argv), out, err) == 0, err.getvalue()
