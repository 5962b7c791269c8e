"""Locking and idempotency under many concurrent calls, checked by the ledger's invariants."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub


async def assert_ledger_consistent(token: TokenStub, admin: asyncpg.Connection, user_id: str) -> None:
    """Balance = sum of the ledger = last balance_after, never negative, one entry per reference."""
    check = await token.CheckBalances(tpb.CheckBalancesRequest(user_id=user_id))
    assert (check.accounts_checked, list(check.mismatches)) == (1, [])
    uid = uuid.UUID(user_id)
    negatives = await admin.fetchval(
        "SELECT count(*) FROM token.token_ledger WHERE user_id = $1 AND balance_after < 0", uid
    )
    duplicates = await admin.fetchval(
        "SELECT count(*) FROM (SELECT reference_id FROM token.token_ledger WHERE user_id = $1"
        " GROUP BY reference_id HAVING count(*) > 1) d",
        uid,
    )
    assert (negatives, duplicates) == (0, 0)
    # Replaying the chain in order reproduces every balance_after.
    rows = await admin.fetch("SELECT delta, balance_after FROM token.token_ledger WHERE user_id = $1 ORDER BY seq", uid)
    running = 0
    for row in rows:
        running += row["delta"]
        assert row["balance_after"] == running


async def test_fifty_concurrent_debits_spend_exactly_the_balance(token: TokenStub, admin: asyncpg.Connection) -> None:
    user_id = await support.user_with_balance(token, 200)

    async def debit(n: int) -> grpc.StatusCode:
        try:
            await token.AppendLedgerEntry(
                tpb.AppendLedgerEntryRequest(
                    user_id=user_id, delta=-10, reason=tpb.LEDGER_REASON_GENERATION, reference_id=f"job-{n}"
                )
            )
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            assert support.error_info(error).reason == "INSUFFICIENT_TOKENS"
            return error.code()

    codes = await asyncio.gather(*(debit(n) for n in range(50)))
    assert codes.count(grpc.StatusCode.OK) == 20
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 30
    assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance == 0
    debits = await admin.fetchval(
        "SELECT count(*) FROM token.token_ledger WHERE user_id = $1 AND reason = 'GENERATION'", uuid.UUID(user_id)
    )
    assert debits == 20
    await assert_ledger_consistent(token, admin, user_id)


async def test_twenty_concurrent_calls_with_one_reference_write_one_entry(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 100)
    request = tpb.AppendLedgerEntryRequest(
        user_id=user_id, delta=-7, reason=tpb.LEDGER_REASON_GENERATION, reference_id="job-once"
    )
    responses = await asyncio.gather(*(token.AppendLedgerEntry(request) for _ in range(20)))
    assert len({r.entry.entry_id for r in responses}) == 1
    assert all(r.entry == responses[0].entry for r in responses)
    assert sum(not r.replayed for r in responses) == 1
    rows = await admin.fetchval(
        "SELECT count(*) FROM token.token_ledger WHERE user_id = $1 AND reference_id = 'job-once'", uuid.UUID(user_id)
    )
    assert rows == 1
    assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance == 93
    await assert_ledger_consistent(token, admin, user_id)


async def test_concurrent_mixed_credits_and_debits_across_accounts_stay_consistent(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    users = [await support.user_with_balance(token, 50) for _ in range(4)]

    async def move(n: int) -> None:
        user_id = users[n % len(users)]
        delta = 15 if n % 3 == 0 else -20
        try:
            await token.AppendLedgerEntry(
                tpb.AppendLedgerEntryRequest(
                    user_id=user_id, delta=delta, reason=tpb.LEDGER_REASON_ADJUSTMENT, reference_id=f"move-{n}"
                )
            )
        except grpc.aio.AioRpcError as error:
            assert support.error_info(error).reason == "INSUFFICIENT_TOKENS"

    # Each request twice, so replays race with first writes.
    await asyncio.gather(*(move(n) for n in list(range(120)) * 2))
    for user_id in users:
        await assert_ledger_consistent(token, admin, user_id)
