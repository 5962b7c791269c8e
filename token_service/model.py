"""What the token service's store reads and writes, as typed values.

Each record is built from its row once, at the store boundary (`from_row`), so the rest
of the service handles attributes, never column names. The refusals are facts of the
data, not answers: the callers choose what a refusal means to their own caller.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from blumpo_common.db import Converted, Nested, reader, record


class LedgerReason(enum.StrEnum):
    """Why a ledger entry was written; the value is what token_ledger.reason stores."""

    GENERATION = "GENERATION"
    GENERATION_REFUND = "GENERATION_REFUND"
    MONTHLY_REFILL = "MONTHLY_REFILL"
    PURCHASE = "PURCHASE"
    SIGNUP_BONUS = "SIGNUP_BONUS"
    ADJUSTMENT = "ADJUSTMENT"


class AppendOutcome(enum.StrEnum):
    """What token.append_entries did with one requested entry (see its migration)."""

    APPLIED = "APPLIED"
    REPLAYED = "REPLAYED"
    REUSED = "REUSED"
    INSUFFICIENT = "INSUFFICIENT"
    BALANCE_LIMIT = "BALANCE_LIMIT"
    NO_ACCOUNT = "NO_ACCOUNT"
    WRONG_SIGN = "WRONG_SIGN"
    REFUND_UNMATCHED = "REFUND_UNMATCHED"


class EmailTaken(Exception):
    """Another user has this email."""


class UnknownPlan(Exception):
    """No plan has this code."""


@dataclass(frozen=True)
class Account:
    user_id: uuid.UUID
    balance: int
    plan: str
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Account:
        return record(cls, row, plan=Converted(column="plan_code"))


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    email: str
    created_at: datetime
    account: Account

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> User:
        """From a row holding the user's columns and their account's."""
        return record(cls, row, account=Nested(Account.from_row))


@dataclass(frozen=True)
class EntryRequest:
    """An entry to append; reference_id makes the request idempotent per user."""

    user_id: uuid.UUID
    delta: int
    reason: LedgerReason
    reference_id: str


@dataclass(frozen=True)
class LedgerEntry:
    id: uuid.UUID
    user_id: uuid.UUID
    delta: int
    reason: LedgerReason
    reference_id: str
    balance_after: int
    occurred_at: datetime
    # The caller that wrote it ("unknown" before callers were recorded).
    created_by: str

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> LedgerEntry:
        return _read_ledger_entry(row)


@dataclass(frozen=True)
class ListedEntry:
    """A ledger entry as listed newest first, with the seq that orders entries of one instant."""

    entry: LedgerEntry
    seq: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ListedEntry:
        return record(cls, row, entry=Nested(LedgerEntry.from_row))

    @property
    def position(self) -> tuple[datetime, int]:
        """The entry's keyset position in the listing."""
        return self.entry.occurred_at, self.seq


@dataclass(frozen=True)
class AppendResult:
    """One answer of token.append_entries, for the requested entry at the same index."""

    outcome: AppendOutcome
    # Written (APPLIED), found under the reference (REPLAYED, REUSED), else None.
    entry: LedgerEntry | None
    user_id: uuid.UUID
    delta: int
    reason: LedgerReason
    reference_id: str
    # The balance the entry was judged against; None without an account. For REFUND_UNMATCHED:
    # the amount of the debit refunded, None without one.
    balance: int | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> AppendResult:
        return _read_append_result(row)


# Read by the thousand (a batch's answers): worked out once.
_read_ledger_entry = reader(LedgerEntry, id=Converted(column="entry_id"), reason=Converted(LedgerReason))
_read_append_result = reader(
    AppendResult,
    outcome=Converted(AppendOutcome),
    entry=Nested(_read_ledger_entry, unless_null="entry_id"),
    reason=Converted(LedgerReason),
)


@dataclass(frozen=True)
class BalanceMismatch:
    """An account whose balance disagrees with its ledger."""

    user_id: uuid.UUID
    account_balance: int
    ledger_sum: int
    last_balance_after: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> BalanceMismatch:
        return record(cls, row)


@dataclass(frozen=True)
class OtpChallenge:
    """A stored login challenge; only the keyed hash of its code is kept."""

    id: uuid.UUID
    code_hash: bytes
    expires_at: datetime
    consumed_at: datetime | None
    invalidated_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> OtpChallenge:
        return record(cls, row)


@dataclass(frozen=True)
class OtpRequests:
    """What a rate-limit window holds (challenges asked for, or wrong codes): how many, and the
    oldest's time."""

    count: int
    oldest: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> OtpRequests:
        return record(cls, row, count=Converted(column="requests"))


@dataclass(frozen=True)
class RefillAccount:
    """An account in refill order, with what its plan owes it for the period."""

    user_id: uuid.UUID
    monthly_allowance: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> RefillAccount:
        return record(cls, row)
