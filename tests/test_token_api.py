"""Each implemented TokenService RPC: its happy path and every error code of the contract."""

from __future__ import annotations

import unicodedata
import uuid

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub


def entry(
    user_id: str, delta: int, reference_id: str, reason: tpb.LedgerReason.ValueType = tpb.LEDGER_REASON_ADJUSTMENT
) -> tpb.AppendLedgerEntryRequest:
    return tpb.AppendLedgerEntryRequest(user_id=user_id, delta=delta, reason=reason, reference_id=reference_id)


async def test_create_user_normalizes_email_and_grants_signup_bonus(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    user = (await token.CreateUser(tpb.CreateUserRequest(email=f"  {email.upper()} "))).user
    assert user.email == email
    assert uuid.UUID(user.user_id).version == 4
    assert user.account.plan == "free"
    assert user.account.balance == 100
    assert user.created_at.seconds > 0
    rows = await admin.fetch(
        "SELECT reason, delta, reference_id FROM token.token_ledger WHERE user_id = $1", uuid.UUID(user.user_id)
    )
    assert [tuple(r) for r in rows] == [("SIGNUP_BONUS", 100, "signup")]


async def test_create_user_on_pro_plan(token: TokenStub) -> None:
    user = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email(), plan="pro"))).user
    assert user.account.plan == "pro"


async def test_create_user_with_taken_email_is_already_exists(token: TokenStub, admin: asyncpg.Connection) -> None:
    email = support.new_email()
    await token.CreateUser(tpb.CreateUserRequest(email=email))
    before = await support.row_counts(admin, "token")
    error = await support.expect_error(
        token.CreateUser(tpb.CreateUserRequest(email=email.upper())), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN"
    )
    assert support.error_info(error).domain == "blumpo.token"
    assert await support.row_counts(admin, "token") == before


async def test_create_user_with_unknown_plan_is_invalid_and_writes_nothing(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    before = await support.row_counts(admin, "token")
    error = await support.expect_error(
        token.CreateUser(tpb.CreateUserRequest(email=support.new_email(), plan="platinum")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert support.bad_fields(error) == ["plan"]
    assert await support.row_counts(admin, "token") == before


async def test_get_user_by_id_and_by_email(token: TokenStub) -> None:
    created = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user
    by_id = (await token.GetUser(tpb.GetUserRequest(user_id=created.user_id))).user
    by_email = (await token.GetUser(tpb.GetUserRequest(email=created.email.upper()))).user
    assert by_id == created
    assert by_email == created


async def test_get_user_reflects_the_current_balance(token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 40)
    user = (await token.GetUser(tpb.GetUserRequest(user_id=user_id))).user
    assert user.account.balance == 40


@pytest.mark.parametrize(
    "request_", [tpb.GetUserRequest(user_id=str(uuid.uuid4())), tpb.GetUserRequest(email="nobody@example.com")]
)
async def test_get_unknown_user_is_not_found(token: TokenStub, request_: tpb.GetUserRequest) -> None:
    await support.expect_error(token.GetUser(request_), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


async def test_get_token_balance(token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 75)
    balance = await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))
    assert (balance.user_id, balance.balance, balance.plan) == (user_id, 75, "free")


async def test_get_token_balance_of_unknown_user_is_not_found(token: TokenStub) -> None:
    await support.expect_error(
        token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=str(uuid.uuid4()))),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )


async def test_append_debit_and_credit(token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 100)
    debit = await token.AppendLedgerEntry(entry(user_id, -30, "job-1", tpb.LEDGER_REASON_GENERATION))
    assert not debit.replayed
    assert (debit.entry.delta, debit.entry.balance_after, debit.entry.reason) == (-30, 70, tpb.LEDGER_REASON_GENERATION)
    assert (debit.entry.user_id, debit.entry.reference_id) == (user_id, "job-1")
    assert debit.entry.occurred_at.seconds > 0
    credit = await token.AppendLedgerEntry(entry(user_id, 500, "purchase-1", tpb.LEDGER_REASON_PURCHASE))
    assert credit.entry.balance_after == 570
    balance = await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))
    assert balance.balance == 570


async def test_append_same_reference_replays_without_writing(token: TokenStub, admin: asyncpg.Connection) -> None:
    user_id = await support.user_with_balance(token, 100)
    first = await token.AppendLedgerEntry(entry(user_id, -10, "job-2", tpb.LEDGER_REASON_GENERATION))
    before = await support.row_counts(admin, "token")
    again = await token.AppendLedgerEntry(entry(user_id, -10, "job-2", tpb.LEDGER_REASON_GENERATION))
    assert again.replayed
    assert again.entry == first.entry
    assert await support.row_counts(admin, "token") == before
    assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance == 90


