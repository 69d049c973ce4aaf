"""TLS and mutual TLS for the gRPC port, with certificates re-read when their files change.

gRPC asks `ReloadingCertificates.fetch` before every TLS handshake
(`grpc.dynamic_ssl_server_credentials`); it answers None while the files are unchanged (a few
`stat` calls), and a new certificate configuration once they change, so rotated certificates
(cert-manager, a Kubernetes Secret update) serve new connections without a restart. Connections
already open keep the certificate they started with until they close (the server ends every
connection after `grpc.max_connection_age_ms`).

Files are checked with the standard library's `ssl` before gRPC sees them: at startup a bad file
is an error naming it and the fix; later, a half-written rotation (a new certificate beside the
old key) is logged and skipped, and the previous certificate keeps serving until the files agree.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.config import SecurityConfig

log = logging.getLogger(__name__)


class TlsSetupError(RuntimeError):
    """A certificate, key or CA file is missing or unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class _Material:
    """The bytes of one consistent set of files, and what identifies that version on disk."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    stamps: tuple


def _stamp(path: Path) -> tuple:
    """What changes when a file is rewritten or its symlink repointed (inode, size, mtime)."""
    status = os.stat(path)
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsSetupError(
            f"cannot read the {what} {path} ({error.strerror}); fix the path or permissions given to {flag}"
        ) from error


class ReloadingCertificates:
    """The server's certificate, key and (for mutual TLS) client CA, read again when they change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = None if client_ca_file is None else Path(client_ca_file)
        self._lock = threading.Lock()
        self._current = self._load()
        self._refused_stamps: tuple | None = None
        self.reloads = 0
        """Times a changed set of files was handed to gRPC (tests and logs)."""

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def _paths(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.mutual else ())

    def _stamps(self) -> tuple:
        return tuple(_stamp(path) for path in self._paths())

    def _load(self) -> _Material:
        """Read and check the files; raises TlsSetupError naming the file at fault."""
        try:
            before = self._stamps()
        except OSError as error:
            raise TlsSetupError(
                f"TLS file {error.filename} is missing ({error.strerror}); fix the path given to "
                "--tls-cert-file / --tls-key-file / --tls-client-ca-file"
            ) from error
        cert = _read(self.cert_file, "TLS certificate", "--tls-cert-file")
        key = _read(self.key_file, "TLS private key", "--tls-key-file")
        client_ca = _read(self.client_ca_file, "client CA", "--tls-client-ca-file") if self.mutual else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as error:
            raise TlsSetupError(
                f"{self.cert_file} and {self.key_file} are not a PEM certificate chain and its "
                f"private key ({error.reason or error}); give --tls-cert-file the server certificate "
                "(then any intermediates) and --tls-key-file its unencrypted key"
            ) from error
        if self.mutual:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except ssl.SSLError as error:
                raise TlsSetupError(
                    f"{self.client_ca_file} holds no PEM CA certificate ({error.reason or error}); give "
                    "--tls-client-ca-file the CA that signs client certificates"
                ) from error
        if self._stamps() != before:
            raise TlsSetupError("TLS files changed while they were read; try again")
        return _Material(cert, key, client_ca, before)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        material = self._current
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.client_ca
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: a new configuration when the files changed, else None."""
        with self._lock:
            try:
                stamps = self._stamps()
            except OSError as error:
                self._refuse(("missing", error.filename), f"TLS file {error.filename} is missing ({error.strerror})")
                return None
            if stamps == self._current.stamps or stamps == self._refused_stamps:
                return None
            try:
                self._current = self._load()
            except TlsSetupError as error:
                self._refuse(stamps, str(error))
                return None
            self._refused_stamps = None
            self.reloads += 1
            log.info("TLS certificate files changed: new connections use the new certificate (%s)",
                     self.cert_file)
            return self.configuration()

    def _refuse(self, stamps: tuple, reason: str) -> None:
        """Log a bad rotation once per version of the files; the previous certificate keeps serving."""
        if stamps != self._refused_stamps:
            log.error("%s; still serving the previous certificate", reason)
        self._refused_stamps = stamps

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(), self.fetch, require_client_authentication=self.mutual
        )


def certificates_for(security: SecurityConfig) -> ReloadingCertificates | None:
    """The server's certificates when TLS is configured (checked now), else None (plaintext)."""
    if not security.tls:
        return None
    return ReloadingCertificates(security.tls_cert_file, security.tls_key_file, security.tls_client_ca_file)
