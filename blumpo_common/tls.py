"""Mutual TLS between the services: settings, server and channel credentials, rotation.

With TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE a server accepts only callers whose
certificate chains to the CA bundle, and serves its own certificate; the generation
service presents the same certificate to the token service and verifies it against the
bundle. Rotation: SIGHUP re-reads the three files; gRPC's certificate fetcher hands the new
ones to each connection made from then on, while connections and calls already open go on;
the generation service's client opens a new channel for calls made from then on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from blumpo_common.config import ConfigError, is_development

SETTINGS = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass(frozen=True)
class Material:
    """The three files' contents, checked to be PEM of the right kind."""

    cert: bytes
    key: bytes
    ca: bytes


def load(env: Mapping[str, str]) -> TlsConfig | None:
    """The TLS settings; None (plaintext) only in development. All three or none."""
    given = {name: env.get(name, "").strip() for name in SETTINGS}
    missing = [name for name, value in given.items() if not value]
    if len(missing) == len(SETTINGS):
        if is_development(env):
            return None
        raise ConfigError(
            "TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE are not set: outside development callers "
            "must use mutual TLS (set BLUMPO_ENV=development to serve plaintext)"
        )
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set: TLS needs TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE")
    config = TlsConfig(*(Path(given[name]) for name in SETTINGS))
    read(config)  # a file that is missing or not PEM stops start-up, not the first handshake
    return config


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting} {path} cannot be read: {exc.strerror}") from None


def read(config: TlsConfig) -> Material:
    """The files' contents; ConfigError naming the setting whose file is unreadable or not PEM
    (never quoting a key)."""
    cert, key, ca = (
        _read(config.cert_file, "TLS_CERT_FILE"),
        _read(config.key_file, "TLS_KEY_FILE"),
        _read(config.ca_file, "TLS_CA_FILE"),
    )
    for data, setting, path in ((cert, "TLS_CERT_FILE", config.cert_file), (ca, "TLS_CA_FILE", config.ca_file)):
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(f"{setting} {path} holds no PEM certificate") from None
    try:
        load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"TLS_KEY_FILE {config.key_file} holds no unencrypted PEM private key") from None
    return Material(cert, key, ca)


def _certificate_configuration(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], root_certificates=material.ca)


class ServerCertificates:
    """A server's certificate and CA bundle, replaced on reload() for connections made after it."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._initial = _certificate_configuration(read(config))
        self._pending: grpc.ServerCertificateConfiguration | None = None
        # gRPC calls the fetcher from its own threads, at each new connection.
        self._lock = threading.Lock()

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate chaining to the bundle."""
        # The stubs say the fetcher must answer a configuration; gRPC takes None as "unchanged".
        fetch: Any = self._fetch
        return grpc.dynamic_ssl_server_credentials(self._initial, fetch, require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # None: keep what the connection's handshaker has.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Reads the files again; unreadable or malformed ones keep the certificates in use."""
        try:
            configuration = _certificate_configuration(read(self.config))
        except ConfigError as exc:
            log.error("certificates not reloaded, the ones in use stay: %s", exc)
            return False
        with self._lock:
            self._pending = configuration
        log.info("certificates reloaded", extra={"cert_file": str(self.config.cert_file)})
        return True


def channel_credentials(config: TlsConfig) -> grpc.ChannelCredentials:
    """Credentials of a client that presents the process's certificate and verifies the server
    against the CA bundle."""
    material = read(config)
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
    )


@functools.lru_cache(maxsize=1024)
def identity(pem: bytes) -> str | None:
    """The caller a certificate names: the last path segment of a `spiffe://<trust domain>/<name>`
    URI SAN, else the first DNS SAN, else the subject CN; None when it names none."""
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
        domain, _, path = uri.removeprefix("spiffe://").partition("/")
        name = path.rstrip("/").rpartition("/")[2]
        if uri.startswith("spiffe://") and domain and name:
            return name
    dns = names.get_values_for_type(x509.DNSName)
    if dns:
        return dns[0]
    common = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if common:
        value = common[0].value
        return value if isinstance(value, str) else value.decode()
    return None


class RotatingChannel:
    """A client channel whose certificate is re-read on reload() (grpcio has no dynamic client
    credentials): calls made after a reload go over a new channel with the new files, calls
    already made finish on the old one, which is closed drain_seconds later.

    Stubs are built on it once (`Stub(rotating.channel())`); each call looks up the channel
    in use when it is made."""

    def __init__(self, open_channel: Callable[[], grpc.aio.Channel], drain_seconds: float) -> None:
        self._open = open_channel
        self._current = open_channel()
        self._drain_seconds = drain_seconds
        self._retired: set[asyncio.Task[None]] = set()

    def channel(self) -> Any:
        """What a stub is built on (typed Any: it stands in for a grpc.aio.Channel)."""
        return _Delegate(self)

    def reload(self) -> bool:
        """Opens a channel with the files as they are now; unreadable ones keep the old channel."""
        try:
            fresh = self._open()
        except ConfigError as exc:
            log.error("client certificate not reloaded, the one in use stays: %s", exc)
            return False
        old, self._current = self._current, fresh
        task = asyncio.get_running_loop().create_task(self._close_later(old))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        log.info("client certificate reloaded")
        return True

    async def _close_later(self, old: grpc.aio.Channel) -> None:
        await asyncio.sleep(self._drain_seconds)
        await old.close(None)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        await self._current.close(None)


class _Delegate:
    """The channel a stub sees: each call goes to the RotatingChannel's channel of the moment."""

    def __init__(self, rotating: RotatingChannel) -> None:
        self._rotating = rotating

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        def call(request: Any, **options: Any) -> Any:
            return self._rotating._current.unary_unary(method, *args, **kwargs)(request, **options)

        return call
