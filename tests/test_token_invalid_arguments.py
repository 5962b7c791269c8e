"""Bad input to the accounts RPCs: INVALID_ARGUMENT naming each bad field, nothing written."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub

GOOD_EMAIL = "someone@example.com"
GOOD_ID = str(uuid.uuid4())

CASES: list[tuple[str, Any, list[str]]] = [
    ("RequestOtp", tpb.RequestOtpRequest(email=""), ["email"]),
    ("RequestOtp", tpb.RequestOtpRequest(email="not-an-email"), ["email"]),
    ("RequestOtp", tpb.RequestOtpRequest(email="a" * 250 + "@example.com"), ["email"]),
    ("VerifyOtp", tpb.VerifyOtpRequest(), ["email", "code"]),
    ("VerifyOtp", tpb.VerifyOtpRequest(email="nobody", code="123456"), ["email"]),
    ("VerifyOtp", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="12345"), ["code"]),
    ("VerifyOtp", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="1234567"), ["code"]),
    ("VerifyOtp", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="12a456"), ["code"]),
    ("VerifyOtp", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code=" 12345"), ["code"]),
    ("VerifyOtp", tpb.VerifyOtpRequest(email=GOOD_EMAIL, code="١٢٣٤٥٦"), ["code"]),
    ("DeleteExpiredOtps", tpb.DeleteExpiredOtpsRequest(older_than_hours=-1), ["older_than_hours"]),
    ("DeleteExpiredOtps", tpb.DeleteExpiredOtpsRequest(older_than_hours=24 * 366 + 1), ["older_than_hours"]),
    ("RunMonthlyRefill", tpb.RunMonthlyRefillRequest(period="2026-13"), ["period"]),
    ("ChangePlan", tpb.ChangePlanRequest(), ["user_id", "plan"]),
    ("ChangePlan", tpb.ChangePlanRequest(user_id="x", plan="pro"), ["user_id"]),
    ("ChangePlan", tpb.ChangePlanRequest(user_id=GOOD_ID.upper(), plan="pro"), ["user_id"]),
    ("ChangePlan", tpb.ChangePlanRequest(user_id=GOOD_ID, plan="p" * 33), ["plan"]),
    ("ChangePlan", tpb.ChangePlanRequest(user_id=GOOD_ID, plan="nope"), ["plan"]),
    ("AppendLedgerEntries", tpb.AppendLedgerEntriesRequest(), ["entries"]),
]


@pytest.mark.parametrize(("method", "request_message", "fields"), CASES)
async def test_bad_input_is_invalid_argument_and_writes_nothing(
    token: TokenStub, admin: asyncpg.Connection, method: str, request_message: Any, fields: list[str]
) -> None:
    before = await support.row_counts(admin, "token")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(token, method)(request_message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert support.error_info(caught.value).domain == "blumpo.token"
    assert support.bad_fields(caught.value) == fields
    assert await support.row_counts(admin, "token") == before
