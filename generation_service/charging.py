"""Charging a job exactly once across two services: the saga and its reconciler.

The job is recorded first as an intent (CHARGING, invisible), then debited through
the token service with the job id as reference, then made QUEUED, or REJECTED when
the token service refuses. Every step can be repeated: the insert is keyed by the
job id, the debit replays, the last step is conditional. So whatever stops the saga
midway (a crash, the token service down, a lost answer), repeating it finishes it,
and the reconciler repeats it for intents nobody came back for. Refunds of failed
and cancelled jobs follow the same pattern: refund_state PENDING is the intent, the credit is
keyed `<job id>:refund`, DONE closes it. docs/charging.md has the failure cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import prometheus_client

from blumpo_common import db, retry
from blumpo_common.errors import ServiceError
from generation_service import errors, rules
from generation_service.model import Job, JobState, NewJob
from generation_service.plans import PlanCache
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
    # How long a claim on a job's charge or refund lasts: its holder (a create call, a status
    # move, a reconciler) is the only one asking the token service about that job meanwhile.
    # It must outlast the holder's calls to the token service (config checks it).
    claim_seconds: float = 10.0
    interval_seconds: float = 2.0
    # Rows one pass handles at most, per kind.
    batch: int = 50


# A debit that got no answer may still be committing on the token side for a moment after
# the caller's deadline (the token server's own deadline ends it): the claim is kept that long.
UNANSWERED_HOLD_SECONDS = 2.0
# How often a create call looks again at a job another call is charging.
WAIT_POLL_SECONDS = (0.02, 0.5)


class Charger:
    def __init__(self, store: Store, tokens: TokenLedger, plan_cache_seconds: float = 60.0) -> None:
        self.store = store
        self.tokens = tokens
        self.plans = PlanCache(plan_cache_seconds)

    async def plan(self, user_id: uuid.UUID) -> str | None:
        """The user's plan code, as the token service says now (it sets the job's priority),
        recorded for the owner's cap and kept for the next creates; None when the token service
        does not answer (the saga goes on, and the plan last known for the user is used). An
        unknown user is refused here, before anything is written."""
        answer = await self.tokens.plan(user_id)
        if isinstance(answer, str):
            await self.store.record_owner(user_id, answer)
            self.plans.put(user_id, answer)
            return answer
        if answer.code == grpc.StatusCode.NOT_FOUND:
            raise errors.user_not_found(user_id)
        log.warning("plan unknown; the last known one is used", extra={"user_id": str(user_id)})
        return None

    async def create(self, job: NewJob) -> Job:
        """Runs (or resumes) the saga of a job; returns it QUEUED or later.

        The owner's plan (it sets the priority) is the one the token service told within
        PLAN_CACHE_SECONDS, else it is asked for, after a look for the job: a job made already
        is answered (the same request) or refused (another one) without a call to the token
        service. With the plan known the intent's insert is the first statement, and finds a job
        made already itself (_claim). Only the holder of the job's claim asks for the debit; a
        parallel call for the same job waits for it to settle (or for its claim to run out) and
        goes on from there.
        """
        plan = self.plans.get(job.user_id)
        if plan is None:
            existing = await self.store.get_job(job.id)
            if existing is not None:
                if existing.request_digest != job.request_digest:
                    raise errors.job_id_reused(job.id)
                return existing
            plan = await self.plan(job.user_id)
        pause = WAIT_POLL_SECONDS[0]
        while True:
            claimed = await self._claim(job, plan)
            if isinstance(claimed, Job) and claimed.status is not JobState.CHARGING:
                return claimed  # charged already: the same request again
            if claimed is not None:
                # The recorded cost: a retry priced later must not debit another amount.
                outcome = await self.tokens.debit(job.user_id, job.id, claimed.tokens_cost)
                return await self.settle_charge(claimed, outcome)
            if db.timeout(pause * 2) <= pause:
                raise errors.charge_in_progress(job.id)
            await asyncio.sleep(pause)
            pause = min(pause * 2, WAIT_POLL_SECONDS[1])

    async def _claim(self, job: NewJob, plan: str | None) -> Job | None:
        """The job claimed for a debit by this call; the job itself when it is past charging;
        None while another call holds it."""
        claimed = await self.store.insert_intent(job, plan)
        if claimed is None:
            # A refused job left nothing visible and nothing charged: its id takes this request,
            # the same (the balance may allow it now) or another one.
            claimed = await self.store.retry_rejected(job, plan)
        if claimed is not None:
            return claimed
        existing = await self.store.job_any_status(job.id)
        assert existing is not None  # jobs are never deleted
        if existing.request_digest != job.request_digest:
            raise errors.job_id_reused(job.id)
        if existing.status is JobState.CHARGING:
            return next(iter(await self.store.claim([job.id])), None)
        if existing.status is JobState.REJECTED:
            return None  # refused since the insert: look again (it may be taken over now)
        return existing

    async def settle_charge(self, job: Job, outcome: Outcome) -> Job:
        """Settles a claimed intent by what its debit came to; raises the refusal, if any."""
        CHARGES.labels(outcome.result.value).inc()
        if outcome.result is Result.DONE:
            settled = await self.store.finish_charged(job.id)
            if settled is None:  # a racing attempt finished it first
                settled = await self.store.job_any_status(job.id)
            assert settled is not None and settled.status in rules.VISIBLE, "a charged job must be visible"
            return settled
        if outcome.result is Result.UNKNOWN:
            await self.store.hold_claim(job, UNANSWERED_HOLD_SECONDS)
            raise errors.charge_unconfirmed(job.id, outcome)
        held = rules.debit_held_by_earlier_request(outcome)
        if held is not None:
            await self._refund_earlier_request(job, held)
            raise errors.job_id_reused(job.id)
        if not await self.store.reject_intent(job, f"{outcome.reason or outcome.code.name}: {outcome.message}"):
            # Another claim took over since (this one ran out): its outcome settles the job.
            current = await self.store.job_any_status(job.id)
            if current is not None and current.status in rules.VISIBLE:
                return current
        raise errors.charge_refused(job.id, job.user_id, outcome)

    async def _refund_earlier_request(self, job: Job, held: int) -> None:
        """The id was charged for an earlier request whose job is gone (taken over after a
        refusal that raced that charge): the job stays refused, and that debit is given back."""
        owing = await self.store.charged_before(
            job, held, f"job id {job.id} held a charge of {held} tokens of an earlier request; refunded"
        )
        if owing is not None:
            await self.refund(owing)

    async def refund(self, job: Job) -> Outcome | None:
        """Gives a job's cost back if it is owed (None when it is not); what is not DONE stays
        owed (PENDING) for the reconciler."""
        if not rules.refund_owed(job):
            return None
        outcome = await self.tokens.refund(job.user_id, job.id, job.tokens_cost)
        if outcome.result is Result.DONE:
            await self.store.refund_done(job.id)
        else:
            log.warning(
                "refund deferred", extra={"job_id": str(job.id), "code": outcome.code.name, "reason": outcome.reason}
            )
        return outcome


class Reconciler:
    """Finishes what callers left half done: charge intents, owed refunds, expired leases.

    It claims a batch of rows in one short statement, then calls the token service with no
    transaction open, and settles each row by a conditional update: any number of
    reconcilers (one per process) can run side by side, and none holds a row while it waits.
    """

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
        intents = await self._claim(await self.store.stale_intents(self.settings.batch), rules.charge_owed)
        # A refusal settles an intent too (REJECTED: nothing charged or listed).
        done["intents"] = await self._work(intents, self._intent, {Result.DONE, Result.REFUSED})
        refunds = await self._claim(await self.store.owed_refunds(self.settings.batch), rules.refund_owed)
        done["refunds"] = await self._work(refunds, self._refund, {Result.DONE})
        for kind, count in done.items():
            RECONCILED.labels(kind).inc(count)
        if any(done.values()):
            log.info("reconciled", extra=done)
        return done

    async def _claim(self, job_ids: list[uuid.UUID], wanted: Callable[[Job], bool]) -> list[Job]:
        """The jobs claimed that still need this kind of work (they may have moved on since they
        were listed); the others are let go at once."""
        claimed = await self.store.claim(job_ids)
        await self.store.release_claims([j.id for j in claimed if not wanted(j)])
        return [j for j in claimed if wanted(j)]

    async def _work(
        self, claimed: list[Job], attempt: Callable[[Job], Awaitable[Outcome]], settling: set[Result]
    ) -> int:
        """Works claimed rows one by one; stops when the token service is away for all alike,
        and lets go of the rows not reached, so the next pass takes them at once."""
        settled = 0
        for index, job in enumerate(claimed):
            outcome = await attempt(job)
            if outcome.result in settling:
                settled += 1
            elif _service_away(outcome):
                await self.store.release_claims([j.id for j in claimed[index + 1 :]])
                break
            else:
                # Not settled, again and again (a bug, an account gone): to the back of the line,
                # so it cannot hold up the others, and logged for a person to see.
                log.error(
                    "not settled; deferred",
                    extra={"job_id": str(job.id), "code": outcome.code.name, "reason": outcome.reason},
                )
                await self.store.defer(job.id)
        return settled

    async def _intent(self, job: Job) -> Outcome:
        outcome = await self.charger.tokens.debit(job.user_id, job.id, job.tokens_cost)
        with contextlib.suppress(ServiceError):  # the caller is gone: the refusal is only recorded
            await self.charger.settle_charge(job, outcome)
        return outcome

    async def _refund(self, job: Job) -> Outcome:
        outcome = await self.charger.refund(job)
        assert outcome is not None  # claimed as owed
        return outcome


def _service_away(outcome: Outcome) -> bool:
    """No answer at all: the token service is down or slow, for every row alike."""
    return outcome.result is Result.UNKNOWN and outcome.code in retry.RETRYABLE
