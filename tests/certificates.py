"""Certificates for tests: a CA made here (trustme), callers' and servers' certificates as
`make certs` issues them, and the settings that point a process at them."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme

from blumpo_common import authz, server, tls
from blumpo_common.db import create_pool
from generation_service.server import parts as generation_parts_for
from generation_service.server import service as generation_service
from harness import ROOT
from scripts.make_certs import LOCAL_HOSTS, issue
from tests.conftest import TEST_PAGE_TOKENS, TEST_RECONCILER, TEST_RETRY, database_config
from token_service.server import service as token_service
from token_service.store import Store as TokenStore

POLICY = ROOT / "deploy" / "policy.toml"


@dataclass(frozen=True)
class Identity:
    """A certificate with its key, and the CA bundle it trusts, written to files."""

    cert: Path
    key: Path
    ca: Path

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())

    def settings(self) -> dict[str, str]:
        return {"TLS_CERT_FILE": str(self.cert), "TLS_KEY_FILE": str(self.key), "TLS_CA_FILE": str(self.ca)}


class Authority:
    """A CA of the test's own, issuing into a directory."""

    def __init__(self, directory: Path, label: str = "ca") -> None:
        self.ca = trustme.CA()
        self.directory = directory
        self.label = label
        self.bundle = directory / f"{label}.pem"
        self.ca.cert_pem.write_to_path(str(self.bundle))

    def issue(self, name: str, hosts: tuple[str, ...] = (), *, uri: str | None = None) -> Identity:
        """A certificate naming `name` (spiffe URI SAN unless uri says otherwise); servers' get hosts."""
        cert, key = issue(self.ca, name, hosts, uri=uri)
        stem = self.directory / f"{self.label}-{name}"
        stem.with_suffix(".pem").write_bytes(cert)
        stem.with_suffix(".key").write_bytes(key)
        return Identity(stem.with_suffix(".pem"), stem.with_suffix(".key"), self.bundle)

    def server(self, name: str) -> Identity:
        return self.issue(name, LOCAL_HOSTS)


@functools.cache
def production_security() -> dict[str, str]:
    """Settings for mutual TLS and the shipped policy, as production mode requires (files made
    once per test run)."""
    directory = Path(tempfile.mkdtemp(prefix="blumpo-certs-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return {**Authority(directory).server("token").settings(), "AUTHZ_POLICY_FILE": str(POLICY)}


@contextlib.asynccontextmanager
async def secure_token_server(database_url: str, identity: Identity, policy: Path = POLICY) -> AsyncIterator[str]:
    """The token service in-process with mutual TLS and the policy; yields its address."""
    pool = await create_pool(database_config(database_url, "token_service"))
    security = server.Security(tls.TlsConfig(identity.cert, identity.key, identity.ca), authz.load_policy(policy))
    service = token_service(TokenStore(pool, 30.0), pages=TEST_PAGE_TOKENS)
    running = await server.start(service, pool, "127.0.0.1:0", security=security)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(1)
        await pool.close()


@contextlib.asynccontextmanager
async def secure_generation_server(
    database_url: str, identity: Identity, token_address: str, policy: Path = POLICY
) -> AsyncIterator[str]:
    """The generation service in-process with mutual TLS and the policy, charging through the
    token service at token_address over mutual TLS with its own certificate."""
    config = database_config(database_url, "generation_service")
    pool = await create_pool(config)
    settings = tls.TlsConfig(identity.cert, identity.key, identity.ca)
    security = server.Security(settings, authz.load_policy(policy))
    async with grpc.aio.secure_channel(token_address, tls.channel_credentials(settings)) as channel:
        parts = generation_parts_for(pool, config, channel, TEST_RETRY, TEST_RECONCILER, pages=TEST_PAGE_TOKENS)
        running = await server.start(generation_service(parts), pool, "127.0.0.1:0", security=security)
        try:
            yield f"127.0.0.1:{running.port}"
        finally:
            await running.stop(1)
    await pool.close()
