"""The monthly refill: every account gets its plan's allowance once per period.

Accounts are walked in user_id order in batches; each batch is one statement (its own
transaction) through the ledger's batch path with reference `refill:YYYY-MM`. Two batches
are in flight at once, on two connections: the next batch's accounts are read and its
entries written while the one before is still being written, so the database works on both
(the batches name different accounts, so neither waits on the other's locks). Stopping at any
point loses at most the batches in flight, and a rerun replays what was committed, so
every account is credited exactly once per period however often it runs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from blumpo_common.validation import Checker
from token_service import ledger
from token_service.model import EntryRequest, LedgerReason, RefillAccount
from token_service.store import Store

BATCH_SIZE = 1000
# Batches written at once: one per core of a small database server; more only queue.
IN_FLIGHT = 2
_PERIOD = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
_FIRST = uuid.UUID(int=0)

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


async def run(
    store: Store, period: str, created_by: str, batch_size: int = BATCH_SIZE, max_batches: int | None = None
) -> RefillResult:
    """Credits the period's allowance to every account not yet credited for it; the entries name
    created_by (the caller of RunMonthlyRefill) as their writer."""
    result = RefillResult()
    after = _FIRST
    ref = reference(period)
    end = period_end(period)
    started = time.monotonic()
    in_flight: list[asyncio.Task[tuple[int, int]]] = []
    try:
        while not result.finished and (max_batches is None or result.batches < max_batches):
            accounts = await store.refill_batch(after, batch_size, end)
            result.finished = len(accounts) < batch_size
            if not accounts:
                break
            result.batches += 1
            after = accounts[-1].user_id
            in_flight.append(asyncio.create_task(_credit(store, accounts, ref, created_by, period)))
            if len(in_flight) == IN_FLIGHT:
                _count(result, await in_flight[0])
                in_flight.pop(0)
        while in_flight:
            _count(result, await in_flight[0])
            in_flight.pop(0)
    finally:
        # Stopped (cancelled, or a batch failed): the batches still in flight are stopped too.
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
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


async def _credit(
    store: Store, accounts: Sequence[RefillAccount], ref: str, created_by: str, period: str
) -> tuple[int, int]:
    """Appends one batch's entries in one statement; (accounts credited, accounts in the batch)."""
    requests = [
        EntryRequest(account.user_id, account.monthly_allowance, LedgerReason.MONTHLY_REFILL, ref)
        for account in accounts
        if account.monthly_allowance > 0
    ]
    outcomes = await ledger.append(store, requests, created_by)
    for outcome in outcomes:
        if outcome.error is not None:
            log.warning("refill entry refused", extra={"period": period, "error": str(outcome.error)})
    return sum(1 for o in outcomes if o.entry is not None and not o.replayed), len(accounts)


def _count(result: RefillResult, batch: tuple[int, int]) -> None:
    credited, accounts = batch
    result.credited += credited
    result.skipped += accounts - credited
