"""The charge saga and its reconciler, step by step, against a fake token ledger that can
answer, refuse, hang or fail at each step (the store and the database are real)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest

from blumpo_common.db import create_pool
from blumpo_common.errors import ServiceError
from generation_service.charging import (
    UNANSWERED_HOLD_SECONDS,
    Charger,
    Reconciler,
    ReconcilerSettings,
    request_digest,
)
from generation_service.model import JobState, NewJob, RefundState
from generation_service.store import Store
from generation_service.token_client import Outcome, Result
from tests.conftest import database_config

DONE = Outcome(Result.DONE)
REPLAYED = Outcome(Result.DONE, replayed=True)
INSUFFICIENT = Outcome(
    Result.REFUSED, code=grpc.StatusCode.FAILED_PRECONDITION, reason="INSUFFICIENT_TOKENS", message="balance 0"
)
AWAY = Outcome(Result.UNKNOWN, code=grpc.StatusCode.UNAVAILABLE, message="connection refused")
BROKEN = Outcome(Result.UNKNOWN, code=grpc.StatusCode.INTERNAL, message="bug")
HANG = object()  # the call never answers (a caller's deadline or a crash ends it)
CLAIM_SECONDS = 30.0  # longer than any test: a claim runs out only when a test says so


@dataclass
class FakeLedger:
    """Answers debits and refunds from a script, in order; records every call."""

    script: list[object] = field(default_factory=list)
    calls: list[tuple[str, uuid.UUID, int]] = field(default_factory=list)
    # The plan it answers, and the users whose plan was asked for.
    plan_answer: str = "free"
    plans_asked: list[uuid.UUID] = field(default_factory=list)

    async def _answer(self, kind: str, job_id: uuid.UUID, amount: int) -> Outcome:
        self.calls.append((kind, job_id, amount))
        answer = self.script.pop(0) if self.script else DONE
        if answer is HANG:
            await asyncio.Event().wait()
        assert isinstance(answer, Outcome)
        return answer

    async def debit(self, user_id: uuid.UUID, job_id: uuid.UUID, cost: int) -> Outcome:
        return await self._answer("debit", job_id, cost)

    async def refund(self, user_id: uuid.UUID, job_id: uuid.UUID, cost: int) -> Outcome:
        return await self._answer("refund", job_id, cost)

    async def plan(self, user_id: uuid.UUID) -> str:
        self.plans_asked.append(user_id)
        return self.plan_answer


@pytest.fixture(scope="module")
async def store(database_url: str) -> AsyncIterator[Store]:
    pool = await create_pool(database_config(database_url, "generation_service"))
    yield Store(pool, 30.0, claim_seconds=CLAIM_SECONDS)
    await pool.close()


@pytest.fixture
async def ledger(store: Store) -> AsyncIterator[FakeLedger]:
    yield FakeLedger()
    # Each test leaves nothing for the next one's reconciler.
    await store.pool.execute("UPDATE generation_job SET status = 'REJECTED' WHERE status = 'CHARGING'")
    await store.pool.execute("UPDATE generation_job SET refund_state = 'DONE' WHERE refund_state = 'PENDING'")


def charger(store: Store, ledger: FakeLedger) -> Charger:
    return Charger(store, ledger)


def reconciler(store: Store, ledger: FakeLedger) -> Reconciler:
    settings = ReconcilerSettings(claim_seconds=CLAIM_SECONDS, interval_seconds=0.1, batch=10)
    return Reconciler(Charger(store, ledger), settings)


async def claims_run_out(store: Store) -> None:
    """What CLAIM_SECONDS of waiting does: every claim's holder is taken for gone."""
    await store.pool.execute("UPDATE generation_job SET claimed_until = now() - interval '1 second'")


def new_job(cost: int = 5, user_id: uuid.UUID | None = None) -> NewJob:
    user_id = user_id or uuid.uuid4()
    params = {"width": 64, "height": 64, "steps": 1, "seed": 0, "model": "m", "extra": {}}
    return NewJob(uuid.uuid4(), user_id, "p", params, cost, request_digest(user_id, "p", params, cost))


