"""The ledger's vocabulary: requested entries, written entries, and what each came to.

The rules themselves run in the database, in the function token.append_entries
(migration 20261125000003), so that one call applies a whole batch in one round trip
with the accounts locked. Here each outcome it reports becomes an entry or an error.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import grpc

from blumpo_common.errors import ServiceError, not_found

MAX_DELTA = 10**12
# The most a credit may bring a balance to (a refund: twice that), far below int64.
MAX_BALANCE = 10**15
MAX_REFERENCE_LENGTH = 200


@dataclass(frozen=True)
class EntryRequest:
    user_id: uuid.UUID
    delta: int
    reason: str
    reference_id: str


@dataclass(frozen=True)
class Entry:
    id: uuid.UUID
    user_id: uuid.UUID
    delta: int
    reason: str
    reference_id: str
    balance_after: int
    occurred_at: datetime


@dataclass(frozen=True)
class Outcome:
    """What one requested entry came to: an entry (maybe replayed) or an error."""

    entry: Entry | None = None
    replayed: bool = False
    error: ServiceError | None = None


def entry_of(row: asyncpg.Record) -> Entry:
    return Entry(
        id=row["entry_id"],
        user_id=row["user_id"],
        delta=row["delta"],
        reason=row["reason"],
        reference_id=row["reference_id"],
        balance_after=row["balance_after"],
        occurred_at=row["occurred_at"],
    )


def outcome_of(row: asyncpg.Record) -> Outcome:
    """An Outcome from a row of token.append_entries."""
    match row["outcome"]:
        case "APPLIED":
            return Outcome(entry=entry_of(row))
        case "REPLAYED":
            return Outcome(entry=entry_of(row), replayed=True)
        case "REUSED":
            return Outcome(error=_reference_reused(entry_of(row)))
        case "INSUFFICIENT":
            return Outcome(error=_insufficient(row["balance"], -row["delta"]))
        case "BALANCE_LIMIT":
            return Outcome(
                error=ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "BALANCE_LIMIT_EXCEEDED",
                    f"the balance would exceed {MAX_BALANCE}",
                    {"balance": str(row["balance"]), "limit": str(MAX_BALANCE)},
                )
            )
        case "NO_ACCOUNT":
            return Outcome(error=not_found("account", str(row["user_id"])))
    raise AssertionError(f"unknown ledger outcome {row['outcome']!r}")


def _insufficient(balance: int, requested: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_TOKENS",
        f"the balance is {balance} tokens, {requested} requested",
        {"balance": str(balance), "requested": str(requested)},
    )


def _reference_reused(earlier: Entry) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        f"reference_id {earlier.reference_id!r} was already used with delta {earlier.delta} "
        f"and reason {earlier.reason}; use a new reference for a different entry",
        {"reference_id": earlier.reference_id, "delta": str(earlier.delta), "reason": earlier.reason},
    )
