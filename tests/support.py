"""Helpers for tests: expected errors and their details, users with a balance, a fake clock and mailbox."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common.errors import detail_of
from token_service.otp_sender import DeliveryError

# The async stub classes exist only in the type stubs.
if TYPE_CHECKING:
    GenerationStub: TypeAlias = generation_pb2_grpc.GenerationServiceAsyncStub
    TokenStub: TypeAlias = token_pb2_grpc.TokenServiceAsyncStub
else:
    GenerationStub = generation_pb2_grpc.GenerationServiceStub
    TokenStub = token_pb2_grpc.TokenServiceStub


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call (every error carries one)."""
    info = detail_of(error, error_details_pb2.ErrorInfo)
    assert info is not None, f"no ErrorInfo in {error}"
    return info


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail with code and, when given, the ErrorInfo reason; returns the
    error for the test to look further into."""
    try:
        answer = await call
    except grpc.aio.AioRpcError as caught:
        error = caught
    else:
        pytest.fail(f"expected {code.name}, but the call answered {str(answer)[:500]!r}")
    assert error.code() == code, f"{error.code().name}, expected {code.name}: {error.details()}"
    if reason is not None:
        assert error_info(error).reason == reason, f"{error_info(error).reason}, expected {reason}"
    return error


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields a BadRequest detail names."""
    bad = detail_of(error, error_details_pb2.BadRequest)
    assert bad is not None, f"no BadRequest in {error}"
    return [v.field for v in bad.field_violations]


def new_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


async def user_with_balance(token: TokenStub, balance: int) -> str:
    """A new user whose balance is exactly `balance` (signup grant adjusted)."""
    user = (await token.CreateUser(tpb.CreateUserRequest(email=new_email()))).user
    delta = balance - user.account.balance
    if delta:
        await token.AppendLedgerEntry(
            tpb.AppendLedgerEntryRequest(
                user_id=user.user_id,
                delta=delta,
                reason=tpb.LEDGER_REASON_ADJUSTMENT,
                reference_id=f"test-setup-{uuid.uuid4()}",
            )
        )
    return user.user_id


async def row_counts(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    """Rows per table of a schema, to show that a rejected call wrote nothing."""
    tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1", schema)
    return {t["tablename"]: await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{t["tablename"]}"') for t in tables}


class FakeClock:
    """A clock that moves only when a test advances it."""

    def __init__(self) -> None:
        self.current = datetime.now(UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


@dataclass
class CapturingSender:
    """Keeps the codes it is given, as a mailbox would; fail=True simulates a delivery outage."""

    sent: list[tuple[str, str]] = field(default_factory=list)
    fail: bool = False

    async def send(self, email: str, code: str, expires_at: datetime) -> None:
        if self.fail:
            raise DeliveryError("simulated outage")
        self.sent.append((email, code))

    def last_code(self, email: str) -> str:
        return [code for to, code in self.sent if to == email.strip().lower()][-1]


@dataclass
class OtpHarness:
    """A token server whose OTP login runs on a fake clock and a capturing sender."""

    token: TokenStub
    clock: FakeClock
    sender: CapturingSender
    secret: bytes


def retry_delay_seconds(error: grpc.aio.AioRpcError) -> int:
    """The google.rpc.RetryInfo delay of a failed call."""
    info = detail_of(error, error_details_pb2.RetryInfo)
    assert info is not None, f"no RetryInfo in {error}"
    return int(info.retry_delay.seconds)


async def open_accounts_long_ago(conn: asyncpg.Connection) -> None:
    """Backdates every account to 2000, so a refill of any past month finds them all open then."""
    await conn.execute(
        "UPDATE token.token_account SET created_at = '2000-01-01T00:00:00Z' WHERE created_at > '2000-01-01T00:00:00Z'"
    )