async def status_of(store: Store, job_id: uuid.UUID) -> JobState:
    job = await store.job_any_status(job_id)
    assert job is not None
    return job.status


async def test_a_debit_done_queues_the_job(store: Store, ledger: FakeLedger) -> None:
    job = new_job()
    created = await charger(store, ledger).create(job)
    assert created.status is JobState.QUEUED and created.refund_state is RefundState.NONE
    assert ledger.calls == [("debit", job.id, 5)]
    # A retry replays nothing: the job is already past its charge.
    assert (await charger(store, ledger).create(job)).id == job.id
    assert len(ledger.calls) == 1


async def test_a_refusal_rejects_and_frees_the_id(store: Store, ledger: FakeLedger) -> None:
    job = new_job()
    ledger.script = [INSUFFICIENT]
    with pytest.raises(ServiceError) as refused:
        await charger(store, ledger).create(job)
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_TOKENS")
    assert await status_of(store, job.id) is JobState.REJECTED
    assert await store.get_job(job.id) is None
    # The balance grew: the same request charges and queues it.
    assert (await charger(store, ledger).create(job)).status is JobState.QUEUED


async def test_an_owners_plan_is_asked_for_once_within_the_cache_time(store: Store, ledger: FakeLedger) -> None:
    now = [0.0]
    saga = Charger(store, ledger, plan_cache_seconds=60)
    saga.plans.clock = lambda: now[0]
    first = new_job()
    assert (await saga.create(first)).priority == 0  # free
    assert ledger.plans_asked == [first.user_id]
    # The owner moves to pro: within the cache time new jobs keep the plan told, unasked.
    ledger.plan_answer = "pro"
    now[0] = 59.0
    assert (await saga.create(new_job(user_id=first.user_id))).priority == 0
    assert ledger.plans_asked == [first.user_id]
    # After it, the plan is asked for again, and recorded for the owner's cap.
    now[0] = 60.0
    assert (await saga.create(new_job(user_id=first.user_id))).priority == 1
    assert ledger.plans_asked == [first.user_id] * 2
    assert await store.pool.fetchval("SELECT plan FROM job_owner WHERE user_id = $1", first.user_id) == "pro"
    # A retry is answered from the job, charged once: by a process that knows the plan, and by
    # one that does not (it looks for the job before asking for the plan).
    assert (await saga.create(first)).id == first.id
    assert (await Charger(store, ledger).create(first)).id == first.id
    assert ledger.plans_asked == [first.user_id] * 2
    assert [c for c in ledger.calls if c[1] == first.id] == [("debit", first.id, 5)]


async def test_no_answer_leaves_an_intent_the_reconciler_settles(store: Store, ledger: FakeLedger) -> None:
    job = new_job()
    ledger.script = [AWAY]
    with pytest.raises(ServiceError) as unconfirmed:
        await charger(store, ledger).create(job)
    assert (unconfirmed.value.code, unconfirmed.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "TOKEN_SERVICE_UNAVAILABLE",
    )
    assert await status_of(store, job.id) is JobState.CHARGING
    ledger.script = [REPLAYED]
    # The claim is held a moment for a debit that may still land, then the reconciler takes it.
    assert (await reconciler(store, ledger).run_once())["intents"] == 0
    await asyncio.sleep(UNANSWERED_HOLD_SECONDS)
    assert (await reconciler(store, ledger).run_once())["intents"] == 1
    assert await status_of(store, job.id) is JobState.QUEUED
    assert [c[0] for c in ledger.calls] == ["debit", "debit"]


@pytest.mark.parametrize(("answer", "settled"), [(DONE, JobState.QUEUED), (INSUFFICIENT, JobState.REJECTED)])
async def test_a_caller_gone_mid_debit_is_finished_by_the_reconciler(
    store: Store, ledger: FakeLedger, answer: Outcome, settled: JobState
) -> None:
    job = new_job()
    ledger.script = [HANG]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(charger(store, ledger).create(job), 0.2)
    assert await status_of(store, job.id) is JobState.CHARGING
    ledger.script = [answer]
    assert (await reconciler(store, ledger).run_once())["intents"] == 0  # its caller may still be on it
    await claims_run_out(store)
    await reconciler(store, ledger).run_once()
    assert await status_of(store, job.id) is settled


