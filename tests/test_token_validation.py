"""Bad input: each field of each TokenService request, given a bad value, is INVALID_ARGUMENT naming
that field, and the database is left unchanged."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub

GOOD_ID = str(uuid.uuid4())
GOOD_EMAIL = "someone@example.com"
BAD_IDS = ["", "not-a-uuid", GOOD_ID.upper(), GOOD_ID.replace("-", ""), "{" + GOOD_ID + "}"]


def append(**fields: Any) -> tpb.AppendLedgerEntryRequest:
    request: dict[str, Any] = {
        "user_id": GOOD_ID,
        "delta": -1,
        "reason": tpb.LEDGER_REASON_GENERATION,
        "reference_id": "ref-1",
    }
    return tpb.AppendLedgerEntryRequest(**(request | fields))


CASES: list[tuple[str, str, Any, list[str]]] = [
    # (rpc, label, request, field named)
    ("CreateUser", "empty email", tpb.CreateUserRequest(email=""), ["email"]),
    ("CreateUser", "email without @", tpb.CreateUserRequest(email="ann.example.com"), ["email"]),
    ("CreateUser", "email without domain", tpb.CreateUserRequest(email="ann@"), ["email"]),
    ("CreateUser", "email too long", tpb.CreateUserRequest(email="a" * 250 + "@example.com"), ["email"]),
    ("CreateUser", "unknown plan", tpb.CreateUserRequest(email="new-user@example.com", plan="gold"), ["plan"]),
    ("CreateUser", "overlong plan", tpb.CreateUserRequest(email="new-user@example.com", plan="p" * 40), ["plan"]),
    ("GetUser", "neither id nor email", tpb.GetUserRequest(), ["user_id"]),
    ("GetUser", "bad email", tpb.GetUserRequest(email="nope"), ["email"]),
    ("GetTokenBalance", "no id", tpb.GetTokenBalanceRequest(), ["user_id"]),
    ("AppendLedgerEntry", "zero delta", append(delta=0), ["delta"]),
    ("AppendLedgerEntry", "delta over 10^12", append(delta=10**12 + 1), ["delta"]),
    ("AppendLedgerEntry", "delta under -10^12", append(delta=-(10**12) - 1), ["delta"]),
    ("AppendLedgerEntry", "unspecified reason", append(reason=tpb.LEDGER_REASON_UNSPECIFIED), ["reason"]),
    ("AppendLedgerEntry", "unknown reason", append(reason=99), ["reason"]),
    ("AppendLedgerEntry", "empty reference", append(reference_id=""), ["reference_id"]),
    ("AppendLedgerEntry", "overlong reference", append(reference_id="r" * 201), ["reference_id"]),
    ("AppendLedgerEntry", "unprintable reference", append(reference_id="job\n1"), ["reference_id"]),
    ("AppendLedgerEntries", "no entries", tpb.AppendLedgerEntriesRequest(), ["entries"]),
    ("AppendLedgerEntries", "too many entries", tpb.AppendLedgerEntriesRequest(entries=[append()] * 1001), ["entries"]),
    ("ListLedgerEntries", "no id", tpb.ListLedgerEntriesRequest(), ["user_id"]),
    (
        "ListLedgerEntries",
        "negative page size",
        tpb.ListLedgerEntriesRequest(user_id=GOOD_ID, page_size=-1),
        ["page_size"],
    ),
    (
        "ListLedgerEntries",
        "page size over 500",
        tpb.ListLedgerEntriesRequest(user_id=GOOD_ID, page_size=501),
        ["page_size"],
    ),
    (
        "ListLedgerEntries",
        "garbage page token",
        tpb.ListLedgerEntriesRequest(user_id=GOOD_ID, page_token="%%%"),
        ["page_token"],
    ),
    ("CheckBalances", "bad id", tpb.CheckBalancesRequest(user_id="42"), ["user_id"]),
    ("RequestOtp", "empty email", tpb.RequestOtpRequest(email=""), ["email"]),
    ("RequestOtp", "bad email", tpb.RequestOtpRequest(email="not-an-email"), ["email"]),
    ("RequestOtp", "email too long", tpb.RequestOtpRequest(email="a" * 250 + "@example.com"), ["email"]),
    ("VerifyOtp", "nothing", tpb.VerifyOtpRequest(), ["email", "code"]),
    ("VerifyOtp", "bad email", tpb.VerifyOtpRequest(email="nobody", code="123456"), ["email"]),
    ("VerifyOtp", "5 digits", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="12345"), ["code"]),
    ("VerifyOtp", "7 digits", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="1234567"), ["code"]),
    ("VerifyOtp", "a letter", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="12a456"), ["code"]),
    ("VerifyOtp", "a space", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code=" 12345"), ["code"]),
    ("VerifyOtp", "non-ASCII digits", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="١٢٣٤٥٦"), ["code"]),
    ("DeleteExpiredOtps", "negative hours", tpb.DeleteExpiredOtpsRequest(older_than_hours=-1), ["older_than_hours"]),
    (
        "DeleteExpiredOtps",
        "over a year",
        tpb.DeleteExpiredOtpsRequest(older_than_hours=24 * 366 + 1),
        ["older_than_hours"],
    ),
    ("RunMonthlyRefill", "month 13", tpb.RunMonthlyRefillRequest(period="2026-13"), ["period"]),
    ("ChangePlan", "nothing", tpb.ChangePlanRequest(), ["user_id", "plan"]),
    ("ChangePlan", "bad id", tpb.ChangePlanRequest(user_id="x", plan="pro"), ["user_id"]),
    ("ChangePlan", "upper-case id", tpb.ChangePlanRequest(user_id=GOOD_ID.upper(), plan="pro"), ["user_id"]),
    ("ChangePlan", "overlong plan", tpb.ChangePlanRequest(user_id=GOOD_ID, plan="p" * 33), ["plan"]),
    ("ChangePlan", "unknown plan", tpb.ChangePlanRequest(user_id=GOOD_ID, plan="nope"), ["plan"]),
]
ID_REQUESTS: dict[str, Callable[[str], Any]] = {
    "GetUser": lambda v: tpb.GetUserRequest(user_id=v),
    "GetTokenBalance": lambda v: tpb.GetTokenBalanceRequest(user_id=v),
    "AppendLedgerEntry": lambda v: append(user_id=v),
    "ListLedgerEntries": lambda v: tpb.ListLedgerEntriesRequest(user_id=v),
    "CheckBalances": lambda v: tpb.CheckBalancesRequest(user_id=v),
}
ID_CASES: list[tuple[str, str, Any, list[str]]] = [
    (rpc, f"user_id {bad!r}", make(bad), ["user_id"]) for bad in BAD_IDS[1:] for rpc, make in ID_REQUESTS.items()
] + [("AppendLedgerEntry", "empty user_id", append(user_id=""), ["user_id"])]


@pytest.mark.parametrize(
    ("rpc", "label", "request_", "fields"), CASES + ID_CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES + ID_CASES]
)
async def test_bad_field_is_invalid_argument_naming_it(
    token: TokenStub, admin: asyncpg.Connection, rpc: str, label: str, request_: Any, fields: list[str]
) -> None:
    call: Callable[[Any], Awaitable[Any]] = getattr(token, rpc)
    before = await support.row_counts(admin, "token")
    error = await support.expect_error(call(request_), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert support.error_info(error).domain == "blumpo.token"
    assert support.bad_fields(error) == fields
    assert all(field in (error.details() or "") for field in fields)
    assert await support.row_counts(admin, "token") == before


async def test_every_bad_field_is_named_at_once(token: TokenStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await token.AppendLedgerEntry(tpb.AppendLedgerEntryRequest())
    assert support.bad_fields(caught.value) == ["user_id", "delta", "reason", "reference_id"]
