"""AppendLedgerEntries: per-entry results in order, each as AppendLedgerEntry would answer."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub

OK = grpc.StatusCode.OK.value[0]
ADJ = tpb.LEDGER_REASON_ADJUSTMENT


def entry(
    user_id: str, delta: int, reference_id: str, reason: tpb.LedgerReason.ValueType = ADJ
) -> tpb.AppendLedgerEntryRequest:
    return tpb.AppendLedgerEntryRequest(user_id=user_id, delta=delta, reason=reason, reference_id=reference_id)


def details(status: status_pb2.Status) -> tuple[str, dict[str, str], list[str]]:
    """(ErrorInfo reason, ErrorInfo metadata, BadRequest fields) of a result's status."""
    reason, metadata, fields = "", {}, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "blumpo.token"
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, metadata, fields


async def single(token: TokenStub, request: tpb.AppendLedgerEntryRequest) -> tuple[int, str, dict[str, str], bool, int]:
    """What AppendLedgerEntry answers: (code, reason, metadata, replayed, balance_after)."""
    try:
        response = await token.AppendLedgerEntry(request)
    except grpc.aio.AioRpcError as error:
        info = support.error_info(error)
        return error.code().value[0], info.reason, dict(info.metadata), False, -1
    return OK, "", {}, response.replayed, response.entry.balance_after


def batch_outcome(result: tpb.AppendLedgerEntryResult) -> tuple[int, str, dict[str, str], bool, int]:
    reason, metadata, _ = details(result.status)
    if result.status.code == OK:
        return OK, "", {}, result.replayed, result.entry.balance_after
    assert not result.HasField("entry")
    return result.status.code, reason, metadata, False, -1


def mixed_batch(a: str, b: str, missing: str) -> list[tpb.AppendLedgerEntryRequest]:
    return [
        entry(a, 5, "r1"),  # good: 100 -> 105
        entry(a, 5, "r1"),  # the same again in the batch: replayed
        entry(a, 7, "r1"),  # same reference, other delta: IDEMPOTENCY_KEY_REUSED
        entry(a, 5, "r1", tpb.LEDGER_REASON_PURCHASE),  # same reference, other reason: IDEMPOTENCY_KEY_REUSED
        entry(a, 3, "before"),  # written before the batch: replayed
        entry(b, -50, "d1"),  # 10 - 50: INSUFFICIENT_TOKENS
        entry(b, -10, "d2"),  # good: 10 -> 0
        entry(b, -1, "d3"),  # sees d2: INSUFFICIENT_TOKENS
        entry(missing, 5, "x"),  # NOT_FOUND
        tpb.AppendLedgerEntryRequest(user_id="not-a-uuid", delta=0, reference_id=""),  # INVALID_ARGUMENT
        entry(a, -105, "d4"),  # good: 105 -> 0
        entry(b, 1, "c1\x00"),  # non-printable reference: INVALID_ARGUMENT
    ]


async def two_accounts(token: TokenStub) -> tuple[str, str]:
    a = await support.user_with_balance(token, 100)
    b = await support.user_with_balance(token, 10)
    await token.AppendLedgerEntry(entry(a, 3, "before"))
    await token.AppendLedgerEntry(entry(a, -3, "before-undo"))
    return a, b


