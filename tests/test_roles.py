"""Each service's role reaches only its own schema; the ledger is append-only."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests import support
from tests.support import TokenStub

TOKEN_TABLES = ["plan", "app_user", "token_account", "token_ledger", "auth_otp"]
GENERATION_TABLES = ["generation_job", "asset_image", "asset_image_variant"]


@pytest.mark.parametrize(
    ("role", "table"),
    [("generation_service", f"token.{t}") for t in TOKEN_TABLES]
    + [("token_service", f"generation.{t}") for t in GENERATION_TABLES],
)
async def test_a_role_cannot_read_the_other_schema(database_url: str, role: str, table: str) -> None:
    conn = await asyncpg.connect(database_url, server_settings={"role": role})
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f"SELECT * FROM {table} LIMIT 1")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("role", "table"),
    [("token_service", f"token.{t}") for t in TOKEN_TABLES]
    + [("generation_service", f"generation.{t}") for t in GENERATION_TABLES],
)
async def test_each_role_reads_its_own_schema(database_url: str, role: str, table: str) -> None:
    conn = await asyncpg.connect(database_url, server_settings={"role": role})
    try:
        await conn.fetch(f"SELECT * FROM {table} LIMIT 1")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("role", "statement"),
    [
        ("token_service", "UPDATE token.token_ledger SET delta = delta WHERE user_id = $1"),
        ("token_service", "DELETE FROM token.token_ledger WHERE user_id = $1"),
        # The owner (a superuser here) is stopped by the append-only trigger.
        (None, "UPDATE token.token_ledger SET delta = delta WHERE user_id = $1"),
        (None, "DELETE FROM token.token_ledger WHERE user_id = $1"),
    ],
)
async def test_ledger_rows_cannot_be_changed(
    token: TokenStub, database_url: str, role: str | None, statement: str
) -> None:
    user_id = uuid.UUID(await support.user_with_balance(token, 120))  # two entries: grant, adjustment
    conn = await asyncpg.connect(database_url, server_settings={"role": role} if role else {})
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement, user_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE token.token_ledger CASCADE")
    finally:
        await conn.close()
    admin = await asyncpg.connect(database_url)
    try:
        assert await admin.fetchval("SELECT count(*) FROM token.token_ledger WHERE user_id = $1", user_id) == 2
    finally:
        await admin.close()
