"""The ledger's limits, and what each requested entry came to: an entry or an error.

The rules themselves run in the database, in three functions that answer alike
(migrations 20261127100001, 20261127500001), each in one round trip with the accounts
locked: token.append_entry for one entry (the common case, kept lean),
token.append_distinct_entries for a batch naming each account once (set-based), and
token.append_entries, entry by entry, for a batch naming an account more than once. Here
the path is chosen, and each result reported becomes an entry or an error (and is counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import prometheus_client

from blumpo_common.errors import ServiceError
from token_service import errors
from token_service.model import AppendOutcome, AppendResult, EntryRequest, LedgerEntry, LedgerReason, User
from token_service.store import Store

MAX_DELTA = 10**12
# The most a credit may bring a balance to (a refund: twice that), far below int64.
MAX_BALANCE = 10**15
MAX_REFERENCE_LENGTH = 200

ENTRIES = prometheus_client.Counter("token_ledger_entries_total", "Ledger entries written, by reason.", ["reason"])
_ENTRIES_BY_REASON = {reason: ENTRIES.labels(reason.value) for reason in LedgerReason}


@dataclass(frozen=True)
class Outcome:
    """What one requested entry came to: an entry (maybe replayed) or an error."""

    entry: LedgerEntry | None = None
    replayed: bool = False
    error: ServiceError | None = None


def outcome_of(result: AppendResult) -> Outcome:
    match result.outcome, result.entry, result.balance:
        case AppendOutcome.APPLIED, LedgerEntry() as entry, _:
            return Outcome(entry=entry)
        case AppendOutcome.REPLAYED, LedgerEntry() as entry, _:
            return Outcome(entry=entry, replayed=True)
        case AppendOutcome.REUSED, LedgerEntry() as earlier, _:
            return Outcome(error=errors.idempotency_key_reused(earlier))
        case AppendOutcome.INSUFFICIENT, _, int(balance):
            return Outcome(error=errors.insufficient_tokens(balance, requested=-result.delta))
        case AppendOutcome.BALANCE_LIMIT, _, int(balance):
            return Outcome(error=errors.balance_limit_exceeded(balance, MAX_BALANCE))
        case AppendOutcome.NO_ACCOUNT, _, _:
            return Outcome(error=errors.account_not_found(result.user_id))
        case AppendOutcome.WRONG_SIGN, _, _:
            return Outcome(error=errors.wrong_sign(result.reason, result.delta))
        case AppendOutcome.REFUND_UNMATCHED, _, debit:
            return Outcome(error=errors.refund_unmatched(result.reference_id, debit, result.delta))
    raise AssertionError(f"token.append_entries answered {result}")


async def append(store: Store, requests: Sequence[EntryRequest], created_by: str) -> list[Outcome]:
    """Applies the requests in order, in one statement, its own transaction (committed when this
    returns); created_by: the caller that writes them (the audit trail). One outcome per
    request, in order."""
    if not requests:
        return []
    if len(requests) == 1:
        results = [await store.append_entry(requests[0], MAX_BALANCE, created_by)]
    elif len({r.user_id for r in requests}) == len(requests):
        results = await store.append_distinct_entries(requests, MAX_BALANCE, created_by)
    else:
        results = await store.append_entries(requests, MAX_BALANCE, created_by)
    outcomes = [outcome_of(result) for result in results]
    # Counted per reason, not per entry: each inc takes the counter's lock.
    written = Counter(o.entry.reason for o in outcomes if o.entry is not None and not o.replayed)
    for reason, count in written.items():
        _ENTRIES_BY_REASON[reason].inc(count)
    return outcomes


def count_signup(user: User) -> None:
    """Counts the signup grant create_user wrote, if the plan has one (its balance is the grant)."""
    if user.account.balance > 0:
        _ENTRIES_BY_REASON[LedgerReason.SIGNUP_BONUS].inc()
