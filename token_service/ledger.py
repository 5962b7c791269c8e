"""The rules of the ledger: how a list of requested entries applies to locked accounts.

Pure logic, no I/O: the store locks the accounts, reads the entries that already
hold the requested references, and applies what plan() decides.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime

import grpc

from blumpo_common.errors import ServiceError, not_found

MAX_DELTA = 10**12
# Far below int64, so no sum of balances or deltas can overflow.
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
    # None until the entry is written.
    occurred_at: datetime | None


@dataclass(frozen=True)
class Outcome:
    """What one requested entry came to: an entry (maybe replayed) or an error."""

    entry: Entry | None = None
    replayed: bool = False
    error: ServiceError | None = None


def plan(
    requests: list[EntryRequest],
    balances: dict[uuid.UUID, int],
    existing: dict[tuple[uuid.UUID, str], Entry],
) -> tuple[list[Outcome], list[Entry]]:
    """Judges each request in order; returns the outcomes and the entries to write.

    balances holds the locked accounts and is updated as entries apply, so later
    requests of an account see earlier ones; so is existing, for repeated references.
    """
    outcomes: list[Outcome] = []
    new_entries: list[Entry] = []
    for request in requests:
        outcome = _judge(request, balances, existing)
        if outcome.entry is not None and not outcome.replayed:
            new_entries.append(outcome.entry)
            balances[request.user_id] = outcome.entry.balance_after
            existing[(request.user_id, request.reference_id)] = outcome.entry
        outcomes.append(outcome)
    return outcomes, new_entries


def _judge(
    request: EntryRequest,
    balances: dict[uuid.UUID, int],
    existing: dict[tuple[uuid.UUID, str], Entry],
) -> Outcome:
    balance = balances.get(request.user_id)
    if balance is None:
        return Outcome(error=not_found("account", str(request.user_id)))
    earlier = existing.get((request.user_id, request.reference_id))
    if earlier is not None:
        if earlier.delta == request.delta and earlier.reason == request.reason:
            return Outcome(entry=earlier, replayed=True)
        return Outcome(error=_reference_reused(request, earlier))
    balance_after = balance + request.delta
    if balance_after < 0:
        return Outcome(error=_insufficient(balance, -request.delta))
    if balance_after > MAX_BALANCE:
        return Outcome(
            error=ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "BALANCE_LIMIT_EXCEEDED",
                f"the balance would exceed {MAX_BALANCE}",
                {"balance": str(balance), "limit": str(MAX_BALANCE)},
            )
        )
    entry = Entry(
        id=uuid.uuid4(),
        user_id=request.user_id,
        delta=request.delta,
        reason=request.reason,
        reference_id=request.reference_id,
        balance_after=balance_after,
        occurred_at=None,
    )
    return Outcome(entry=entry)


def _insufficient(balance: int, requested: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_TOKENS",
        f"the balance is {balance} tokens, {requested} requested",
        {"balance": str(balance), "requested": str(requested)},
    )


def _reference_reused(request: EntryRequest, earlier: Entry) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        f"reference_id {request.reference_id!r} was already used with delta {earlier.delta} "
        f"and reason {earlier.reason}; use a new reference for a different entry",
        {"reference_id": request.reference_id, "delta": str(earlier.delta), "reason": earlier.reason},
    )


def written(outcomes: list[Outcome], occurred_at: dict[uuid.UUID, datetime]) -> list[Outcome]:
    """The outcomes with the write time of the entries just written filled in."""
    return [
        replace(o, entry=replace(o.entry, occurred_at=occurred_at[o.entry.id]))
        if o.entry is not None and o.entry.occurred_at is None
        else o
        for o in outcomes
    ]
