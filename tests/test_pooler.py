"""Behind PgBouncer in transaction mode (`make test-pooler`): what the services send passes,
what they no longer send would not. Skipped by `make test`, which has no pooler."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from blumpo_common.config import login_url
from tests.conftest import POOLER_ADDR, database_config

pytestmark = pytest.mark.skipif(not POOLER_ADDR, reason="no pooler: run with `make test-pooler`")


async def test_the_pooler_refuses_the_startup_parameters_the_services_used_to_send(database_url: str) -> None:
    """Proves the tests talk to a PgBouncer: a direct server would take a search_path."""
    url = database_config(database_url, "token_service").url
    with pytest.raises(asyncpg.PostgresError, match="unsupported startup parameter"):
        await asyncpg.connect(url, server_settings={"search_path": "token"}, statement_cache_size=0)


@pytest.mark.parametrize(("role", "schema"), [("token_service", "token"), ("generation_service", "generation")])
async def test_each_transaction_finds_the_roles_schema_on_any_server_connection(
    database_url: str, role: str, schema: str
) -> None:
    config = database_config(database_url, role)
    assert config.pooler == "transaction" and config.statement_cache_size == 0
    assert config.listen_url == login_url(database_url, role)
    clients = [await asyncpg.connect(config.url, statement_cache_size=0) for _ in range(8)]
    try:

        async def schemas(conn: asyncpg.Connection) -> set[str]:
            return {await conn.fetchval("SELECT current_schema() || ':' || current_user") for _ in range(20)}

        seen = await asyncio.gather(*(schemas(c) for c in clients))
        assert set().union(*seen) == {f"{schema}:{role}"}
    finally:
        await asyncio.gather(*(c.close() for c in clients))
