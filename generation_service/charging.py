"""Charging a job exactly once across two services: the saga and its reconciler.

The job is recorded first as an intent (CHARGING, invisible), then debited through
the token service with the job id as reference, then made QUEUED, or REJECTED when
the token service refuses. Every step can be repeated: the insert is keyed by the
job id, the debit replays, the last step is conditional. So whatever stops the saga
midway (a crash, the token service down, a lost answer), repeating it finishes it,
and the reconciler repeats it for intents nobody came back for. Refunds of failed
jobs follow the same pattern: refund_state PENDING is the intent, the credit is
keyed `<job id>:refund`, DONE closes it. docs/charging.md has the failure cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client

from blumpo_common import db, retry
from blumpo_common.errors import ServiceError
from generation_service import errors, rules
from generation_service.model import Job, JobState, NewJob
from generation_service.store import Store
from generation_service.token_client import Outcome, Result, TokenLedger

log = logging.getLogger(__name__)

CHARGES = prometheus_client.Counter(
    "generation_charges_total", "Debits of jobs asked of the token service, by outcome.", ["result"]
)
RECONCILED = prometheus_client.Counter(
    "generation_reconciled_total", "Work the reconciler finished, by kind (leases, intents, refunds).", ["kind"]
)


def request_digest(user_id: uuid.UUID, prompt: str, params: Mapping[str, Any], tokens_cost: int) -> bytes:
    """sha256 of the canonical create request: tells a retry from a reuse of the job id."""
    canonical = json.dumps(
        [str(user_id), prompt, params, tokens_cost], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).digest()


@dataclass(frozen=True)
class ReconcilerSettings:
    # An intent or owed refund is left to its own caller for this long first.
    grace_seconds: float = 10.0
    interval_seconds: float = 2.0
    # Rows one pass handles at most, per kind.
    batch: int = 50


class Charger:
    def __init__(self, store: Store, tokens: TokenLedger) -> None:
        self.store = store
        self.tokens = tokens

    async def create(self, job: NewJob) -> Job:
        """Runs (or resumes) the saga of a job; returns it QUEUED or later."""
        found = await self.store.insert_intent(job)
        if found is None:
            # A refused job left nothing visible and nothing charged: its id takes this request,
            # the same (the balance may allow it now) or another one.
            found = await self.store.retry_rejected(job)
        if found is None:
            existing = await self.store.job_any_status(job.id)
            assert existing is not None  # jobs are never deleted
            if existing.request_digest != job.request_digest:
                raise errors.job_id_reused(job.id)
            if existing.status is not JobState.CHARGING:
                return existing
        outcome = await self.tokens.debit(job.user_id, job.id, job.tokens_cost)
        return await self.settle_charge(job.id, job.user_id, outcome)

    async def settle_charge(
        self, job_id: uuid.UUID, user_id: uuid.UUID, outcome: Outcome, *, conn: db.Connection | None = None
    ) -> Job:
        CHARGES.labels(outcome.result.value).inc()
        if outcome.result is Result.DONE:
            job = await self.store.finish_charged(job_id, conn=conn)
            if job is None:  # a racing attempt finished it first
                job = await self.store.job_any_status(job_id, conn=conn)
            assert job is not None and job.status in rules.VISIBLE, "a charged job must be visible"
            return job
        if outcome.result is Result.REFUSED:
            await self.store.reject_intent(
                job_id, f"{outcome.reason or outcome.code.name}: {outcome.message}", conn=conn
            )
            # A racing attempt may have charged it after all (a refusal never follows a debit of the
            # same reference, but a debit may follow a refusal when the balance grew in between).
            current = await self.store.job_any_status(job_id, conn=conn)
            if current is not None and current.status in rules.VISIBLE:
                return current
            raise errors.charge_refused(job_id, user_id, outcome)
        raise errors.charge_unconfirmed(job_id, outcome)

    async def refund(self, job: Job, *, conn: db.Connection | None = None) -> Outcome | None:
        """Gives a job's cost back if it is owed (None when it is not); what is not DONE stays
        owed (PENDING) for the reconciler."""
        if not rules.refund_owed(job):
            return None
        outcome = await self.tokens.refund(job.user_id, job.id, job.tokens_cost)
        if outcome.result is Result.DONE:
            await self.store.refund_done(job.id, conn=conn)
        else:
            log.warning(
                "refund deferred", extra={"job_id": str(job.id), "code": outcome.code.name, "reason": outcome.reason}
            )
        return outcome


class Reconciler:
    """Finishes what callers left half done: charge intents, owed refunds, expired leases."""

    def __init__(self, charger: Charger, settings: ReconcilerSettings) -> None:
        self.charger = charger
        self.store = charger.store
        self.settings = settings

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed pass is retried at the next interval
                log.warning("reconciler pass failed: %s", exc)
            await asyncio.sleep(self.settings.interval_seconds)

    async def run_once(self) -> dict[str, int]:
        done = {"leases": 0, "intents": 0, "refunds": 0}
        for job in await self.store.sweep_expired_leases():
            done["leases"] += 1
            await self.charger.refund(job)
        done["intents"] = await self._intents()
        done["refunds"] = await self._refunds()
        for kind, count in done.items():
            RECONCILED.labels(kind).inc(count)
        if any(done.values()):
            log.info("reconciled", extra=done)
        return done

    async def _intents(self) -> int:
        """Repeats the debit of abandoned intents, under their row locks, and settles them."""
        settled = 0
        async with self.store.transaction() as conn:
            for job in await self.store.stale_intents(self.settings.grace_seconds, self.settings.batch, conn=conn):
                outcome = await self.charger.tokens.debit(job.user_id, job.id, job.tokens_cost)
                if outcome.result is Result.UNKNOWN:
                    if _service_away(outcome):
                        break  # the rest waits for the next pass
                    await self._defer(job, "charge", outcome, conn=conn)
                    continue
                with contextlib.suppress(ServiceError):  # a refusal leaves it REJECTED: nothing charged or listed
                    await self.charger.settle_charge(job.id, job.user_id, outcome, conn=conn)
                settled += 1
        return settled

    async def _refunds(self) -> int:
        refunded = 0
        async with self.store.transaction() as conn:
            for job in await self.store.owed_refunds(self.settings.grace_seconds, self.settings.batch, conn=conn):
                outcome = await self.charger.refund(job, conn=conn)
                if outcome is None or outcome.result is Result.DONE:
                    refunded += 1
                elif _service_away(outcome):
                    break
                else:
                    # A refused refund (the account gone) cannot be retried into success.
                    await self._defer(job, "refund", outcome, conn=conn)
        return refunded

    async def _defer(self, job: Job, kind: str, outcome: Outcome, *, conn: db.Connection) -> None:
        """A row the token service keeps answering with something else than success goes to the
        back of the line, so it cannot hold up the others; it is logged for a person to see."""
        log.error(
            "not settled; deferred",
            extra={"kind": kind, "job_id": str(job.id), "code": outcome.code.name, "reason": outcome.reason},
        )
        await self.store.defer(job.id, conn=conn)


def _service_away(outcome: Outcome) -> bool:
    """No answer at all: the token service is down or slow, for every row alike."""
    return outcome.result is Result.UNKNOWN and outcome.code in retry.RETRYABLE
