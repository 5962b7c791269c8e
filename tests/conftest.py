"""Shared fixtures: the services served in-process on real ports over real channels, on a
database of the test module's own, cloned from one migrated by the real dbmate migrations."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import server
from blumpo_common.config import DatabaseConfig, login_url
from blumpo_common.db import create_pool
from blumpo_common.pagination import PageTokens
from blumpo_common.retry import RetryPolicy
from generation_service.charging import ReconcilerSettings
from generation_service.server import Parts as GenerationParts
from generation_service.server import parts as generation_parts_for
from generation_service.server import service as generation_service
from harness import databases
from tests import support
from tests.generation_support import TEST_PRICES_SQL
from token_service.otp import OtpLogins
from token_service.server import service as token_service
from token_service.store import Store as TokenStore


@pytest.fixture(scope="session")
async def clones() -> AsyncIterator[databases.Clones]:
    """A template migrated once per run, which each module clones rather than migrate again."""
    base = os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL")
    if not base:
        pytest.fail("DATABASE_URL is not set: run the tests with `make test`")
    template = await databases.create_template(base, setup=TEST_PRICES_SQL)
    made = databases.Clones(template, "test")
    yield made
    await made.close()
    await databases.drop(template)


@pytest.fixture(scope="module")
async def database_url(clones: databases.Clones) -> AsyncIterator[str]:
    """The module's own database: no test sees rows another module left."""
    url = await clones.take()
    yield url
    clones.release(url)


@pytest.fixture(scope="module")
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection for checking what the services wrote."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


# The race tests fire a few hundred calls at one server at once, past the default bound on
# concurrent calls; the overload tests run servers of their own with a low one.
MAX_CONCURRENT_CALLS = 1000


# `make test-pooler` puts a PgBouncer in transaction mode here: the services' pools go through
# it, their LISTEN and the tests' own checks go straight to PostgreSQL.
POOLER_ADDR = os.environ.get("BLUMPO_TEST_POOLER_ADDR", "")


def database_config(url: str, role: str) -> DatabaseConfig:
    """The service's settings as deployed: its own login role on the module's database."""
    own = login_url(url, role)
    if not POOLER_ADDR:
        return DatabaseConfig(url=own, pool_size=20, timeout_ms=30000)
    pooled = urlsplit(own)._replace(netloc=f"{role}@{POOLER_ADDR}").geturl()
    return DatabaseConfig(url=pooled, pool_size=20, timeout_ms=30000, pooler="transaction", listen_url=own)


# The secret both services sign page tokens with in tests, so a test can sign one too.
TEST_PAGE_TOKENS = PageTokens(b"page-token-test-secret-0123456789abcdef")


@pytest.fixture(scope="module")
async def token_address(database_url: str) -> AsyncIterator[str]:
    pool = await create_pool(database_config(database_url, "token_service"))
    service = token_service(TokenStore(pool, 30.0), pages=TEST_PAGE_TOKENS)
    running = await server.start(service, pool, "127.0.0.1:0", MAX_CONCURRENT_CALLS)
    yield f"127.0.0.1:{running.port}"
    await running.stop(1)
    await pool.close()


@pytest.fixture(scope="module")
async def token(token_address: str) -> AsyncIterator[token_pb2_grpc.TokenServiceAsyncStub]:
    async with grpc.aio.insecure_channel(token_address) as channel:
        yield token_pb2_grpc.TokenServiceStub(channel)


# The generation service, in-process, charging through the in-process token service.
# Short reconciler delays, so tests see abandoned intents finished within seconds.
TEST_RETRY = RetryPolicy(attempt_timeout_seconds=0.5, max_attempts=3, total_timeout_seconds=1.0)
TEST_RECONCILER = ReconcilerSettings(claim_seconds=3.0, interval_seconds=0.2)


@pytest.fixture(scope="module")
def reconciler_settings() -> ReconcilerSettings:
    """The generation service's reconciler settings; a module may override this fixture."""
    return TEST_RECONCILER


@pytest.fixture(scope="module")
def sweep_interval_seconds() -> float:
    """How often ClaimNextJob sweeps expired leases (the service's default); a module may override this fixture."""
    return 1.0


@pytest.fixture(scope="module")
async def generation_parts(
    database_url: str, token_address: str, reconciler_settings: ReconcilerSettings, sweep_interval_seconds: float
) -> AsyncIterator[GenerationParts]:
    config = database_config(database_url, "generation_service")
    pool = await create_pool(config)
    async with grpc.aio.insecure_channel(token_address) as channel:
        yield generation_parts_for(
            pool,
            config,
            channel,
            TEST_RETRY,
            reconciler_settings,
            pages=TEST_PAGE_TOKENS,
            sweep_interval_seconds=sweep_interval_seconds,
        )
    await pool.close()


@pytest.fixture(scope="module")
async def generation_address(generation_parts: GenerationParts) -> AsyncIterator[str]:
    running = await server.start(
        generation_service(generation_parts), generation_parts.store.pool, "127.0.0.1:0", MAX_CONCURRENT_CALLS
    )
    yield f"127.0.0.1:{running.port}"
    await running.stop(1)


@pytest.fixture(scope="module")
async def generation(generation_address: str) -> AsyncIterator[generation_pb2_grpc.GenerationServiceAsyncStub]:
    async with grpc.aio.insecure_channel(generation_address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
async def token_store(database_url: str) -> AsyncIterator[TokenStore]:
    """The token service's store on its own pool, for driving the refill step by step."""
    pool = await create_pool(database_config(database_url, "token_service"))
    yield TokenStore(pool, 30.0)
    await pool.close()


OTP_TEST_SECRET = b"otp-test-secret-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
async def otp(database_url: str) -> AsyncIterator[support.OtpHarness]:
    """A second token server whose OTP login uses a fake clock and a capturing sender."""
    pool = await create_pool(database_config(database_url, "token_service"))
    store = TokenStore(pool, 30.0)
    clock = support.FakeClock()
    sender = support.CapturingSender()
    logins = OtpLogins(store, sender, clock, OTP_TEST_SECRET, ttl_seconds=600)
    running = await server.start(token_service(store, logins), pool, "127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield support.OtpHarness(token_pb2_grpc.TokenServiceStub(channel), clock, sender, OTP_TEST_SECRET)
    await running.stop(1)
    await pool.close()