async def test_the_reconciler_stops_its_pass_while_the_token_service_is_away(store: Store, ledger: FakeLedger) -> None:
    jobs = [new_job() for _ in range(3)]
    for job in jobs:
        assert await store.insert_intent(job, "free") is not None
    await claims_run_out(store)
    ledger.script = [AWAY]
    assert (await reconciler(store, ledger).run_once())["intents"] == 0
    assert len(ledger.calls) == 1  # the others wait for the next pass instead of timing out one by one
    assert {await status_of(store, j.id) for j in jobs} == {JobState.CHARGING}
    # The rows not reached were let go at once; the one asked about is held a moment.
    assert (await reconciler(store, ledger).run_once())["intents"] == 2
    await asyncio.sleep(UNANSWERED_HOLD_SECONDS)
    assert (await reconciler(store, ledger).run_once())["intents"] == 1
    assert {await status_of(store, j.id) for j in jobs} == {JobState.QUEUED}


async def test_an_intent_that_keeps_failing_goes_to_the_back_of_the_line(store: Store, ledger: FakeLedger) -> None:
    stuck, other = new_job(), new_job()
    assert await store.insert_intent(stuck, "free") is not None
    assert await store.insert_intent(other, "free") is not None
    await claims_run_out(store)
    ledger.script = [BROKEN, DONE]
    assert (await reconciler(store, ledger).run_once())["intents"] == 1
    assert [c[1] for c in ledger.calls] == [stuck.id, other.id]
    assert await status_of(store, stuck.id) is JobState.CHARGING
    assert await status_of(store, other.id) is JobState.QUEUED


async def failed_job(store: Store, ledger: FakeLedger) -> uuid.UUID:
    job = await charger(store, ledger).create(new_job(cost=7))
    moved = await store.move_job(job.id, JobState.FAILED, "worker crashed", None)
    assert moved is not None and moved.refund_state is RefundState.PENDING
    return job.id


async def test_a_failed_job_is_refunded_once(store: Store, ledger: FakeLedger) -> None:
    job_id = await failed_job(store, ledger)
    job = await store.get_job(job_id)
    assert job is not None
    assert await charger(store, ledger).refund(job) == DONE
    refunded = await store.get_job(job_id)
    assert refunded is not None and refunded.refund_state is RefundState.DONE
    # Not owed any more: no second call.
    assert await charger(store, ledger).refund(refunded) is None
    assert [c[0] for c in ledger.calls] == ["debit", "refund"]


@pytest.mark.parametrize("answer", [AWAY, INSUFFICIENT, HANG])
async def test_a_refund_not_done_stays_owed_for_the_reconciler(
    store: Store, ledger: FakeLedger, answer: object
) -> None:
    job_id = await failed_job(store, ledger)
    job = await store.get_job(job_id)
    assert job is not None
    ledger.script = [answer]
    if answer is HANG:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(charger(store, ledger).refund(job), 0.2)
    else:
        await charger(store, ledger).refund(job)
    owed = await store.get_job(job_id)
    assert owed is not None and owed.refund_state is RefundState.PENDING
    ledger.script = [DONE]
    assert (await reconciler(store, ledger).run_once())["refunds"] == 0  # claimed by the move's caller
    await claims_run_out(store)
    assert (await reconciler(store, ledger).run_once())["refunds"] == 1
    settled = await store.get_job(job_id)
    assert settled is not None and settled.refund_state is RefundState.DONE


async def test_the_reconciler_skips_rows_another_process_holds(
    store: Store, ledger: FakeLedger, database_url: str
) -> None:
    job = new_job()
    assert await store.insert_intent(job, "free") is not None
    await claims_run_out(store)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM generation.generation_job WHERE id = $1 FOR UPDATE", job.id)
            assert (await reconciler(store, ledger).run_once())["intents"] == 0
            assert ledger.calls == []
    finally:
        await other.close()
    assert (await reconciler(store, ledger).run_once())["intents"] == 1