@pytest.mark.parametrize(
    ("delta", "reason"), [(-11, tpb.LEDGER_REASON_GENERATION), (-10, tpb.LEDGER_REASON_ADJUSTMENT)]
)
async def test_append_same_reference_with_other_delta_or_reason_is_rejected(
    token: TokenStub, admin: asyncpg.Connection, delta: int, reason: tpb.LedgerReason.ValueType
) -> None:
    user_id = await support.user_with_balance(token, 100)
    await token.AppendLedgerEntry(entry(user_id, -10, "job-3", tpb.LEDGER_REASON_GENERATION))
    before = await support.row_counts(admin, "token")
    await support.expect_error(
        token.AppendLedgerEntry(entry(user_id, delta, "job-3", reason)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert await support.row_counts(admin, "token") == before


async def test_append_beyond_balance_is_insufficient_tokens(token: TokenStub, admin: asyncpg.Connection) -> None:
    user_id = await support.user_with_balance(token, 25)
    before = await support.row_counts(admin, "token")
    error = await support.expect_error(
        token.AppendLedgerEntry(entry(user_id, -26, "job-4", tpb.LEDGER_REASON_GENERATION)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_TOKENS",
    )
    assert dict(support.error_info(error).metadata) == {"balance": "25", "requested": "26"}
    assert await support.row_counts(admin, "token") == before
    # The whole balance can be spent, to exactly zero.
    spent = await token.AppendLedgerEntry(entry(user_id, -25, "job-5", tpb.LEDGER_REASON_GENERATION))
    assert spent.entry.balance_after == 0


async def test_append_for_unknown_user_is_not_found(token: TokenStub) -> None:
    await support.expect_error(
        token.AppendLedgerEntry(entry(str(uuid.uuid4()), 5, "gift")), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"
    )


async def test_list_ledger_entries_pages_newest_first(token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 100)
    for n in range(7):
        await token.AppendLedgerEntry(entry(user_id, -1, f"job-{n}", tpb.LEDGER_REASON_GENERATION))
    seen: list[str] = []
    token_ = ""
    pages = 0
    while True:
        page = await token.ListLedgerEntries(
            tpb.ListLedgerEntriesRequest(user_id=user_id, page_size=3, page_token=token_)
        )
        seen += [e.reference_id for e in page.entries]
        pages += 1
        token_ = page.next_page_token
        if not token_:
            break
    assert pages == 3
    assert seen == [f"job-{n}" for n in reversed(range(7))] + ["signup"]
    everything = await token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user_id))
    assert [e.reference_id for e in everything.entries] == seen
    assert everything.next_page_token == ""
    assert [e.balance_after for e in everything.entries][:3] == [93, 94, 95]


@pytest.mark.parametrize("spoiled", ["tampered", "foreign", "garbage"])
async def test_list_ledger_entries_rejects_a_tampered_or_foreign_page_token(token: TokenStub, spoiled: str) -> None:
    user_id = await support.user_with_balance(token, 100)
    for n in range(3):
        await token.AppendLedgerEntry(entry(user_id, -1, f"job-{n}"))
    page = await token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user_id, page_size=1))
    other_user = await support.user_with_balance(token, 100)
    tampered = page.next_page_token[:-2] + ("A" if page.next_page_token[-2] != "A" else "B") + page.next_page_token[-1]
    user, page_token = {
        "tampered": (user_id, tampered),
        "foreign": (other_user, page.next_page_token),
        "garbage": (user_id, "not-a-token"),
    }[spoiled]
    error = await support.expect_error(
        token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user, page_token=page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert support.bad_fields(error) == ["page_token"]


async def test_list_ledger_entries_of_unknown_user_is_not_found(token: TokenStub) -> None:
    await support.expect_error(
        token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=str(uuid.uuid4()))), grpc.StatusCode.NOT_FOUND
    )


async def test_check_balances_finds_no_mismatch_then_finds_a_corrupted_account(
    token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 60)
    one = await token.CheckBalances(tpb.CheckBalancesRequest(user_id=user_id))
    assert (one.accounts_checked, list(one.mismatches)) == (1, [])
    everyone = await token.CheckBalances(tpb.CheckBalancesRequest())
    assert everyone.accounts_checked == await admin.fetchval("SELECT count(*) FROM token.token_account")
    assert list(everyone.mismatches) == []
    # Corrupt the balance behind the ledger's back (as only a superuser can), then restore it.
    await admin.execute("UPDATE token.token_account SET balance = 61 WHERE user_id = $1", uuid.UUID(user_id))
    try:
        found = await token.CheckBalances(tpb.CheckBalancesRequest())
        assert [(m.user_id, m.account_balance, m.ledger_sum, m.last_balance_after) for m in found.mismatches] == [
            (user_id, 61, 60, 60)
        ]
    finally:
        await admin.execute("UPDATE token.token_account SET balance = 60 WHERE user_id = $1", uuid.UUID(user_id))


async def test_check_balances_of_unknown_user_is_not_found(token: TokenStub) -> None:
    await support.expect_error(
        token.CheckBalances(tpb.CheckBalancesRequest(user_id=str(uuid.uuid4()))), grpc.StatusCode.NOT_FOUND
    )


async def test_error_messages_name_no_sql(token: TokenStub) -> None:
    error = await support.expect_error(
        token.CreateUser(tpb.CreateUserRequest(email=support.new_email(), plan="x" * 33)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "SELECT" not in (error.details() or "")


async def test_email_is_unicode_normalized_so_one_mailbox_is_one_user(token: TokenStub) -> None:
    """The same address in NFC and NFD form must not become two users (nor two OTP rate limits)."""
    local = f"jos\u00e9-{uuid.uuid4().hex[:8]}"
    composed = f"{local}@example.com"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    await token.CreateUser(tpb.CreateUserRequest(email=composed))
    await support.expect_error(
        token.CreateUser(tpb.CreateUserRequest(email=decomposed)), grpc.StatusCode.ALREADY_EXISTS
    )
