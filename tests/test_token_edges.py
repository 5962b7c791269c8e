"""Edge cases of the token service: the ledger's rules at and above the balance cap,
forged page tokens, blank references, and login codes for internationalised domains."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import server
from blumpo_common.db import create_pool
from tests import support
from tests.conftest import OTP_TEST_SECRET, TEST_PAGE_TOKENS, database_config
from tests.support import FakeClock, TokenStub
from tests.test_otp import SmtpSink
from token_service.config import SmtpConfig
from token_service.otp import OtpLogins
from token_service.otp_sender import SmtpSender
from token_service.server import service as token_service
from token_service.store import Store as TokenStore

ADJ = tpb.LEDGER_REASON_ADJUSTMENT
GEN = tpb.LEDGER_REASON_GENERATION
REFUND = tpb.LEDGER_REASON_GENERATION_REFUND
MAX_BALANCE = 10**15
MAX_DELTA = 10**12
WAIT = 60.0


def entry(
    user_id: str, delta: int, reference_id: str, reason: tpb.LedgerReason.ValueType = ADJ
) -> tpb.AppendLedgerEntryRequest:
    return tpb.AppendLedgerEntryRequest(user_id=user_id, delta=delta, reason=reason, reference_id=reference_id)


async def user_at_the_cap(token: TokenStub) -> str:
    """A user whose balance is exactly MAX_BALANCE, reached through ordinary credits."""
    user_id = await support.user_with_balance(token, 0)
    credits = [entry(user_id, MAX_DELTA, f"fill-{i}") for i in range(MAX_BALANCE // MAX_DELTA)]
    answer = await asyncio.wait_for(token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=credits)), WAIT)
    assert [r.status.code for r in answer.results] == [0] * len(credits)
    assert answer.results[-1].entry.balance_after == MAX_BALANCE
    return user_id


async def test_a_debit_is_applied_while_a_refund_keeps_the_balance_above_the_cap(token: TokenStub) -> None:
    """A refund may lift a balance above 10^15 (the cap never withholds it); a debit from
    there lowers the balance, so it must be applied, not refused as INSUFFICIENT_TOKENS."""
    user_id = await user_at_the_cap(token)
    await token.AppendLedgerEntry(entry(user_id, -50, "job-1", GEN))
    await token.AppendLedgerEntry(entry(user_id, 50, "back-to-the-cap"))
    refunded = await token.AppendLedgerEntry(entry(user_id, 50, "job-1:refund", REFUND))
    assert refunded.entry.balance_after == MAX_BALANCE + 50

    debit = await token.AppendLedgerEntry(entry(user_id, -10, "job-2", GEN))

    assert debit.entry.balance_after == MAX_BALANCE + 40
    balance = await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))
    assert balance.balance == MAX_BALANCE + 40


@pytest.mark.parametrize(
    "key",
    [
        ["0001-01-01T00:00:00+05:00", 5],
        ["9999-12-31T23:59:59-05:00", 5],
        ["2026-11-25T00:00:00+00:00", float("inf")],
    ],
    ids=["year-1-east-of-utc", "year-9999-west-of-utc", "infinite-seq"],
)
async def test_a_forged_page_token_the_query_cannot_take_is_invalid_argument(
    token: TokenStub, key: list[object]
) -> None:
    """A token signed with the service's secret (as a leaked secret would let anyone sign one)
    whose instant lies outside what an aware datetime can hold in UTC, or whose seq is not
    an integer, is INVALID_ARGUMENT naming page_token, like every other token the query
    cannot take."""
    user_id = await support.user_with_balance(token, 100)
    page_token = TEST_PAGE_TOKENS.sign(f"ledger:{user_id}", json.dumps(key).encode())

    failure = await support.expect_error(
        token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user_id, page_token=page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    assert support.bad_fields(failure) == ["page_token"]


async def test_a_refund_that_would_overflow_int64_is_refused_not_internal(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    """Refunds are not held to the 10^15 cap, so nothing bounds a balance but int64. A refund
    the balance cannot hold is refused as FAILED_PRECONDITION / BALANCE_LIMIT_EXCEEDED and
    writes nothing; it is not an INTERNAL error. (The balance is placed next to int64's
    maximum directly, standing in for the ~9.2 million uncapped refunds that reach it.)"""
    user_id = await support.user_with_balance(token, 100)
    await token.AppendLedgerEntry(entry(user_id, -50, "job-9", GEN))
    set_balance = "UPDATE token.token_account SET balance = $2 WHERE user_id = $1"
    await admin.execute(set_balance, uuid.UUID(user_id), 2**63 - 10)
    try:
        await support.expect_error(
            token.AppendLedgerEntry(entry(user_id, 50, "job-9:refund", REFUND)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "BALANCE_LIMIT_EXCEEDED",
        )
    finally:
        # Back to what the ledger says, so CheckBalances over every account stays clean.
        await admin.execute(set_balance, uuid.UUID(user_id), 50)


async def test_a_blank_reference_id_is_invalid_argument(token: TokenStub) -> None:
    """reference_id is required: one made only of spaces is as missing as an empty one,
    so it is INVALID_ARGUMENT naming reference_id, and nothing is written."""
    user_id = await support.user_with_balance(token, 100)

    failure = await support.expect_error(
        token.AppendLedgerEntry(entry(user_id, -1, "   ", GEN)), grpc.StatusCode.INVALID_ARGUMENT
    )

    assert support.bad_fields(failure) == ["reference_id"]


async def test_a_login_code_reaches_an_idn_domain_through_a_relay_without_smtputf8(database_url: str) -> None:
    """RequestOtp accepts an address with an internationalised domain (and stores its Unicode
    form). The domain has an ASCII form (IDNA), so the code is mailed to that address and
    reaches it through a relay that does not offer SMTPUTF8, instead of failing every time
    with UNAVAILABLE / OTP_DELIVERY_FAILED ("retry in a moment")."""
    pool = await create_pool(database_config(database_url, "token_service"))
    store = TokenStore(pool, 30.0)
    try:
        async with SmtpSink() as sink:
            smtp = SmtpConfig("127.0.0.1", sink.port, "login@blumpo.example", "", "", starttls=False, timeout_seconds=5)
            logins = OtpLogins(store, SmtpSender(smtp), FakeClock(), OTP_TEST_SECRET, ttl_seconds=600)
            running = await server.start(token_service(store, logins), pool, "127.0.0.1:0")
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                    stub = token_pb2_grpc.TokenServiceStub(channel)
                    local = f"ada-{uuid.uuid4().hex[:8]}"
                    await asyncio.wait_for(stub.RequestOtp(tpb.RequestOtpRequest(email=f"{local}@bücher.de")), WAIT)
            finally:
                await running.stop(1)
        [message] = sink.messages
        assert f"To: {local}@xn--bcher-kva.de" in message
    finally:
        await pool.close()