@dataclass
class GatedLedger(FakeLedger):
    """A fake whose first answer waits for the test to open the gate."""

    asked: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def debit(self, user_id: uuid.UUID, job_id: uuid.UUID, cost: int) -> Outcome:
        first = not self.calls
        self.calls.append(("debit", job_id, cost))
        if first:
            self.asked.set()
            await self.gate.wait()
        answer = self.script.pop(0)
        assert isinstance(answer, Outcome)
        return answer


async def test_a_refusal_never_strands_a_parallel_retrys_charge(store: Store) -> None:
    """Q's debit is refused; tokens arrive; P, a parallel retry of the same request, must not
    debit while Q still holds the job, or Q's refusal would hide P's charge."""
    job = new_job()
    ledger = GatedLedger(script=[INSUFFICIENT, DONE])
    q = asyncio.create_task(Charger(store, ledger).create(job))
    await ledger.asked.wait()
    p = asyncio.create_task(Charger(store, ledger).create(job))
    await asyncio.sleep(0.3)
    assert len(ledger.calls) == 1, "a parallel call debited while the job was claimed"
    ledger.gate.set()
    with pytest.raises(ServiceError) as refused:
        await q
    assert refused.value.reason == "INSUFFICIENT_TOKENS"
    charged = await p
    assert charged.status is JobState.QUEUED
    assert await status_of(store, job.id) is JobState.QUEUED


async def test_a_refusal_from_a_claim_that_ran_out_settles_nothing(store: Store, ledger: FakeLedger) -> None:
    job = new_job()
    first = await store.insert_intent(job, "free")
    assert first is not None
    await claims_run_out(store)
    [second] = await store.claim([job.id])
    assert second.claims == first.claims + 1
    # The first holder's late refusal does not reject the job the second one now holds ...
    with pytest.raises(ServiceError):
        await charger(store, ledger).settle_charge(first, INSUFFICIENT)
    assert await status_of(store, job.id) is JobState.CHARGING
    # ... whose debit settles it.
    assert (await charger(store, ledger).settle_charge(second, DONE)).status is JobState.QUEUED


async def test_a_debit_of_an_earlier_request_is_given_back(store: Store, ledger: FakeLedger) -> None:
    """A takeover of a refused id with another request meets a debit of the earlier one: the id
    is not free; the earlier debit is refunded and the new request refused."""
    job = new_job(cost=5)
    earlier = Outcome(
        Result.REFUSED,
        code=grpc.StatusCode.ALREADY_EXISTS,
        reason="IDEMPOTENCY_KEY_REUSED",
        metadata={"reference_id": str(job.id), "delta": "-9", "reason": "GENERATION"},
    )
    ledger.script = [earlier, DONE]
    with pytest.raises(ServiceError) as reused:
        await charger(store, ledger).create(job)
    assert reused.value.reason == "JOB_ID_REUSED"
    assert ledger.calls == [("debit", job.id, 5), ("refund", job.id, 9)]
    settled = await store.job_any_status(job.id)
    assert settled is not None and settled.status is JobState.REJECTED
    assert (settled.refund_state, settled.tokens_cost) == (RefundState.DONE, 9)


async def test_two_reconcilers_racing_settle_each_row_once(store: Store, ledger: FakeLedger) -> None:
    jobs = [new_job() for _ in range(40)]
    for job in jobs:
        assert await store.insert_intent(job, "free") is not None
    await claims_run_out(store)
    first, second = reconciler(store, ledger), reconciler(store, ledger)
    for _ in range(4):  # 10 rows a pass each
        await asyncio.gather(first.run_once(), second.run_once())
    debited = Counter(job_id for kind, job_id, _ in ledger.calls if kind == "debit")
    assert debited == Counter({job.id: 1 for job in jobs})
    assert {await status_of(store, j.id) for j in jobs} == {JobState.QUEUED}
