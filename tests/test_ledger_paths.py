"""The ledger's three paths answer alike, and group commit keeps each caller's own outcome.

token.append_entry (one entry) and token.append_distinct_entries (a batch naming each account
once, set-based) must answer exactly as token.append_entries, the entry-by-entry loop: each is
run on the same requests against the same state (a transaction rolled back), and the answers
and the balances left compared.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import asyncpg
import prometheus_client
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub
from tests.test_token_concurrency import assert_ledger_consistent
from token_service import ledger
from token_service.group_commit import GroupCommit
from token_service.model import AppendOutcome, EntryRequest, LedgerReason
from token_service.store import Store

CAP = 1000
REASONS = [r.value for r in LedgerReason]
LOOP = "SELECT * FROM token.append_entries($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5, 'test')"
DISTINCT = "SELECT * FROM token.append_distinct_entries($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5, 'test')"
SINGLE = "SELECT * FROM token.append_entry($1, $2, $3, $4, $5, 'test')"


async def seeded_accounts(admin: asyncpg.Connection, rng: random.Random, count: int) -> list[uuid.UUID]:
    """Accounts with varied balances, each with earlier entries: a debit `job` (refundable), an
    adjustment `adj`, maybe a refund already made."""
    ids = [uuid.uuid4() for _ in range(count)]
    for user_id in ids:
        balance = rng.choice([0, 1, 5, 50, CAP - 3, CAP, 2 * CAP - 10])
        await admin.execute(
            "INSERT INTO token.app_user (id, email) VALUES ($1, $2)", user_id, f"{user_id}@paths.example.com"
        )
        await admin.execute(
            "INSERT INTO token.token_account (user_id, balance, plan_code) VALUES ($1, $2, 'free')", user_id, balance
        )
        entries = [(20 + balance, "ADJUSTMENT", "adj"), (-10, "GENERATION", "job"), (-10, "GENERATION", "job2")]
        if rng.random() < 0.3:
            entries.append((10, "GENERATION_REFUND", "job2:refund"))
        # Only the answers are compared here: the balances after need not add up.
        for delta, reason, ref in entries:
            await admin.execute(
                "INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after, created_by)"
                " VALUES ($1, $2, $3, $4, $5, 'seed')",
                user_id,
                delta,
                reason,
                ref,
                balance,
            )
    return ids


def random_request(rng: random.Random, user_id: uuid.UUID) -> tuple[uuid.UUID, int, str, str]:
    """Every kind of answer: applied, replayed, reused, wrong sign, refunds matched or not,
    insufficient, over the cap (and a refund's doubled cap)."""
    kind = rng.randrange(9)
    if kind == 0:
        return user_id, rng.choice([20, 25]), "ADJUSTMENT", "adj"  # replayed only if the delta matches, else reused
    if kind == 1:
        return user_id, -10, "GENERATION", "job"  # replayed
    if kind == 2:
        return user_id, rng.choice([5, 10, 11]), "GENERATION_REFUND", rng.choice(["job:refund", "job2:refund", "x"])
    if kind == 3:
        return user_id, rng.choice([-1, 1]), rng.choice(REASONS), f"sign-{rng.random()}"
    if kind == 4:
        return user_id, -rng.choice([1, 5, 50, CAP]), "GENERATION", f"debit-{rng.random()}"
    if kind == 5:
        return user_id, rng.choice([1, 3, CAP]), rng.choice(["PURCHASE", "ADJUSTMENT"]), f"credit-{rng.random()}"
    if kind == 6:
        return uuid.uuid4(), 5, "PURCHASE", "nobody"  # no account
    if kind == 7:
        return user_id, -10, "ADJUSTMENT", "job"  # reused: other reason
    return user_id, 5, "GENERATION", f"wrong-{rng.random()}"  # wrong sign


def comparable(row: asyncpg.Record) -> tuple[Any, ...]:
    """An answer, less what a new entry is given afresh (its id and time)."""
    fresh = row["outcome"] == AppendOutcome.APPLIED
    return (
        row["outcome"],
        "new" if fresh else row["entry_id"],
        row["user_id"],
        row["delta"],
        row["reason"],
        row["reference_id"],
        row["balance_after"],
        "new" if fresh else row["occurred_at"],
        row["balance"],
        row["created_by"],  # 'test' for a new entry, 'seed' for an earlier one
    )


async def answers(admin: asyncpg.Connection, run: Any) -> tuple[list[tuple[Any, ...]], list[asyncpg.Record]]:
    """What run answers, and the balances and entries it leaves; then undone."""
    transaction = admin.transaction()
    await transaction.start()
    try:
        rows = await run()
        left = await admin.fetch(
            "SELECT a.user_id, a.balance, l.reference_id, l.delta, l.reason, l.balance_after, l.created_by"
            " FROM token.token_account a LEFT JOIN token.token_ledger l USING (user_id)"
            " ORDER BY a.user_id, l.seq"
        )
        return [comparable(row) for row in rows], left
    finally:
        await transaction.rollback()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_fast_paths_answer_as_the_loop(admin: asyncpg.Connection, seed: int) -> None:
    rng = random.Random(seed)
    ids = await seeded_accounts(admin, rng, 60)
    requests = [random_request(rng, user_id) for user_id in ids]
    columns = [list(column) for column in zip(*requests, strict=True)]

    async def loop() -> list[asyncpg.Record]:
        return await admin.fetch(LOOP, *columns, CAP)

    async def distinct() -> list[asyncpg.Record]:
        return await admin.fetch(DISTINCT, *columns, CAP)

    async def one_by_one() -> list[asyncpg.Record]:
        rows = []
        for request in requests:
            row = await admin.fetchrow(SINGLE, *request, CAP)
            assert row is not None
            rows.append(row)
        return rows

    expected, left = await answers(admin, loop)
    assert {row[0] for row in expected} == {o.value for o in AppendOutcome}, "every answer is exercised"
    assert await answers(admin, distinct) == (expected, left)
    assert await answers(admin, one_by_one) == (expected, left)


async def test_the_set_based_path_refuses_an_account_named_twice(admin: asyncpg.Connection) -> None:
    [user_id] = await seeded_accounts(admin, random.Random(0), 1)
    with pytest.raises(asyncpg.DataError, match="more than once"):
        await admin.fetch(DISTINCT, [user_id, user_id], [1, 2], ["PURCHASE"] * 2, ["a", "b"], CAP)


class CountingStore(Store):
    """The real store, counting the calls that reach the database."""

    calls = 0

    async def append_entry(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await super().append_entry(*args, **kwargs)

    async def append_entries(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await super().append_entries(*args, **kwargs)


async def test_group_commit_gives_each_caller_its_own_outcome_in_order(
    token: TokenStub, admin: asyncpg.Connection, token_store: Store
) -> None:
    """300 concurrent appends to one account: debits past the balance, each reference sent twice
    (once more with another delta). Every caller gets what the serial order gives it."""
    user_id = uuid.UUID(await support.user_with_balance(token, 150))
    store = CountingStore(token_store.pool, 30.0)
    commit = GroupCommit(store)
    requests = []
    for n in range(100):
        requests.append(EntryRequest(user_id, -1 - n % 2, LedgerReason.GENERATION, f"job-{n}"))
        requests.append(EntryRequest(user_id, -1 - n % 2, LedgerReason.GENERATION, f"job-{n}"))
        requests.append(EntryRequest(user_id, -5, LedgerReason.GENERATION, f"job-{n}"))
    # Tasks start in creation order, so they reach the group commit in that order.
    outcomes = await asyncio.gather(*(commit.append(request, "tests") for request in requests))

    assert store.calls < len(requests) / 10, f"{store.calls} calls for {len(requests)} appends: not grouped"
    assert not commit.queues
    # The serial order: each first send applies while the balance lasts, then is refused; the
    # second is a replay of the first's answer; the third reuses the reference.
    balance = 150
    applied = []
    for n in range(100):
        first, again, other = outcomes[3 * n : 3 * n + 3]
        cost = 1 + n % 2
        if balance >= cost:
            balance -= cost
            assert first.entry is not None and not first.replayed and first.entry.balance_after == balance
            assert again.replayed and again.entry == first.entry
            assert other.error is not None and other.error.reason == "IDEMPOTENCY_KEY_REUSED"
            applied.append(first.entry.id)
        else:
            assert first.error is not None and first.error.reason == "INSUFFICIENT_TOKENS"
            assert again.error is not None and again.error.reason == "INSUFFICIENT_TOKENS"
            assert other.error is not None and other.error.reason == "INSUFFICIENT_TOKENS"
    written = await admin.fetch(
        "SELECT id FROM token.token_ledger WHERE user_id = $1 AND reason = 'GENERATION' ORDER BY seq", user_id
    )
    assert [row["id"] for row in written] == applied
    await assert_ledger_consistent(token, admin, str(user_id))


async def test_a_failed_group_fails_each_of_its_callers(token_store: Store, admin: asyncpg.Connection) -> None:
    """A batch that cannot run answers each caller with the error, and the next batch runs."""
    [user_id] = await seeded_accounts(admin, random.Random(5), 1)

    class FailingStore(Store):
        async def append_entries(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionResetError("cut")

    commit = GroupCommit(FailingStore(token_store.pool, 30.0))
    requests = [EntryRequest(user_id, 1, LedgerReason.PURCHASE, f"p-{n}") for n in range(5)]
    results = await asyncio.gather(*(commit.append(r, "tests") for r in requests), return_exceptions=True)
    assert isinstance(results[0], ledger.Outcome) and results[0].entry is not None
    assert all(isinstance(r, ConnectionResetError) for r in results[1:])
    assert not commit.queues
    [after] = await asyncio.gather(commit.append(EntryRequest(user_id, 1, LedgerReason.PURCHASE, "p-late"), "tests"))
    assert after.entry is not None


async def test_set_based_batches_race_without_loss(token: TokenStub, admin: asyncpg.Connection) -> None:
    """Concurrent batches over overlapping accounts, each naming an account once: every balance is
    its ledger's sum, and each reference is written once however many batches carry it."""
    users = [await support.user_with_balance(token, 100) for _ in range(20)]
    rng = random.Random(7)

    async def batch(n: int) -> list[tpb.AppendLedgerEntryResult]:
        chosen = rng.sample(users, 10)
        entries = [
            tpb.AppendLedgerEntryRequest(
                user_id=u, delta=-7, reason=tpb.LEDGER_REASON_GENERATION, reference_id=f"job-{n % 15}"
            )
            for u in chosen
        ]
        response = await token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=entries))
        return list(response.results)

    results = [r for rs in await asyncio.gather(*(batch(n) for n in range(60))) for r in rs]
    applied = {(r.entry.user_id, r.entry.reference_id) for r in results if r.status.code == 0 and not r.replayed}
    written = await admin.fetchval(
        "SELECT count(*) FROM token.token_ledger WHERE reason = 'GENERATION' AND user_id = ANY($1::uuid[])",
        [uuid.UUID(u) for u in users],
    )
    assert written == len(applied)
    for user_id in users:
        await assert_ledger_consistent(token, admin, user_id)


def counted(reason: LedgerReason) -> float:
    return prometheus_client.REGISTRY.get_sample_value("token_ledger_entries_total", {"reason": reason.value}) or 0.0


async def test_every_path_names_its_writer_and_counts_its_entries(
    token: TokenStub, admin: asyncpg.Connection, token_store: Store
) -> None:
    """One entry (the lean function), a batch naming each account once (set-based) and a batch
    naming an account twice (the loop): each entry written names the caller, and is counted once."""
    first = uuid.UUID(await support.user_with_balance(token, 100))
    second = uuid.UUID(await support.user_with_balance(token, 100))
    before = counted(LedgerReason.PURCHASE)
    paths = {
        "single": [EntryRequest(first, 1, LedgerReason.PURCHASE, "one")],
        "distinct": [
            EntryRequest(first, 1, LedgerReason.PURCHASE, "d1"),
            EntryRequest(second, 1, LedgerReason.PURCHASE, "d2"),
        ],
        "loop": [
            EntryRequest(first, 1, LedgerReason.PURCHASE, "l1"),
            EntryRequest(first, 1, LedgerReason.PURCHASE, "l2"),
        ],
    }
    for caller, requests in paths.items():
        outcomes = await ledger.append(token_store, requests, caller)
        assert [o.entry.created_by for o in outcomes if o.entry is not None] == [caller] * len(requests)
        # A replay is answered with the first writer, and not counted again.
        replays = await ledger.append(token_store, requests, "someone-else")
        assert all(o.replayed and o.entry is not None and o.entry.created_by == caller for o in replays)
    assert counted(LedgerReason.PURCHASE) - before == 5
    rows = await admin.fetch(
        "SELECT reference_id, created_by FROM token.token_ledger"
        " WHERE user_id = ANY($1::uuid[]) AND reason = 'PURCHASE'",
        [first, second],
    )
    writers = {row["reference_id"]: row["created_by"] for row in rows}
    assert writers == {"one": "single", "d1": "distinct", "d2": "distinct", "l1": "loop", "l2": "loop"}


async def test_group_commit_groups_by_caller(token: TokenStub, admin: asyncpg.Connection, token_store: Store) -> None:
    """Concurrent appends to one account from two callers: each entry names its own caller."""
    user_id = uuid.UUID(await support.user_with_balance(token, 1000))
    commit = GroupCommit(token_store)
    calls = [(f"caller-{n % 2}", EntryRequest(user_id, -1, LedgerReason.GENERATION, f"job-{n}")) for n in range(60)]
    outcomes = await asyncio.gather(*(commit.append(request, caller) for caller, request in calls))
    assert all(o.entry is not None for o in outcomes)
    rows = await admin.fetch(
        "SELECT reference_id, created_by FROM token.token_ledger WHERE user_id = $1 AND reason = 'GENERATION'", user_id
    )
    assert {row["reference_id"]: row["created_by"] for row in rows} == {r.reference_id: c for c, r in calls}
    await assert_ledger_consistent(token, admin, str(user_id))
