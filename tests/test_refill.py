"""The monthly refill: once per account and period, however it is stopped and rerun.

The module's tests share its database, so each test uses its own period and
checks its own accounts; the counts it checks for all accounts come from the database.
"""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub
from token_service import refill
from token_service.store import Store


async def new_users(token: TokenStub, admin: asyncpg.Connection, plans: list[str]) -> list[str]:
    """New users on these plans; every account is then backdated, so the past periods the tests
    refill find them open."""
    users = []
    for plan in plans:
        user = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email(), plan=plan))).user
        users.append(user.user_id)
    await support.open_accounts_long_ago(admin)
    return users


async def refill_entries(admin: asyncpg.Connection, period: str) -> dict[str, list[int]]:
    rows = await admin.fetch(
        "SELECT user_id, delta FROM token.token_ledger WHERE reference_id = $1 AND reason = 'MONTHLY_REFILL'",
        refill.reference(period),
    )
    entries: dict[str, list[int]] = {}
    for row in rows:
        entries.setdefault(str(row["user_id"]), []).append(row["delta"])
    return entries


async def eligible_accounts(admin: asyncpg.Connection) -> tuple[int, int]:
    """(accounts, accounts whose plan has an allowance)."""
    row = await admin.fetchrow(
        "SELECT count(*) AS total, count(*) FILTER (WHERE p.monthly_allowance > 0) AS eligible "
        "FROM token.token_account a JOIN token.plan p ON p.code = a.plan_code"
    )
    assert row is not None
    return row["total"], row["eligible"]


async def assert_consistent(token: TokenStub) -> None:
    checked = await token.CheckBalances(tpb.CheckBalancesRequest())
    assert checked.accounts_checked > 0
    assert list(checked.mismatches) == []


@pytest.fixture(scope="module")
async def no_allowance_plan(admin: asyncpg.Connection) -> str:
    await admin.execute(
        "INSERT INTO token.plan (code, name, monthly_allowance, signup_grant) VALUES ('paused', 'Paused', 0, 0) "
        "ON CONFLICT DO NOTHING"
    )
    return "paused"


async def test_refill_credits_each_plan_its_allowance_once(
    token: TokenStub, admin: asyncpg.Connection, no_allowance_plan: str
) -> None:
    free, pro, paused = await new_users(token, admin, ["free", "pro", no_allowance_plan])
    total, eligible = await eligible_accounts(admin)

    first = await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2011-01"))
    assert first.accounts_credited == eligible
    assert first.accounts_skipped == total - eligible
    entries = await refill_entries(admin, "2011-01")
    assert entries[free] == [50] and entries[pro] == [1000] and paused not in entries
    balances = {u: (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=u))).balance for u in (free, pro)}
    assert balances == {free: 150, pro: 1100}

    second = await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2011-01"))
    assert second.accounts_credited == 0
    assert second.accounts_skipped == total
    assert await refill_entries(admin, "2011-01") == entries

    # Another month is another reference.
    third = await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2011-02"))
    assert third.accounts_credited == eligible
    await assert_consistent(token)


async def test_refill_stopped_half_way_and_rerun_credits_each_account_once(
    token: TokenStub, token_store: Store, admin: asyncpg.Connection
) -> None:
    await new_users(token, admin, ["free"] * 6 + ["pro"] * 4)
    total, eligible = await eligible_accounts(admin)
    period = "2012-03"

    partial = await refill.run(token_store, period, "test", batch_size=4, max_batches=2)
    assert not partial.finished and partial.batches == 2
    assert partial.credited + partial.skipped == 8
    credited_so_far = len(await refill_entries(admin, period))
    assert credited_so_far == partial.credited > 0

    rest = await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period=period))
    assert rest.accounts_credited == eligible - partial.credited
    assert rest.accounts_credited + rest.accounts_skipped == total
    entries = await refill_entries(admin, period)
    assert len(entries) == eligible
    assert all(len(deltas) == 1 for deltas in entries.values())
    await assert_consistent(token)


async def test_refill_cancelled_at_any_point_and_rerun_credits_each_account_once(
    token: TokenStub, token_store: Store, admin: asyncpg.Connection
) -> None:
    await new_users(token, admin, ["free"] * 5)
    _, eligible = await eligible_accounts(admin)
    period = "2012-04"
    for delay in (0.0, 0.005, 0.02):
        task = asyncio.create_task(refill.run(token_store, period, "test", batch_size=3))
        await asyncio.sleep(delay)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await refill.run(token_store, period, "test", batch_size=7)
    entries = await refill_entries(admin, period)
    assert len(entries) == eligible
    assert all(len(deltas) == 1 for deltas in entries.values())
    await assert_consistent(token)


