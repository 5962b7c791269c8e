"""Group commit across accounts: concurrent appends to many accounts share batches, and each
caller still gets the outcome the serial order gives it; a failed batch writes nothing."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import asyncpg
import grpc

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub
from tests.test_token_concurrency import assert_ledger_consistent
from token_service import ledger
from token_service.group_commit import MAX_BATCHES_IN_FLIGHT, STALL_SECONDS, GroupCommit
from token_service.model import EntryRequest, LedgerReason
from token_service.store import Store


class RecordingStore(Store):
    """The real store, recording the accounts of each statement that reaches the database."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[list[uuid.UUID]] = []

    async def append_entry(self, request: EntryRequest, *args: Any, **kwargs: Any) -> Any:
        self.batches.append([request.user_id])
        return await super().append_entry(request, *args, **kwargs)

    async def append_entries(self, requests: Any, *args: Any, **kwargs: Any) -> Any:
        self.batches.append([r.user_id for r in requests])
        return await super().append_entries(requests, *args, **kwargs)

    async def append_distinct_entries(self, requests: Any, *args: Any, **kwargs: Any) -> Any:
        self.batches.append([r.user_id for r in requests])
        return await super().append_distinct_entries(requests, *args, **kwargs)


def serial_outcomes(balance: int, requests: list[EntryRequest]) -> list[tuple[str, int | None]]:
    """What one account's debits come to one after another: ("applied", balance after),
    ("replayed", balance after of the first), or the refusal's reason and None."""
    written: dict[str, tuple[int, int]] = {}
    answers: list[tuple[str, int | None]] = []
    for request in requests:
        if request.reference_id in written:
            delta, after = written[request.reference_id]
            answers.append(("replayed", after) if delta == request.delta else ("IDEMPOTENCY_KEY_REUSED", None))
        elif balance + request.delta < 0:
            answers.append(("INSUFFICIENT_TOKENS", None))
        else:
            balance += request.delta
            written[request.reference_id] = (request.delta, balance)
            answers.append(("applied", balance))
    return answers


async def idle(commit: GroupCommit) -> bool:
    """Whether the group commit comes back to rest (a batch's bookkeeping ends just after its
    callers are answered): nothing queued, ready or out."""
    for _ in range(100):
        if not (commit.queues or commit.ready or commit.sending or commit.fresh):
            return True
        await asyncio.sleep(0.01)
    return False


def answer(outcome: ledger.Outcome) -> tuple[str, int | None]:
    if outcome.error is not None:
        return outcome.error.reason, None
    assert outcome.entry is not None
    return ("replayed" if outcome.replayed else "applied"), outcome.entry.balance_after


async def test_appends_to_many_accounts_share_batches_and_get_their_serial_outcomes(
    token: TokenStub, admin: asyncpg.Connection, token_store: Store
) -> None:
    """600 concurrent appends over 30 accounts: debits past the balances, references sent again
    (with the same delta, or another). Few statements carry them all, most of them many
    accounts; each caller gets what its account's serial order gives it."""
    users = [uuid.UUID(await support.user_with_balance(token, 20)) for _ in range(30)]
    rng = random.Random(11)
    requests = []
    for _ in range(600):
        user_id = rng.choice(users)
        reference = f"job-{rng.randrange(15)}"
        requests.append(EntryRequest(user_id, -rng.choice([1, 2, 3]), LedgerReason.GENERATION, reference))
    store = RecordingStore(token_store.pool, 30.0)
    commit = GroupCommit(store)
    # Tasks start in creation order, so they reach the group commit in that order.
    outcomes = await asyncio.gather(*(commit.append(request, "tests") for request in requests))

    assert len(store.batches) < len(requests) / 10, f"{len(store.batches)} statements: not grouped"
    assert max(len(set(batch)) for batch in store.batches) == len(users), "one batch for many accounts"
    assert await idle(commit)
    for user_id in users:
        mine = [(r, o) for r, o in zip(requests, outcomes, strict=True) if r.user_id == user_id]
        expected = serial_outcomes(20, [r for r, _ in mine])
        assert [answer(o) for _, o in mine] == expected
        await assert_ledger_consistent(token, admin, str(user_id))


async def test_many_concurrent_calls_on_many_accounts_spend_exactly_the_balances(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    """800 concurrent AppendLedgerEntry calls over 20 accounts of 50 tokens: 20 debits of 3 each,
    each sent twice. Every account spends 48 (16 debits, each written once and replayed once)."""
    users = [await support.user_with_balance(token, 50) for _ in range(20)]

    async def debit(user_id: str, reference: str) -> str:
        request = tpb.AppendLedgerEntryRequest(
            user_id=user_id, delta=-3, reason=tpb.LEDGER_REASON_GENERATION, reference_id=reference
        )
        try:
            response = await token.AppendLedgerEntry(request)
        except grpc.aio.AioRpcError as error:
            return str(support.error_info(error).reason)
        return "replayed" if response.replayed else "applied"

    calls = [(u, f"job-{n}") for u in users for n in range(20)] * 2
    random.Random(3).shuffle(calls)
    answers = await asyncio.gather(*(debit(u, ref) for u, ref in calls))
    assert set(answers) <= {"applied", "replayed", "INSUFFICIENT_TOKENS"}
    for user_id in users:
        mine = [a for (u, _), a in zip(calls, answers, strict=True) if u == user_id]
        assert (mine.count("applied"), mine.count("replayed"), mine.count("INSUFFICIENT_TOKENS")) == (16, 16, 8)
        balance = await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))
        assert balance.balance == 2
        await assert_ledger_consistent(token, admin, user_id)


