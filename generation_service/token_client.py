"""The token service as the generation service sees it: debits and refunds of jobs.

Every call carries a deadline and is retried (same reference, so idempotent) only
on UNAVAILABLE and DEADLINE_EXCEEDED. The answer is an Outcome the saga can act on:
done (possibly replayed), refused for good (nothing was written), or unknown.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from google.rpc import error_details_pb2

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import logs, retry
from blumpo_common.errors import detail_of

# Answers that mean the token service judged the call and wrote nothing.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


class Result(enum.Enum):
    DONE = "DONE"
    # Judged and refused: no entry was written for the reference.
    REFUSED = "REFUSED"
    # No answer (down, timed out, or an unexpected error): the entry may or may not exist.
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Outcome:
    result: Result
    replayed: bool = False
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""
    message: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


def debit_reference(job_id: uuid.UUID) -> str:
    return str(job_id)


def refund_reference(job_id: uuid.UUID) -> str:
    return f"{job_id}:refund"


class TokenLedger(Protocol):
    """What the charge saga needs of the token service (TokenClient; a fake in tests)."""

    async def debit(self, user_id: uuid.UUID, job_id: uuid.UUID, cost: int) -> Outcome: ...

    async def refund(self, user_id: uuid.UUID, job_id: uuid.UUID, cost: int) -> Outcome: ...

    async def plan(self, user_id: uuid.UUID) -> str | Outcome: ...


class TokenClient:
    def __init__(self, stub: token_pb2_grpc.TokenServiceAsyncStub, policy: retry.RetryPolicy) -> None:
        self.stub = stub
        self.policy = policy

    async def debit(self, user_id: uuid.UUID, job_id: uuid.UUID, cost: int) -> Outcome:
        """Charges a job's cost once (reference = the job id)."""
        return await self._append(user_id, -cost, tpb.LEDGER_REASON_GENERATION, debit_reference(job_id))

    async def refund(self, user_id: uuid.UUID, job_id: uuid.UUID, cost: int) -> Outcome:
        """Gives a failed job's cost back once (reference = `<job id>:refund`)."""
        return await self._append(user_id, cost, tpb.LEDGER_REASON_GENERATION_REFUND, refund_reference(job_id))

    async def plan(self, user_id: uuid.UUID) -> str | Outcome:
        """The code of the user's plan (GetTokenBalance), or the Outcome of a failed call."""
        request = tpb.GetTokenBalanceRequest(user_id=str(user_id))

        async def attempt(timeout: float) -> tpb.GetTokenBalanceResponse:
            return await self.stub.GetTokenBalance(request, timeout=timeout, metadata=_request_metadata())

        try:
            response = await retry.call(self.policy, attempt)
        except grpc.aio.AioRpcError as exc:
            return _failure(exc)
        return response.plan

    async def _append(
        self, user_id: uuid.UUID, delta: int, reason: tpb.LedgerReason.ValueType, reference: str
    ) -> Outcome:
        request = tpb.AppendLedgerEntryRequest(user_id=str(user_id), delta=delta, reason=reason, reference_id=reference)

        async def attempt(timeout: float) -> tpb.AppendLedgerEntryResponse:
            return await self.stub.AppendLedgerEntry(request, timeout=timeout, metadata=_request_metadata())

        try:
            response = await retry.call(self.policy, attempt)
        except grpc.aio.AioRpcError as exc:
            return _failure(exc)
        return Outcome(Result.DONE, replayed=response.replayed)


def _request_metadata() -> tuple[tuple[str, str], ...] | None:
    """The request id of the call being served goes along, so both services log it."""
    return (("x-request-id", logs.request_id.get()),) if logs.request_id.get() else None


def _failure(exc: grpc.aio.AioRpcError) -> Outcome:
    code = exc.code()
    info = detail_of(exc, error_details_pb2.ErrorInfo)
    result = Result.REFUSED if code in _REFUSALS else Result.UNKNOWN
    return Outcome(
        result,
        code=code,
        reason=info.reason if info else "",
        message=exc.details() or "",
        metadata=dict(info.metadata) if info else {},
    )
