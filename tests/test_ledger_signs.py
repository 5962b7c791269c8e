"""Ledger reasons have a sign, and a refund gives back a debit of the same user, never more."""

from __future__ import annotations

import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub

R = tpb.LedgerReason


def entry(user_id: str, delta: int, reference_id: str, reason: R.ValueType) -> tpb.AppendLedgerEntryRequest:
    return tpb.AppendLedgerEntryRequest(user_id=user_id, delta=delta, reason=reason, reference_id=reference_id)


async def balance(token: TokenStub, user_id: str) -> int:
    return (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance


@pytest.mark.parametrize(
    ("reason", "delta"),
    [
        (tpb.LEDGER_REASON_GENERATION, 5),
        (tpb.LEDGER_REASON_GENERATION_REFUND, -5),
        (tpb.LEDGER_REASON_MONTHLY_REFILL, -5),
        (tpb.LEDGER_REASON_PURCHASE, -5),
        (tpb.LEDGER_REASON_SIGNUP_BONUS, -5),
    ],
)
async def test_a_wrong_sign_is_invalid_argument_naming_delta(token: TokenStub, reason: R.ValueType, delta: int) -> None:
    user_id = await support.user_with_balance(token, 100)
    failure = await support.expect_error(
        token.AppendLedgerEntry(entry(user_id, delta, "wrong-sign", reason)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert support.bad_fields(failure) == ["delta"]
    assert await balance(token, user_id) == 100


@pytest.mark.parametrize(
    ("reason", "delta"),
    [
        (tpb.LEDGER_REASON_GENERATION, -5),
        (tpb.LEDGER_REASON_MONTHLY_REFILL, 5),
        (tpb.LEDGER_REASON_PURCHASE, 5),
        (tpb.LEDGER_REASON_SIGNUP_BONUS, 5),
        (tpb.LEDGER_REASON_ADJUSTMENT, 5),
        (tpb.LEDGER_REASON_ADJUSTMENT, -5),
    ],
)
async def test_the_right_sign_is_applied(token: TokenStub, reason: R.ValueType, delta: int) -> None:
    user_id = await support.user_with_balance(token, 100)
    answer = await token.AppendLedgerEntry(entry(user_id, delta, "right-sign", reason))
    assert answer.entry.balance_after == 100 + delta


async def test_a_batch_refuses_each_wrong_sign_alone(token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 100)
    answer = await token.AppendLedgerEntries(
        tpb.AppendLedgerEntriesRequest(
            entries=[
                entry(user_id, 10, "credit-as-debit", tpb.LEDGER_REASON_GENERATION),
                entry(user_id, -10, "job-1", tpb.LEDGER_REASON_GENERATION),
                entry(user_id, -10, "purchase-as-debit", tpb.LEDGER_REASON_PURCHASE),
            ]
        )
    )
    codes = [r.status.code for r in answer.results]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    for result in (answer.results[0], answer.results[2]):
        assert "delta" in result.status.message
    assert await balance(token, user_id) == 90


async def test_a_refund_gives_back_a_debit_once_and_never_more(token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 100)
    await token.AppendLedgerEntry(entry(user_id, -30, "job-7", tpb.LEDGER_REASON_GENERATION))

    failure = await support.expect_error(
        token.AppendLedgerEntry(entry(user_id, 31, "job-7:refund", tpb.LEDGER_REASON_GENERATION_REFUND)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_UNMATCHED",
    )
    assert support.error_info(failure).metadata["debit"] == "30"

    part = await token.AppendLedgerEntry(entry(user_id, 20, "job-7:refund", tpb.LEDGER_REASON_GENERATION_REFUND))
    assert part.entry.balance_after == 90
    # The reference is spent: the rest of the debit cannot be refunded under another amount.
    await support.expect_error(
        token.AppendLedgerEntry(entry(user_id, 10, "job-7:refund", tpb.LEDGER_REASON_GENERATION_REFUND)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    again = await token.AppendLedgerEntry(entry(user_id, 20, "job-7:refund", tpb.LEDGER_REASON_GENERATION_REFUND))
    assert again.replayed
    assert await balance(token, user_id) == 90


@pytest.mark.parametrize(
    ("debit_reference", "debit_reason", "refund_reference"),
    [
        (None, None, "job-none:refund"),  # no debit at all
        ("job-a", tpb.LEDGER_REASON_GENERATION, "job-a-refund"),  # not a `:refund` reference
        ("job-b", tpb.LEDGER_REASON_GENERATION, "job-b:refund:refund"),  # names another reference
        ("job-c", tpb.LEDGER_REASON_ADJUSTMENT, "job-c:refund"),  # the entry is no GENERATION debit
        ("job-d", tpb.LEDGER_REASON_GENERATION, "job-D:refund"),  # references are exact
    ],
)
async def test_a_refund_without_its_debit_is_refused(
    token: TokenStub, debit_reference: str | None, debit_reason: R.ValueType | None, refund_reference: str
) -> None:
    user_id = await support.user_with_balance(token, 100)
    if debit_reference is not None and debit_reason is not None:
        await token.AppendLedgerEntry(entry(user_id, -30, debit_reference, debit_reason))
    before = await balance(token, user_id)
    await support.expect_error(
        token.AppendLedgerEntry(entry(user_id, 5, refund_reference, tpb.LEDGER_REASON_GENERATION_REFUND)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_UNMATCHED",
    )
    assert await balance(token, user_id) == before


async def test_a_refund_of_another_users_debit_is_refused(token: TokenStub) -> None:
    payer = await support.user_with_balance(token, 100)
    other = await support.user_with_balance(token, 100)
    await token.AppendLedgerEntry(entry(payer, -30, "job-shared", tpb.LEDGER_REASON_GENERATION))
    await support.expect_error(
        token.AppendLedgerEntry(entry(other, 30, "job-shared:refund", tpb.LEDGER_REASON_GENERATION_REFUND)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFUND_UNMATCHED",
    )
    assert await balance(token, other) == 100


async def test_a_debit_and_its_refund_in_one_batch(token: TokenStub) -> None:
    """Entries are applied in order: a refund after its debit in the same batch finds it."""
    user_id = await support.user_with_balance(token, 100)
    answer = await token.AppendLedgerEntries(
        tpb.AppendLedgerEntriesRequest(
            entries=[
                entry(user_id, 5, "job-late:refund", tpb.LEDGER_REASON_GENERATION_REFUND),
                entry(user_id, -5, "job-late", tpb.LEDGER_REASON_GENERATION),
                entry(user_id, 5, "job-late:refund", tpb.LEDGER_REASON_GENERATION_REFUND),
            ]
        )
    )
    assert [r.status.code for r in answer.results] == [grpc.StatusCode.FAILED_PRECONDITION.value[0], 0, 0]
    assert answer.results[2].entry.balance_after == 100
