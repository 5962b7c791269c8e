"""The monthly refill: every account gets its plan's allowance once per period.

Accounts are walked in user_id order in batches; each batch is one transaction that
goes through the ledger's batch path with reference `refill:YYYY-MM`. Stopping at any
point loses at most the batch in flight, and a rerun replays what was committed, so
every account is credited exactly once per period however often it runs.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime

from blumpo_common.validation import Checker
from token_service import ledger
from token_service.model import EntryRequest, LedgerReason
from token_service.store import Store

BATCH_SIZE = 1000
_PERIOD = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
_FIRST = uuid.UUID(int=0)
# What the refill's entries name as their writer.
REFILL_CALLER = "monthly-refill"

log = logging.getLogger(__name__)


def check_period(check: Checker, field: str, period: str, today: date) -> str:
    """A month from 2000 up to the current one: a month to come is not yet owed."""
    match = _PERIOD.fullmatch(period)
    if match is None or int(match.group(1)) < 2000:
        check.add(field, f"must be a month as YYYY-MM (year 2000 or later), got {period!r}")
    elif (int(match.group(1)), int(match.group(2))) > (today.year, today.month):
        check.add(field, f"must not be after the current month {today:%Y-%m}, got {period!r}")
    return period


def period_end(period: str) -> datetime:
    """The first instant after the period (a well-formed YYYY-MM), in UTC."""
    year, month = int(period[:4]), int(period[5:7])
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def reference(period: str) -> str:
    return f"refill:{period}"


@dataclass
class RefillResult:
    credited: int = 0
    # Already credited for the period, opened after it, on a plan without allowance, or refused.
    skipped: int = 0
    batches: int = 0
    # False when stopped by max_batches before the last account.
    finished: bool = False


async def run(store: Store, period: str, batch_size: int = BATCH_SIZE, max_batches: int | None = None) -> RefillResult:
    """Credits the period's allowance to every account not yet credited for it."""
    result = RefillResult()
    after = _FIRST
    ref = reference(period)
    end = period_end(period)
    started = time.monotonic()
    while not result.finished and (max_batches is None or result.batches < max_batches):
        async with store.transaction() as conn:
            accounts = await store.refill_batch(after, batch_size, end, conn=conn)
            requests = [
                EntryRequest(account.user_id, account.monthly_allowance, LedgerReason.MONTHLY_REFILL, ref)
                for account in accounts
                if account.monthly_allowance > 0
            ]
            outcomes = await ledger.append(store, requests, REFILL_CALLER, conn=conn)
        result.finished = len(accounts) < batch_size
        if not accounts:
            break
        result.batches += 1
        after = accounts[-1].user_id
        credited = sum(1 for o in outcomes if o.entry is not None and not o.replayed)
        for outcome in outcomes:
            if outcome.error is not None:
                log.warning("refill entry refused", extra={"period": period, "error": str(outcome.error)})
        result.credited += credited
        result.skipped += len(accounts) - credited
    log.info(
        "monthly refill",
        extra={
            "period": period,
            "credited": result.credited,
            "skipped": result.skipped,
            "batches": result.batches,
            "finished": result.finished,
            "duration_ms": round((time.monotonic() - started) * 1000),
        },
    )
    return result