async def test_a_failed_batch_fails_each_caller_and_writes_nothing(
    token: TokenStub, admin: asyncpg.Connection, token_store: Store
) -> None:
    """A batch of many accounts that cannot run answers each caller with the error and writes
    none of it; sent again with the same references, each applies once."""
    users = [uuid.UUID(await support.user_with_balance(token, 10)) for _ in range(5)]

    class FailingStore(Store):
        async def append_distinct_entries(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionResetError("cut")

    requests = [EntryRequest(u, -4, LedgerReason.GENERATION, "job-1") for u in users]
    failing = GroupCommit(FailingStore(token_store.pool, 30.0))
    results = await asyncio.gather(*(failing.append(r, "tests") for r in requests), return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)
    assert await idle(failing)
    written = await admin.fetchval(
        "SELECT count(*) FROM token.token_ledger WHERE user_id = ANY($1::uuid[]) AND reason = 'GENERATION'", users
    )
    assert written == 0

    commit = GroupCommit(token_store)
    again = await asyncio.gather(*(commit.append(r, "tests") for r in requests))
    assert all(o.entry is not None and not o.replayed and o.entry.balance_after == 6 for o in again)
    for user_id in users:
        await assert_ledger_consistent(token, admin, str(user_id))


async def test_an_append_cancelled_while_it_waits_for_the_batch_in_flight_is_not_written(
    token: TokenStub, admin: asyncpg.Connection, token_store: Store
) -> None:
    firsts = [uuid.UUID(await support.user_with_balance(token, 10)) for _ in range(MAX_BATCHES_IN_FLIGHT)]
    second, third = [uuid.UUID(await support.user_with_balance(token, 10)) for _ in range(2)]
    release = asyncio.Event()

    class HeldStore(Store):
        async def append_entry(self, *args: Any, **kwargs: Any) -> Any:
            await release.wait()
            return await super().append_entry(*args, **kwargs)

    commit = GroupCommit(HeldStore(token_store.pool, 30.0))
    # Every batch the caller may have out is out, held (one account's debit a batch).
    held = []
    for user_id in firsts:
        held.append(
            asyncio.create_task(commit.append(EntryRequest(user_id, -1, LedgerReason.GENERATION, "a"), "tests"))
        )
        await asyncio.sleep(STALL_SECONDS + 0.05)  # out, and no longer holding back the next
    waiting = asyncio.create_task(commit.append(EntryRequest(second, -1, LedgerReason.GENERATION, "b"), "tests"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    release.set()
    assert all(outcome.entry is not None for outcome in await asyncio.gather(*held))
    later = await commit.append(EntryRequest(third, -1, LedgerReason.GENERATION, "c"), "tests")
    assert later.entry is not None
    assert waiting.cancelled()
    assert await idle(commit)
    written = await admin.fetch(
        "SELECT user_id FROM token.token_ledger WHERE user_id = ANY($1::uuid[]) AND reason = 'GENERATION'",
        [*firsts, second, third],
    )
    assert sorted(row["user_id"] for row in written) == sorted([*firsts, third])


async def test_an_account_waiting_for_its_lock_holds_up_none_of_the_callers_other_accounts(
    token: TokenStub, admin: asyncpg.Connection, token_store: Store
) -> None:
    """While a session holds one account's row, that account's appends wait, and the same
    caller's appends to other accounts are written meanwhile."""
    locked, others = uuid.UUID(await support.user_with_balance(token, 10)), []
    for _ in range(3):
        others.append(uuid.UUID(await support.user_with_balance(token, 10)))
    commit = GroupCommit(token_store)
    async with admin.transaction():
        await admin.execute("SELECT 1 FROM token.token_account WHERE user_id = $1 FOR UPDATE", locked)
        stuck = asyncio.create_task(commit.append(EntryRequest(locked, -1, LedgerReason.GENERATION, "x"), "tests"))
        await asyncio.sleep(0.1)  # its batch is out, waiting for the row
        for n, user_id in enumerate(others):
            outcome = await asyncio.wait_for(
                commit.append(EntryRequest(user_id, -1, LedgerReason.GENERATION, f"y{n}"), "tests"), 5
            )
            assert outcome.entry is not None and outcome.entry.balance_after == 9
        assert not stuck.done()
    assert (await stuck).entry is not None
    assert await idle(commit)
    for user_id in [locked, *others]:
        await assert_ledger_consistent(token, admin, str(user_id))


async def test_a_batch_cancelled_before_it_starts_leaves_its_accounts_free(
    token: TokenStub, admin: asyncpg.Connection, token_store: Store
) -> None:
    """Shutting down cancels the batches' tasks, maybe before they start: their callers are
    cancelled, and their accounts take appends again."""
    user_id = uuid.UUID(await support.user_with_balance(token, 10))
    entered = asyncio.Event()

    class WatchedStore(Store):
        async def append_entry(self, *args: Any, **kwargs: Any) -> Any:
            entered.set()
            return await super().append_entry(*args, **kwargs)

    commit = GroupCommit(WatchedStore(token_store.pool, 30.0))
    first = asyncio.create_task(commit.append(EntryRequest(user_id, -1, LedgerReason.GENERATION, "a"), "tests"))
    for _ in range(100):  # until the batch's task is made; the loop runs it from the next turn
        if commit.flushes:
            break
        await asyncio.sleep(0)
    [flush] = commit.flushes
    assert not entered.is_set()
    flush.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert first.cancelled()
    later = await asyncio.wait_for(commit.append(EntryRequest(user_id, -1, LedgerReason.GENERATION, "b"), "tests"), 5)
    assert later.entry is not None and later.entry.balance_after == 9
    assert await idle(commit)
    await assert_ledger_consistent(token, admin, str(user_id))