async def test_mixed_batch_matches_the_single_entry_rules(token: TokenStub, admin: asyncpg.Connection) -> None:
    missing = str(uuid.uuid4())
    a, b = await two_accounts(token)
    response = await token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=mixed_batch(a, b, missing)))
    batch = [batch_outcome(r) for r in response.results]

    # The same entries one by one, on twin accounts in the same state.
    a2, b2 = await two_accounts(token)
    twins = {a: a2, b: b2, missing: missing}
    one_by_one = []
    for request in mixed_batch(a, b, missing):
        twin = tpb.AppendLedgerEntryRequest()
        twin.CopyFrom(request)
        twin.user_id = twins.get(request.user_id, request.user_id)
        one_by_one.append(await single(token, twin))

    def comparable(outcome: tuple[int, str, dict[str, str], bool, int]) -> tuple[object, ...]:
        code, reason, metadata, replayed, balance_after = outcome
        # NOT_FOUND's metadata names the user, which differs between the twins.
        return code, reason, metadata if reason != "ACCOUNT_NOT_FOUND" else {}, replayed, balance_after

    assert [comparable(o) for o in batch] == [comparable(o) for o in one_by_one]
    assert [o[0] for o in batch] == [
        OK,
        OK,
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        OK,
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        OK,
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        OK,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    results = list(response.results)
    assert [r.replayed for r in results] == [False, True, False, False, True] + [False] * 7
    assert results[1].entry == results[0].entry
    assert batch[2][1] == "IDEMPOTENCY_KEY_REUSED"
    assert batch[5][1:3] == ("INSUFFICIENT_TOKENS", {"balance": "10", "requested": "50"})
    assert batch[7][1:3] == ("INSUFFICIENT_TOKENS", {"balance": "0", "requested": "1"})
    assert details(results[9].status)[2] == [
        "entries[9].user_id",
        "entries[9].delta",
        "entries[9].reason",
        "entries[9].reference_id",
    ]
    assert details(results[11].status)[2] == ["entries[11].reference_id"]

    # The ledger after: what the results say, and nothing else.
    assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=a))).balance == 0
    assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=b))).balance == 0
    written = await admin.fetch(
        "SELECT id, reference_id FROM token.token_ledger WHERE user_id = ANY($1::uuid[]) AND reference_id <> ALL($2)",
        [a, b],
        ["signup", "before", "before-undo"],
    )
    assert sorted(r["reference_id"] for r in written if not r["reference_id"].startswith("test-setup-")) == [
        "d2",
        "d4",
        "r1",
    ]
    listed = await token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=a))
    assert results[10].entry == listed.entries[0] and results[0].entry == listed.entries[1]
    for user in (a, b):
        checked = await token.CheckBalances(tpb.CheckBalancesRequest(user_id=user))
        assert list(checked.mismatches) == []


@pytest.mark.parametrize("count", [0, 1001])
async def test_batch_size_must_be_1_to_1000(token: TokenStub, admin: asyncpg.Connection, count: int) -> None:
    user = await support.user_with_balance(token, 10)
    before = await support.row_counts(admin, "token")
    entries = [entry(user, 1, f"n{i}") for i in range(count)]
    error = await support.expect_error(
        token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=entries)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert support.bad_fields(error) == ["entries"]
    assert await support.row_counts(admin, "token") == before


async def test_a_batch_of_1000_entries_for_one_account_applies_in_order(token: TokenStub) -> None:
    user = await support.user_with_balance(token, 0)
    entries = [entry(user, 1 if i % 2 == 0 else -1, f"step-{i}") for i in range(1000)]
    response = await token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=entries))
    assert [r.entry.balance_after for r in response.results] == [1 - i % 2 for i in range(1000)]
    assert all(r.status.code == OK for r in response.results)
    # Replaying the whole batch writes nothing and answers the same entries.
    again = await token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=entries))
    assert all(r.replayed for r in again.results)
    assert [r.entry for r in again.results] == [r.entry for r in response.results]


async def test_concurrent_overlapping_batches_keep_the_ledger_consistent(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    users = [await support.user_with_balance(token, 20) for _ in range(6)]
    rng = random.Random(7)
    batches = []
    for _ in range(16):
        picks = [rng.choice(users) for _pick in range(25)]
        # Shared references across batches: the same key races from several batches.
        batches.append([entry(u, rng.choice([-7, -3, 2, 5]), f"k{rng.randrange(40)}") for u in picks])
    responses = await asyncio.gather(
        *[token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=b)) for b in batches]
    )
    assert all(len(r.results) == 25 for r in responses)
    codes = {r.status.code for resp in responses for r in resp.results}
    assert codes <= {
        OK,
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
    }
    duplicates = await admin.fetchval(
        "SELECT count(*) FROM (SELECT user_id, reference_id FROM token.token_ledger WHERE user_id = ANY($1::uuid[]) "
        "GROUP BY 1, 2 HAVING count(*) > 1) d",
        users,
    )
    assert duplicates == 0
    for user in users:
        checked = await token.CheckBalances(tpb.CheckBalancesRequest(user_id=user))
        assert list(checked.mismatches) == []
        balance = (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user))).balance
        assert balance >= 0
