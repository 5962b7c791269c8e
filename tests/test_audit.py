"""The audit trail: every ledger entry names the caller that wrote it, entries from before say
`unknown`, and maintenance calls are logged with their caller and request id."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from harness import databases
from tests import support
from tests.support import OtpHarness, TokenStub
from tests.test_migrations import make

# In development without TLS, the caller is the one `x-blumpo-caller` names.


def said_by(caller: str) -> tuple[tuple[str, str], ...]:
    return (("x-blumpo-caller", caller), ("x-request-id", f"req-{caller}"))


async def writers(admin: asyncpg.Connection, user_id: str) -> dict[str, str]:
    rows = await admin.fetch(
        "SELECT reference_id, created_by FROM token.token_ledger WHERE user_id = $1", uuid.UUID(user_id)
    )
    return {row["reference_id"]: row["created_by"] for row in rows}


async def test_each_entry_names_its_writer(token: TokenStub, admin: asyncpg.Connection) -> None:
    user = (
        await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()), metadata=said_by("signup-desk"))
    ).user
    single = await token.AppendLedgerEntry(
        tpb.AppendLedgerEntryRequest(
            user_id=user.user_id, delta=50, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="order-1"
        ),
        metadata=said_by("billing"),
    )
    assert single.entry.created_by == "billing"
    batch = await token.AppendLedgerEntries(
        tpb.AppendLedgerEntriesRequest(
            entries=[
                tpb.AppendLedgerEntryRequest(
                    user_id=user.user_id, delta=-5, reason=tpb.LEDGER_REASON_GENERATION, reference_id="job-1"
                ),
                tpb.AppendLedgerEntryRequest(
                    user_id=user.user_id, delta=-5, reason=tpb.LEDGER_REASON_GENERATION, reference_id="job-2"
                ),
            ]
        ),
        metadata=said_by("generation"),
    )
    assert [result.entry.created_by for result in batch.results] == ["generation", "generation"]
    # A replay answers the entry as first written, by its first writer.
    replay = await token.AppendLedgerEntry(
        tpb.AppendLedgerEntryRequest(
            user_id=user.user_id, delta=50, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="order-1"
        ),
        metadata=said_by("admin"),
    )
    assert replay.replayed and replay.entry.created_by == "billing"
    period = datetime.now(UTC).strftime("%Y-%m")
    await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period=period), metadata=said_by("scheduler"))

    assert await writers(admin, user.user_id) == {
        "signup": "signup-desk",
        "order-1": "billing",
        "job-1": "generation",
        "job-2": "generation",
        f"refill:{period}": "scheduler",
    }
    listed = await token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user.user_id))
    assert {entry.reference_id: entry.created_by for entry in listed.entries} == await writers(admin, user.user_id)


async def test_without_a_named_caller_development_writes(token: TokenStub, admin: asyncpg.Connection) -> None:
    user_id = await support.user_with_balance(token, 100)
    assert set((await writers(admin, user_id)).values()) == {"development"}


async def test_a_signup_by_login_code_is_written_by_the_caller_of_verify(
    otp: OtpHarness, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    await otp.token.RequestOtp(tpb.RequestOtpRequest(email=email))
    login = await otp.token.VerifyOtp(
        tpb.VerifyOtpRequest(email=email, code=otp.sender.last_code(email)), metadata=said_by("web")
    )
    assert await writers(admin, login.user.user_id) == {"signup": "web"}


async def test_maintenance_is_logged_with_its_caller_and_request_id(
    token: TokenStub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="blumpo.audit"):
        await token.DeleteExpiredOtps(tpb.DeleteExpiredOtpsRequest(older_than_hours=48), metadata=said_by("ops"))
    [record] = [r for r in caplog.records if r.name == "blumpo.audit"]
    assert record.getMessage() == "expired login codes deleted"
    assert (record.caller, record.request_id, record.older_than_hours) == ("ops", "req-ops", 48)  # type: ignore[attr-defined]


@pytest.fixture
def scratch(database_url: str) -> Iterator[str]:
    url = databases.scratch_database_url(database_url, "audit")
    yield url
    databases.drop_database(url)


async def test_entries_from_before_the_trail_say_unknown(scratch: str) -> None:
    make("migrate", scratch)
    make("rollback", scratch)  # the ledger's fast paths
    make("rollback", scratch)  # the OTP limits
    make("rollback", scratch)  # the writer of each entry
    conn = await asyncpg.connect(scratch)
    try:
        [user] = await conn.fetch("SELECT * FROM token.create_user('old@example.com', 'free', 1000000)")
    finally:
        await conn.close()
    make("migrate", scratch)
    conn = await asyncpg.connect(scratch)
    try:
        assert await conn.fetchval("SELECT created_by FROM token.token_ledger WHERE user_id = $1", user["id"]) == (
            "unknown"
        )
        # From now on the writer must be given: the column has no default.
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute(
                "INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after) "
                "VALUES ($1, 1, 'ADJUSTMENT', 'x', 1)",
                user["id"],
            )
    finally:
        await conn.close()
