"""Each service logs in as its own role, which reaches only its own schema, cannot become
anyone else, and writes the ledger and the balances only through token.append_entries."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from blumpo_common.config import login_url
from scripts import development_logins
from tests import support
from tests.support import TokenStub

TOKEN_TABLES = ["plan", "app_user", "token_account", "token_ledger", "auth_otp"]
GENERATION_TABLES = ["generation_job", "asset_image", "asset_image_variant"]
APPEND = "SELECT outcome FROM token.append_entries($1::uuid[], $2::bigint[], $3::text[], $4::text[], 1000000, 'test')"


async def login(database_url: str, role: str) -> asyncpg.Connection:
    """A connection as the service logs in: its own role, no startup settings."""
    return await asyncpg.connect(login_url(database_url, role))


@pytest.fixture
async def as_token_service(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await login(database_url, "token_service")
    yield conn
    await conn.close()


@pytest.mark.parametrize(("role", "schema"), [("token_service", "token"), ("generation_service", "generation")])
async def test_each_service_logs_in_as_an_unprivileged_role_with_its_schema_on_the_path(
    database_url: str, role: str, schema: str
) -> None:
    conn = await login(database_url, role)
    try:
        row = await conn.fetchrow(
            "SELECT current_user AS who, session_user AS login, current_schema() AS schema, r.rolsuper,"
            " r.rolcreaterole, r.rolcreatedb, r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user"
        )
        assert row is not None
        assert dict(row) == {
            "who": role,
            "login": role,
            "schema": schema,
            "rolsuper": False,
            "rolcreaterole": False,
            "rolcreatedb": False,
            "rolbypassrls": False,
        }
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("role", "other"),
    [("token_service", "postgres"), ("token_service", "generation_service"), ("generation_service", "token_service")],
)
async def test_a_service_cannot_become_another_role(database_url: str, role: str, other: str) -> None:
    conn = await login(database_url, role)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"SET ROLE {other}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"SET SESSION AUTHORIZATION {other}")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("role", "table"),
    [("generation_service", f"token.{t}") for t in TOKEN_TABLES]
    + [("token_service", f"generation.{t}") for t in GENERATION_TABLES],
)
async def test_a_role_cannot_read_the_other_schema(database_url: str, role: str, table: str) -> None:
    conn = await login(database_url, role)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f"SELECT * FROM {table} LIMIT 1")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("role", "table"),
    [("token_service", t) for t in TOKEN_TABLES] + [("generation_service", t) for t in GENERATION_TABLES],
)
async def test_each_role_reads_its_own_schema_by_unqualified_names(database_url: str, role: str, table: str) -> None:
    conn = await login(database_url, role)
    try:
        await conn.fetch(f"SELECT * FROM {table} LIMIT 1")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after)"
        " VALUES ($1, 500, 'PURCHASE', 'forged', 620)",
        "UPDATE token.token_account SET balance = balance + 500 WHERE user_id = $1",
        "UPDATE token.token_account SET balance = 0, updated_at = now() WHERE user_id = $1",
        "INSERT INTO token.token_account (user_id, plan_code, balance) VALUES ($1, 'free', 500)",
        "DELETE FROM token.token_account WHERE user_id = $1",
        "UPDATE token.token_ledger SET delta = delta WHERE user_id = $1",
        "DELETE FROM token.token_ledger WHERE user_id = $1",
    ],
)
async def test_the_token_service_cannot_write_the_ledger_or_a_balance_itself(
    token: TokenStub, admin: asyncpg.Connection, as_token_service: asyncpg.Connection, statement: str
) -> None:
    user_id = uuid.UUID(await support.user_with_balance(token, 120))  # two entries: grant, adjustment
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_token_service.execute(statement, user_id)
    assert await admin.fetchval("SELECT count(*) FROM token.token_ledger WHERE user_id = $1", user_id) == 2
    assert await admin.fetchval("SELECT balance FROM token.token_account WHERE user_id = $1", user_id) == 120


async def test_the_token_service_writes_through_the_function_and_changes_plans(
    token: TokenStub, admin: asyncpg.Connection, as_token_service: asyncpg.Connection
) -> None:
    user_id = uuid.UUID(await support.user_with_balance(token, 120))
    outcome = await as_token_service.fetchval(APPEND, [user_id], [-20], ["GENERATION"], ["job-by-login"])
    assert outcome == "APPLIED"
    status = await as_token_service.execute(
        "UPDATE token.token_account SET plan_code = 'pro', updated_at = now() WHERE user_id = $1", user_id
    )
    assert status == "UPDATE 1"
    account = await admin.fetchrow("SELECT balance, plan_code FROM token.token_account WHERE user_id = $1", user_id)
    assert account is not None and dict(account) == {"balance": 100, "plan_code": "pro"}


async def test_the_ledger_function_ignores_the_callers_search_path(
    token: TokenStub, admin: asyncpg.Connection, as_token_service: asyncpg.Connection
) -> None:
    """A caller's own objects cannot stand in for what the function runs as its owner."""
    user_id = uuid.UUID(await support.user_with_balance(token, 120))
    await as_token_service.execute("SET search_path = pg_temp, token")
    await as_token_service.execute("CREATE TEMP TABLE token_account (user_id uuid, balance bigint)")
    outcome = await as_token_service.fetchval(APPEND, [user_id], [-20], ["GENERATION"], ["job-temp-path"])
    assert outcome == "APPLIED"
    assert await admin.fetchval("SELECT balance FROM token.token_account WHERE user_id = $1", user_id) == 100