async def test_concurrent_refills_of_one_period_credit_each_account_once(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    await new_users(token, admin, ["pro"] * 3)
    total, eligible = await eligible_accounts(admin)
    results = await asyncio.gather(
        *[token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2013-07")) for _ in range(4)]
    )
    assert sum(r.accounts_credited for r in results) == eligible
    assert all(r.accounts_credited + r.accounts_skipped == total for r in results)
    entries = await refill_entries(admin, "2013-07")
    assert len(entries) == eligible and all(len(d) == 1 for d in entries.values())
    await assert_consistent(token)


async def test_refill_uses_the_plan_at_the_time_of_the_refill(token: TokenStub, admin: asyncpg.Connection) -> None:
    [user] = await new_users(token, admin, ["free"])
    await token.ChangePlan(tpb.ChangePlanRequest(user_id=user, plan="pro"))
    await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2014-01"))
    assert (await refill_entries(admin, "2014-01"))[user] == [1000]


@pytest.mark.parametrize(
    "period", ["", "2026-13", "2026-00", "26-01", "2026-1", "1999-12", "2026-01-01", "２０２６-01", "2026-01\n"]
)
async def test_refill_refuses_a_malformed_period_and_writes_nothing(
    token: TokenStub, admin: asyncpg.Connection, period: str
) -> None:
    before = await support.row_counts(admin, "token")
    error = await support.expect_error(
        token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period=period)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert support.bad_fields(error) == ["period"]
    assert await support.row_counts(admin, "token") == before


def test_reference_is_the_period() -> None:
    assert refill.reference("2026-11") == "refill:2026-11"


async def test_refill_concurrent_with_debits_keeps_every_balance_equal_to_its_ledger(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    users = await new_users(token, admin, ["free"] * 8)
    debits = [
        token.AppendLedgerEntries(
            tpb.AppendLedgerEntriesRequest(
                entries=[
                    tpb.AppendLedgerEntryRequest(
                        user_id=user, delta=-30, reason=tpb.LEDGER_REASON_GENERATION, reference_id=f"job-{round_}"
                    )
                    for user in users
                ]
            )
        )
        for round_ in range(6)
    ]
    refill_call = token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2016-02"))
    await asyncio.gather(refill_call, *debits)
    entries = await refill_entries(admin, "2016-02")
    for user in users:
        assert entries[user] == [50]
        # 100 signup + 50 refill = 150 at most: five debits of 30 fit, the sixth never does.
        jobs = await admin.fetchval(
            "SELECT count(*) FROM token.token_ledger WHERE user_id = $1 AND reason = 'GENERATION'", user
        )
        assert 3 <= jobs <= 5
    await assert_consistent(token)


async def test_monthly_refill_refuses_a_period_in_the_future(token: TokenStub, admin: asyncpg.Connection) -> None:
    """Each period is credited once; a period years ahead is not a month to credit now, else a caller
    can pay every account up to 95,000 future allowances today (one call per month up to 9999-12)."""
    error = await support.expect_error(
        token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="9999-12")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert support.bad_fields(error) == ["period"]
    written = await admin.fetchval("SELECT count(*) FROM token.token_ledger WHERE reference_id = 'refill:9999-12'")
    assert written == 0


async def test_the_next_batch_is_written_while_one_waits_and_each_account_is_credited_once(
    token: TokenStub, token_store: Store, admin: asyncpg.Connection, database_url: str
) -> None:
    """Two batches are in flight: while the first waits on an account's lock, the second is
    written, and the third waits for the first; once the lock is let go every account is
    credited once."""
    await new_users(token, admin, ["free"] * 6)
    period = "2014-05"
    rows = await admin.fetch(
        "SELECT a.user_id, p.monthly_allowance > 0 AS eligible FROM token.token_account a "
        "JOIN token.plan p ON p.code = a.plan_code ORDER BY a.user_id"
    )
    batches = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    # One account on a plan without allowance at most (no_allowance_plan): each batch of two
    # has an account to credit.
    assert all(any(row["eligible"] for row in batch) for batch in batches[:3])
    holder = await asyncpg.connect(database_url)
    locked = holder.transaction()
    await locked.start()
    first = next(row["user_id"] for row in batches[0] if row["eligible"])
    await holder.execute("SELECT 1 FROM token.token_account WHERE user_id = $1 FOR UPDATE", first)
    running = asyncio.create_task(refill.run(token_store, period, "test", batch_size=2))
    try:
        second = [str(row["user_id"]) for row in batches[1] if row["eligible"]]
        for _ in range(200):
            if set(second) <= set(await refill_entries(admin, period)):
                break
            await asyncio.sleep(0.025)
        written = await refill_entries(admin, period)
        assert set(second) <= set(written), "the second batch waited for the first"
        assert not {str(row["user_id"]) for row in batches[0] + batches[2]} & set(written)
        assert not running.done()
    finally:
        await holder.close()  # the lock goes with it
        await asyncio.gather(running, return_exceptions=True)
    result = running.result()
    assert result.finished and result.batches == len(batches)
    entries = await refill_entries(admin, period)
    assert sorted(entries) == sorted(str(row["user_id"]) for row in rows if row["eligible"])
    assert all(deltas == [50] or deltas == [1000] for deltas in entries.values())
    await assert_consistent(token)
