"""sslmode and sslrootcert in a database URL are honoured, by the services' pools too. Needs a
PostgreSQL with ssl = on (Debian's default cluster has it, with its snakeoil certificate);
skipped, with the reason, on one without."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
import pytest

from blumpo_common.db import create_pool
from tests.conftest import database_config


def with_options(url: str, **options: str) -> str:
    parts = urlsplit(url)
    return parts._replace(query=urlencode(dict(parse_qsl(parts.query)) | options)).geturl()


@pytest.fixture(scope="module", autouse=True)
async def server_has_ssl(admin: asyncpg.Connection) -> AsyncIterator[None]:
    if await admin.fetchval("SHOW ssl") != "on":
        pytest.skip("the test PostgreSQL has ssl = off: set ssl = on (with a certificate) to run the TLS tests")
    yield


async def test_sslmode_require_gives_an_encrypted_session_to_the_services_pool(database_url: str) -> None:
    config = database_config(with_options(database_url, sslmode="require"), "token_service")
    if config.pooler == "transaction":
        pytest.skip("behind the test PgBouncer, which speaks plaintext to its clients")
    pool = await create_pool(config)
    try:
        encrypted = await pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await pool.close()
    assert encrypted is True


async def test_sslmode_disable_is_plaintext(database_url: str) -> None:
    """The other side of the test above: the mode, not the server, decides."""
    conn = await asyncpg.connect(with_options(database_url, sslmode="disable"))
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False
    finally:
        await conn.close()


def make_ca(openssl: str, folder: Path) -> Path:
    """A CA certificate that signed nothing the server has."""
    ca = folder / "other-ca.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=not the server's CA",
         "-keyout", str(folder / "other-ca.key"), "-out", str(ca)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return ca


async def test_sslrootcert_is_honoured_a_server_signed_by_another_ca_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a CA with")
    ca = await asyncio.to_thread(make_ca, openssl, tmp_path)
    url = with_options(database_url, sslmode="verify-ca", sslrootcert=str(ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        conn = await asyncpg.connect(url)
        await conn.close()