@pytest.mark.parametrize(
    "call",
    [
        "SELECT * FROM token.append_entries(ARRAY[gen_random_uuid()], ARRAY[5::bigint], ARRAY['PURCHASE'],"
        " ARRAY['x'], 1000, 'test')",
        "SELECT * FROM token.create_user('someone@example.com', 'free', 1000, 'test')",
    ],
)
async def test_the_generation_service_cannot_call_the_ledger_functions(database_url: str, call: str) -> None:
    conn = await login(database_url, "generation_service")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(call)
    finally:
        await conn.close()


async def test_the_owner_is_stopped_by_the_append_only_trigger(token: TokenStub, admin: asyncpg.Connection) -> None:
    user_id = uuid.UUID(await support.user_with_balance(token, 120))
    for statement in (
        "UPDATE token.token_ledger SET delta = delta WHERE user_id = $1",
        "DELETE FROM token.token_ledger WHERE user_id = $1",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await admin.execute(statement, user_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await admin.execute("TRUNCATE token.token_ledger CASCADE")
    assert await admin.fetchval("SELECT count(*) FROM token.token_ledger WHERE user_id = $1", user_id) == 2


async def test_development_logins_take_the_password_of_database_url(
    database_url: str, admin: asyncpg.Connection
) -> None:
    """The one password question of development: the services' roles get DATABASE_URL's."""
    parts = urlsplit(database_url)
    host = f"{parts.hostname}:{parts.port}"
    assert not await development_logins.set_passwords(parts._replace(netloc=f"{parts.username}@{host}").geturl())
    # The same password the tests already log in with when DATABASE_URL has one, so nothing
    # else changes; a server that trusts the tests ignores it.
    password = parts.password or "development-password"
    with_password = parts._replace(netloc=f"{parts.username}:{password}@{host}").geturl()
    assert await development_logins.set_passwords(with_password)
    rows = await admin.fetch(
        "SELECT rolname, rolpassword IS NOT NULL AS has_password FROM pg_authid WHERE rolname = ANY($1) ORDER BY 1",
        list(development_logins.SERVICE_ROLES),
    )
    assert [tuple(r) for r in rows] == [("generation_service", True), ("token_service", True)]
    conn = await asyncpg.connect(login_url(with_password, "token_service"))
    try:
        assert await conn.fetchval("SELECT current_user") == "token_service"
    finally:
        await conn.close()
