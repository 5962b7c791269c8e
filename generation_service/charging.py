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
from dataclasses import dataclass

import asyncpg
import grpc
import prometheus_client

from blumpo_common import db, retry
from blumpo_common.errors import ServiceError
from generation_service import lifecycle
from generation_service.store import NewJob, Store
from generation_service.token_client import Outcome, Result, TokenClient

log = logging.getLogger(__name__)

CHARGES = prometheus_client.Counter(
    "generation_charges_total", "Debits of jobs asked of the token service, by outcome.", ["result"]
)
RECONCILED = prometheus_client.Counter(
    "generation_reconciled_total", "Work the reconciler finished, by kind (leases, intents, refunds).", ["kind"]
)


def request_digest(user_id: uuid.UUID, prompt: str, params: dict[str, object], tokens_cost: int) -> bytes:
    """sha256 of the canonical create request: tells a retry from a reuse of the job id."""
    canonical = json.dumps(
        [str(user_id), prompt, params, tokens_cost], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).digest()


def _unavailable(job_id: uuid.UUID, outcome: Outcome) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "TOKEN_SERVICE_UNAVAILABLE",
        f"the token service did not confirm the charge of job {job_id} ({outcome.code.name}); "
        "retry with the same job_id, it will not be charged twice",
        {"job_id": str(job_id)},
    )


def _refused(job_id: uuid.UUID, user_id: uuid.UUID, outcome: Outcome) -> ServiceError:
    """The token service's refusal, as this service's answer to the create."""
    if outcome.reason == "INSUFFICIENT_TOKENS":
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSUFFICIENT_TOKENS",
            f"not enough tokens for job {job_id}: {outcome.message}",
            {**outcome.metadata, "job_id": str(job_id)},
        )
    if outcome.code == grpc.StatusCode.NOT_FOUND:
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            "USER_NOT_FOUND",
            f"no user {user_id} (no token account)",
            {"user_id": str(user_id)},
        )
    return ServiceError(
        outcome.code,
        outcome.reason or "CHARGE_REFUSED",
        f"the token service refused the charge of job {job_id}: {outcome.message}",
        {**outcome.metadata, "job_id": str(job_id)},
    )


def _reused(job_id: uuid.UUID) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "JOB_ID_REUSED",
        f"job {job_id} exists with a different request; use a new job_id for a new job",
        {"job_id": str(job_id)},
    )


@dataclass(frozen=True)
class ReconcilerSettings:
    # An intent or owed refund is left to its own caller for this long first.
    grace_seconds: float = 10.0
    interval_seconds: float = 2.0
    # Rows one pass handles at most, per kind.
    batch: int = 50


class Charger:
    def __init__(self, store: Store, tokens: TokenClient) -> None:
        self.store = store
        self.tokens = tokens

    async def create(self, job: NewJob) -> asyncpg.Record:
        """Runs (or resumes) the saga of a job; returns it QUEUED or later."""
        row = await self.store.insert_intent(job)
        if row is None:
            # A refused job left nothing visible and nothing charged: its id takes this request,
            # the same (the balance may allow it now) or another one.
            row = await self.store.retry_rejected(job)
        if row is None:
            existing = await self.store.job_any_status(job.id)
            assert existing is not None  # jobs are never deleted
            if bytes(existing["request_digest"]) != job.request_digest:
                raise _reused(job.id)
            if existing["status"] != lifecycle.CHARGING:
                return existing
        outcome = await self.tokens.debit(job.user_id, job.id, job.tokens_cost)
        return await self.settle_charge(job.id, job.user_id, outcome)

    async def settle_charge(
        self, job_id: uuid.UUID, user_id: uuid.UUID, outcome: Outcome, conn: db.Connection | None = None
    ) -> asyncpg.Record:
        CHARGES.labels(outcome.result.value).inc()
        if outcome.result is Result.DONE:
            row = await self.store.finish_charged(job_id, conn=conn)
            if row is None:  # a racing attempt finished it first
                row = await self.store.job_any_status(job_id)
            assert row is not None and row["status"] in lifecycle.VISIBLE, "a charged job must be visible"
            return row
        if outcome.result is Result.REFUSED:
            await self.store.reject_intent(job_id, f"{outcome.reason or outcome.code.name}: {outcome.message}", conn)
            # A racing attempt may have charged it after all (a refusal never follows a debit of the
            # same reference, but a debit may follow a refusal when the balance grew in between).
            current = await self.store.job_any_status(job_id)
            if current is not None and current["status"] in lifecycle.VISIBLE:
                return current
            raise _refused(job_id, user_id, outcome)
        raise _unavailable(job_id, outcome)

    async def refund(self, job: asyncpg.Record) -> bool:
        """Gives a failed job's cost back, if still owed; False when it must wait for the reconciler."""
        if job["refund_state"] != "PENDING":
            return True
        outcome = await self.tokens.refund(job["user_id"], job["id"], job["tokens_cost"])
        if outcome.result is Result.DONE:
            await self.store.refund_done(job["id"])
            return True
        # A refused refund (the account gone) cannot be retried into success; it stays PENDING
        # and visible in the logs for a person to look at.
        log.warning(
            "refund deferred", extra={"job_id": str(job["id"]), "code": outcome.code.name, "reason": outcome.reason}
        )
        return False


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
        for row in await self.store.sweep_expired_leases():
            done["leases"] += 1
            if row["refund_state"] == "PENDING":
                await self.charger.refund(row)
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
            for row in await self.store.stale_intents(conn, self.settings.grace_seconds, self.settings.batch):
                outcome = await self.charger.tokens.debit(row["user_id"], row["id"], row["tokens_cost"])
                if outcome.result is Result.UNKNOWN:
                    if _service_away(outcome):
                        break  # the rest waits for the next pass
                    await self._defer(conn, row, "charge", outcome)
                    continue
                with contextlib.suppress(ServiceError):  # a refusal leaves it REJECTED: nothing charged or listed
                    await self.charger.settle_charge(row["id"], row["user_id"], outcome, conn)
                settled += 1
        return settled

    async def _refunds(self) -> int:
        refunded = 0
        async with self.store.transaction() as conn:
            for row in await self.store.owed_refunds(conn, self.settings.grace_seconds, self.settings.batch):
                outcome = await self.charger.tokens.refund(row["user_id"], row["id"], row["tokens_cost"])
                if outcome.result is Result.DONE:
                    await self.store.refund_done(row["id"], conn)
                    refunded += 1
                elif _service_away(outcome):
                    break
                else:
                    await self._defer(conn, row, "refund", outcome)
        return refunded

    async def _defer(self, conn: db.Connection, row: asyncpg.Record, kind: str, outcome: Outcome) -> None:
        """A row the token service keeps answering with something else than success goes to the
        back of the line, so it cannot hold up the others; it is logged for a person to see."""
        log.error(
            "not settled; deferred",
            extra={"kind": kind, "job_id": str(row["id"]), "code": outcome.code.name, "reason": outcome.reason},
        )
        await self.store.defer(row["id"], conn)


def _service_away(outcome: Outcome) -> bool:
    """No answer at all: the token service is down or slow, for every row alike."""
    return outcome.result is Result.UNKNOWN and outcome.code in retry.RETRYABLE
