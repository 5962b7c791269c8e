"""A model that predicts every reply of the generation service and every charge and refund.

A Hypothesis state machine drives the real generation service (charging through the real token
service) over real channels: jobs created, created again with the same and with another request,
refused for want of tokens and taken over later, claimed by workers, leases lost (made to run out
through the admin connection), every status move the contract allows and refuses, the emergency
pause and its resume, and the archive of completed jobs (made old through the admin connection).
An in-memory model written from the contract and docs/generation.md predicts each answer, each
job's state, each balance and each ledger entry of a job exactly.

ClaimNextJob and the pause and resume act on the whole database, so the module's database holds
this machine's jobs only, and each example leaves no job queued, paused, running or made old.
The reconciler makes no passes here: only ClaimNextJob sweeps expired leases, when the model says.
"""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from generation_service.charging import ReconcilerSettings
from tests import support
from tests.generation_support import flat_model, params_costing
from tests.model_support import Refusal, World, answer, machine_settings, now_and_then, run_machine
from tests.support import GenerationStub, TokenStub

QUEUED, RUNNING, SUCCEEDED = gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED
FAILED, ARCHIVED, PAUSED = gpb.JOB_STATUS_FAILED, gpb.JOB_STATUS_ARCHIVED, gpb.JOB_STATUS_PAUSED
STATUSES = [QUEUED, RUNNING, SUCCEEDED, FAILED, ARCHIVED, PAUSED]
# The moves the contract allows (a RUNNING job's under its live lease; RUNNING itself is reached
# only by a claim); setting the status a job has is a no-op; anything else is refused.
ALLOWED = {
    (QUEUED, PAUSED),
    (PAUSED, QUEUED),
    (RUNNING, SUCCEEDED),
    (RUNNING, FAILED),
    (QUEUED, FAILED),
    (SUCCEEDED, ARCHIVED),
    (FAILED, ARCHIVED),
}
MAX_LOST_LEASES = 3  # the third lost lease fails the job (docs/generation.md)
LEASE_SECONDS = 300  # never runs out by itself during a run: the machine makes it run out
GHOST = "00000000-0000-4000-8000-000000000000"  # a user id no example creates
EPOCH = Timestamp(seconds=0)

PROMPTS = st.sampled_from(["a lighthouse at dusk", "a storm over wheat fields"])
COSTS = st.integers(1, 60)
OLD = st.sampled_from([2, 10, 100])  # days ago a completed job is made to have completed


def status_name(status: gpb.JobStatus.ValueType) -> str:
    return gpb.JobStatus.Name(status).removeprefix("JOB_STATUS_")


def moment(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def create_request(user_id: str, job_id: str, prompt: str, cost: int) -> gpb.CreateGenerationJobRequest:
    """A job of a model of the tests' price list that costs cost, at that price."""
    params = params_costing(cost)
    params.extra.update({"style": "watercolor"})
    return gpb.CreateGenerationJobRequest(
        user_id=user_id, job_id=job_id, prompt=prompt, params=params, tokens_cost=cost
    )


@dataclass
class ModelJob:
    """Where a visible job stands, as far as a caller can see it."""

    request: gpb.CreateGenerationJobRequest
    created_at: Timestamp
    status: gpb.JobStatus.ValueType = QUEUED
    error_message: str = ""
    worker_id: str = ""
    # The current lease's id, kept after the job leaves RUNNING (cleared by the sweep).
    lease_id: str = ""
    leased: bool = False
    lease_ran_out: bool = False
    lost_leases: int = 0
    started: bool = False
    completed: bool = False
    completed_days_ago: int = 0

    @property
    def key(self) -> tuple[datetime, uuid.UUID]:
        """Its place in the queue and in lists: created_at, then id."""
        return moment(self.created_at), uuid.UUID(self.request.job_id)

    def check(self, job: gpb.Job) -> None:
        asked = self.request
        got = (job.job_id, job.user_id, job.prompt, job.params, job.tokens_cost, job.created_at)
        assert got == (asked.job_id, asked.user_id, asked.prompt, asked.params, asked.tokens_cost, self.created_at)
        state = (
            status_name(job.status),
            job.error_message,
            job.worker_id,
            job.HasField("lease_expires_at"),
            job.HasField("started_at"),
            job.HasField("completed_at"),
        )
        expected = (
            status_name(self.status),
            self.error_message,
            self.worker_id,
            self.leased,
            self.started,
            self.completed,
        )
        assert state == expected, (
            f"job {asked.job_id}: (status, error, worker, lease, started, completed) {state}, expected {expected}"
        )


@dataclass
class Model:
    balances: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, ModelJob] = field(default_factory=dict)  # visible jobs
    refused: dict[str, gpb.CreateGenerationJobRequest] = field(default_factory=dict)  # refused ids, last request
    # Each user's ledger entries of jobs: (user, reference) -> delta. A debit per job, a refund per failure.
    charges: dict[tuple[str, str], int] = field(default_factory=dict)

    def refund(self, job: ModelJob) -> None:
        user, reference = job.request.user_id, f"{job.request.job_id}:refund"
        assert (user, reference) not in self.charges, "refunded twice"
        self.charges[user, reference] = job.request.tokens_cost
        self.balances[user] += job.request.tokens_cost

    def create(self, asked: gpb.CreateGenerationJobRequest) -> ModelJob | Refusal | None:
        """The job a create answers (None: a new one, its created_at to be read from the answer),
        or its refusal. A refused id is free for any request, the same or another."""
        existing = self.jobs.get(asked.job_id)
        if existing is not None:
            if existing.request == asked:
                return existing
            return Refusal(grpc.StatusCode.ALREADY_EXISTS, "JOB_ID_REUSED", {"job_id": asked.job_id})
        user, cost = asked.user_id, asked.tokens_cost
        if user not in self.balances:
            self.refused[asked.job_id] = asked
            return Refusal(grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", {"user_id": user})
        if self.balances[user] < cost:
            self.refused[asked.job_id] = asked
            held = {"balance": str(self.balances[user]), "requested": str(cost), "job_id": asked.job_id}
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_TOKENS", held)
        return None

    def charged(self, asked: gpb.CreateGenerationJobRequest, job: gpb.Job) -> ModelJob:
        self.refused.pop(asked.job_id, None)
        self.balances[asked.user_id] -= asked.tokens_cost
        self.charges[asked.user_id, asked.job_id] = -asked.tokens_cost
        made = self.jobs[asked.job_id] = ModelJob(asked, job.created_at)
        return made

    def sweep(self) -> list[ModelJob]:
        """RUNNING jobs whose lease ran out back to the queue; the third lost lease fails (refunded)."""
        swept = [job for job in self.jobs.values() if job.status == RUNNING and job.lease_ran_out]
        for job in swept:
            job.lost_leases += 1
            job.worker_id, job.lease_id, job.leased, job.lease_ran_out = "", "", False, False
            if job.lost_leases >= MAX_LOST_LEASES:
                job.status, job.completed, job.completed_days_ago = FAILED, True, 0
                job.error_message = f"the worker lease expired {job.lost_leases} times"
                self.refund(job)
            else:
                job.status = QUEUED
        return swept

    def claim(self, worker_id: str) -> ModelJob | None:
        queued = [job for job in self.jobs.values() if job.status == QUEUED]
        if not queued:
            return None
        oldest = min(queued, key=lambda job: job.key)
        oldest.status, oldest.worker_id, oldest.leased, oldest.started = RUNNING, worker_id, True, True
        return oldest

    def move(self, job_id: str, target: gpb.JobStatus.ValueType, error_message: str) -> ModelJob | Refusal:
        """A move asked under the job's current lease (what its worker holds)."""
        job = self.jobs.get(job_id)
        if job is None:
            return Refusal(grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"key": job_id})
        held = {"job_id": job_id, "current_status": status_name(job.status), "requested_status": status_name(target)}
        if target == RUNNING:
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION", held)
        if job.status == RUNNING and job.lease_ran_out:
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST", {"job_id": job_id})
        if (job.status, target) not in ALLOWED:
            if job.status == target:
                return job
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION", held)
        job.status, job.leased, job.lease_ran_out = target, False, False
        if target in (SUCCEEDED, FAILED):
            job.completed, job.completed_days_ago = True, 0
        if target == FAILED:
            job.error_message = error_message
            self.refund(job)
        return job

    def visible(self, user_id: str, statuses: list[gpb.JobStatus.ValueType] | None = None) -> list[ModelJob]:
        """A user's jobs as lists show them: newest first."""
        mine = [
            j for j in self.jobs.values() if j.request.user_id == user_id and (not statuses or j.status in statuses)
        ]
        return sorted(mine, key=lambda job: job.key, reverse=True)


def check_answer(predicted: ModelJob | Refusal, got: gpb.Job | Refusal) -> None:
    if isinstance(predicted, Refusal):
        assert got == predicted, f"answered {got}, expected {predicted}"
    else:
        assert not isinstance(got, Refusal), f"refused: {got}, expected job {predicted}"
        predicted.check(got)


def job_of(
    response: gpb.CreateGenerationJobResponse
    | gpb.UpdateGenerationJobStatusResponse
    | gpb.GetGenerationJobResponse
    | Refusal,
) -> gpb.Job | Refusal:
    return response if isinstance(response, Refusal) else response.job


class JobsMachine(RuleBasedStateMachine):
    users = Bundle("users")
    # One draw in eight is a user that does not exist.
    accounts = now_and_then(users, st.just(GHOST), 8)

    def __init__(self, world: World, token: TokenStub, generation: GenerationStub, admin: asyncpg.Connection) -> None:
        super().__init__()
        self.world = world
        self.token = token
        self.generation = generation
        self.admin = admin
        self.model = Model()
        self.purchases = 0
        world.examples += 1

    def _pick(self, data: st.DataObject, choices: list[str]) -> str:
        """One of the choices, drawn as a number of fixed range so that reruns draw alike."""
        return choices[data.draw(st.integers(0, 2**16)) % len(choices)]

    def _create(self, asked: gpb.CreateGenerationJobRequest) -> None:
        predicted = self.model.create(asked)
        got = job_of(self.world.run(lambda: answer(self.generation.CreateGenerationJob(asked))))
        if predicted is None:
            assert not isinstance(got, Refusal), f"refused: {got}, expected a new job"
            predicted = self.model.charged(asked, got)
            self.world.seen["create charged"] += 1
        else:
            self.world.seen[f"create {predicted.reason if isinstance(predicted, Refusal) else 'same job'}"] += 1
        check_answer(predicted, got)

    @initialize(target=users, costs=st.lists(COSTS, max_size=4))
    def first_user_and_jobs(self, costs: list[int]) -> str:
        user = self._new_user()
        for cost in costs:
            self._create(create_request(user, str(uuid.uuid4()), "a lighthouse at dusk", cost))
        return user

    @precondition(lambda self: len(self.model.balances) < 3)
    @rule(target=users)
    def another_user(self) -> str:
        return self._new_user()

    def _new_user(self) -> str:
        made = self.world.run(lambda: self.token.CreateUser(tpb.CreateUserRequest(email=support.new_email())))
        assert made.user.account.balance == 100  # the free plan's signup grant
        self.model.balances[made.user.user_id] = 100
        return made.user.user_id

    @rule(user=users, amount=st.integers(1, 200))
    def buy_tokens(self, user: str, amount: int) -> None:
        self.purchases += 1
        asked = tpb.AppendLedgerEntryRequest(
            user_id=user, delta=amount, reason=tpb.LEDGER_REASON_PURCHASE, reference_id=f"purchase-{self.purchases}"
        )
        bought = self.world.run(lambda: self.token.AppendLedgerEntry(asked))
        self.model.balances[user] += amount
        assert bought.entry.balance_after == self.model.balances[user]

    @rule(user=accounts, prompt=PROMPTS, cost=COSTS)
    def create(self, user: str, prompt: str, cost: int) -> None:
        self._create(create_request(user, str(uuid.uuid4()), prompt, cost))

    @precondition(lambda self: self.model.jobs or self.model.refused)
    @rule(data=st.data())
    def create_again(self, data: st.DataObject) -> None:
        """The same request again: the same job and no second debit, or, for a refused id, a new try."""
        job_id = self._pick(data, [*self.model.jobs, *self.model.refused])
        job = self.model.jobs.get(job_id)
        self._create(job.request if job is not None else self.model.refused[job_id])

    @precondition(lambda self: self.model.jobs or self.model.refused)
    @rule(data=st.data(), change=st.sampled_from(["prompt", "cost", "user"]), user=users)
    def create_with_another_request(self, data: st.DataObject, change: str, user: str) -> None:
        """The id with another request: JOB_ID_REUSED, or, for a refused id, taken by that request."""
        job_id = self._pick(data, [*self.model.jobs, *self.model.refused])
        job = self.model.jobs.get(job_id)
        asked = gpb.CreateGenerationJobRequest()
        asked.CopyFrom(job.request if job is not None else self.model.refused[job_id])
        if change == "prompt":
            asked.prompt += " (again)"
        elif change == "cost":
            asked.tokens_cost += 1
            asked.params.model = flat_model(asked.tokens_cost)
        else:
            asked.user_id = user if user != asked.user_id else GHOST
        self._create(asked)

    @rule(worker=st.sampled_from(["gpu-1", "gpu-2"]))
    def claim(self, worker: str) -> None:
        """The sweep of lost leases first, then the oldest QUEUED job, RUNNING for the worker."""
        swept = self.model.sweep()
        predicted = self.model.claim(worker)
        claimed = self.world.run(
            lambda: self.generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id=worker, lease_seconds=LEASE_SECONDS))
        )
        if predicted is None:
            assert not claimed.HasField("job"), f"claimed {claimed.job}, expected an empty queue"
        else:
            assert claimed.HasField("job"), f"nothing claimed, expected {predicted.request.job_id}"
            predicted.check(claimed.job)
            predicted.lease_id = claimed.job.lease_id
        self.world.seen["claim" if predicted else "claim of an empty queue"] += 1
        self.world.seen["lease lost"] += len(swept)
        self.world.seen["failed after lost leases"] += sum(1 for job in swept if job.status == FAILED)

    def _lose_leases(self, jobs: list[ModelJob]) -> None:
        """Makes the leases run out, as if their workers died."""
        ids = [uuid.UUID(job.request.job_id) for job in jobs]
        changed = self.world.run(
            lambda: self.admin.execute(
                "UPDATE generation.generation_job SET lease_expires_at = now() - interval '1 second' "
                "WHERE id = ANY($1::uuid[]) AND status = 'RUNNING'",
                ids,
            )
        )
        assert changed == f"UPDATE {len(ids)}"
        for job in jobs:
            job.lease_ran_out = True

    def _leased(self) -> list[ModelJob]:
        return [
            job for job in self.model.jobs.values() if job.status == RUNNING and job.leased and not job.lease_ran_out
        ]

    @precondition(lambda self: self._leased())
    @rule(data=st.data())
    def lose_a_lease(self, data: st.DataObject) -> None:
        leased = self._leased()
        self._lose_leases([leased[data.draw(st.integers(0, 2**16)) % len(leased)]])

    @rule(worker=st.sampled_from(["gpu-1", "gpu-2"]))
    def workers_die_then_one_claims(self, worker: str) -> None:
        """Every lease runs out, then a worker claims: the sweep requeues (or fails) those jobs first."""
        if leased := self._leased():
            self._lose_leases(leased)
        self.claim(worker)

    def _move(self, job_id: str, to: gpb.JobStatus.ValueType, error_message: str) -> None:
        before = self.model.jobs[job_id].status if job_id in self.model.jobs else None
        lease_id = self.model.jobs[job_id].lease_id if job_id in self.model.jobs else ""
        predicted = self.model.move(job_id, to, error_message)
        asked = gpb.UpdateGenerationJobStatusRequest(
            job_id=job_id, status=to, error_message=error_message, lease_id=lease_id
        )
        got = job_of(self.world.run(lambda: answer(self.generation.UpdateGenerationJobStatus(asked))))
        check_answer(predicted, got)
        what = predicted.reason if isinstance(predicted, Refusal) else "no-op" if before == to else "moved"
        self.world.seen[f"move {what}"] += 1

    @precondition(lambda self: self.model.jobs)
    @rule(
        data=st.data(),
        to=st.sampled_from(STATUSES),
        onward=st.booleans(),
        error_message=st.sampled_from(["", "model crashed"]),
    )
    def move(self, data: st.DataObject, to: gpb.JobStatus.ValueType, onward: bool, error_message: str) -> None:
        """Every move, allowed or not; onward, one the job's status allows, so jobs go through
        their whole life (a move drawn among all is refused more often than not)."""
        job_id = self._pick(data, list(self.model.jobs))
        allowed = sorted(target for source, target in ALLOWED if source == self.model.jobs[job_id].status)
        step = data.draw(st.integers(0, 2**16))
        self._move(job_id, allowed[step % len(allowed)] if onward and allowed else to, error_message)

    @rule(data=st.data(), to=st.sampled_from(STATUSES))
    def move_a_hidden_job(self, data: st.DataObject, to: gpb.JobStatus.ValueType) -> None:
        """A job that was refused, or never asked for, is not found."""
        self._move(self._pick(data, [*self.model.refused, str(uuid.uuid4())]), to, "")

    def _cutoff(self, data: st.DataObject) -> Timestamp:
        """The start of time, or the creation of one of the jobs (jobs created after it are taken)."""
        stamps = [EPOCH, *(job.created_at for job in self.model.jobs.values())]
        return stamps[data.draw(st.integers(0, 2**16)) % len(stamps)]

    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        cutoff = self._cutoff(data)
        taken = [j for j in self.model.jobs.values() if j.status == QUEUED and moment(j.created_at) > moment(cutoff)]
        for job in taken:
            job.status = PAUSED
        paused = self.world.run(
            lambda: self.generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=cutoff))
        )
        assert paused.paused == len(taken)
        self.world.seen["paused"] += len(taken)

    @rule(data=st.data(), everything=st.booleans())
    def resume(self, data: st.DataObject, everything: bool) -> None:
        cutoff = None if everything else self._cutoff(data)
        taken = [
            j
            for j in self.model.jobs.values()
            if j.status == PAUSED and (cutoff is None or moment(j.created_at) > moment(cutoff))
        ]
        for job in taken:
            job.status = QUEUED
        asked = gpb.ResumePausedJobsRequest(created_after=cutoff)
        resumed = self.world.run(lambda: self.generation.ResumePausedJobs(asked))
        assert resumed.resumed == len(taken)
        self.world.seen["resumed"] += len(taken)

    def _completed(self) -> list[ModelJob]:
        return [job for job in self.model.jobs.values() if job.status in (SUCCEEDED, FAILED)]

    def _make_old(self, data: st.DataObject, days: int) -> None:
        """One completed job completed days ago."""
        completed = self._completed()
        job = completed[data.draw(st.integers(0, 2**16)) % len(completed)]
        changed = self.world.run(
            lambda: self.admin.execute(
                "UPDATE generation.generation_job SET completed_at = now() - make_interval(days => $2) WHERE id = $1",
                uuid.UUID(job.request.job_id),
                days,
            )
        )
        assert changed == "UPDATE 1"
        job.completed_days_ago = days

    @precondition(lambda self: self._completed())
    @rule(data=st.data(), days=OLD)
    def completed_long_ago(self, data: st.DataObject, days: int) -> None:
        self._make_old(data, days)

    @rule(data=st.data(), older_than_days=st.sampled_from([0, 1, 7]), first_make_old=st.one_of(st.none(), OLD))
    def archive(self, data: st.DataObject, older_than_days: int, first_make_old: int | None) -> None:
        """SUCCEEDED and FAILED jobs completed before then (0: the default, 90 days); first, now and
        then, one more job made old (else old jobs are rare: a job must complete, then be made old)."""
        if first_make_old is not None and self._completed():
            self._make_old(data, first_make_old)
        days = older_than_days or 90
        taken = [job for job in self._completed() if job.completed_days_ago > days]
        for job in taken:
            job.status = ARCHIVED
        asked = gpb.ArchiveCompletedJobsRequest(older_than_days=older_than_days)
        archived = self.world.run(lambda: self.generation.ArchiveCompletedJobs(asked))
        assert archived.archived == len(taken)
        self.world.seen["archived"] += len(taken)

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        job_id = self._pick(data, [*self.model.jobs, *self.model.refused, str(uuid.uuid4())])
        got = job_of(
            self.world.run(lambda: answer(self.generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job_id))))
        )
        job = self.model.jobs.get(job_id)
        check_answer(
            job if job is not None else Refusal(grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"key": job_id}), got
        )

    @rule(
        user=users,
        statuses=st.lists(st.sampled_from(STATUSES), max_size=3, unique=True),
        page_size=st.sampled_from([0, 1, 2, 3]),
    )
    def walk_pages(self, user: str, statuses: list[gpb.JobStatus.ValueType], page_size: int) -> None:
        """A user's jobs of some statuses (none: all), newest first, page after page."""
        expected = self.model.visible(user, statuses)
        size = page_size or 50
        first = gpb.ListGenerationJobsRequest(user_id=user, statuses=statuses, page_size=page_size)
        seen: list[gpb.Job] = []
        pages = 0
        page_request = first
        for _ in range(len(expected) // size + 2):
            page = self.world.run(functools.partial(self.generation.ListGenerationJobs, page_request))
            pages += 1
            seen.extend(page.jobs)
            if not page.next_page_token:
                break
            page_request = gpb.ListGenerationJobsRequest()
            page_request.CopyFrom(first)
            page_request.page_token = page.next_page_token
        assert [job.job_id for job in seen] == [job.request.job_id for job in expected]
        for job, listed in zip(expected, seen, strict=True):
            job.check(listed)
        assert pages == max(1, math.ceil(len(expected) / size))
        self.world.seen["page walk"] += 1

    @invariant()
    def balances_jobs_and_charges_match(self) -> None:
        """After every step: each balance, each user's jobs, and each ledger entry of a job."""
        self.world.steps += 1
        users = list(self.model.balances)
        balances, listed, checks, entries = self.world.run(lambda: self._observe(users))
        assert [got.balance for got in balances] == [self.model.balances[user] for user in users]
        for user, jobs in zip(users, listed, strict=True):
            expected = self.model.visible(user)
            assert [job.job_id for job in jobs.jobs] == [job.request.job_id for job in expected]
            for job, got in zip(expected, jobs.jobs, strict=True):
                job.check(got)
        assert all(check.accounts_checked == 1 and not check.mismatches for check in checks), checks
        assert entries == self.model.charges

    async def _observe(
        self, users: list[str]
    ) -> tuple[
        list[tpb.GetTokenBalanceResponse],
        list[gpb.ListGenerationJobsResponse],
        list[tpb.CheckBalancesResponse],
        dict[tuple[str, str], int],
    ]:
        balances = asyncio.gather(*(self.token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=u)) for u in users))
        listed = asyncio.gather(
            *(
                self.generation.ListGenerationJobs(gpb.ListGenerationJobsRequest(user_id=u, page_size=500))
                for u in users
            )
        )
        checks = asyncio.gather(*(self.token.CheckBalances(tpb.CheckBalancesRequest(user_id=u)) for u in users))
        rows = await self.admin.fetch(
            "SELECT user_id, reference_id, delta FROM token.token_ledger "
            "WHERE user_id = ANY($1::uuid[]) AND reason IN ('GENERATION', 'GENERATION_REFUND')",
            [uuid.UUID(u) for u in users],
        )
        entries = {(str(r["user_id"]), r["reference_id"]): r["delta"] for r in rows}
        return await balances, await listed, await checks, entries

    def teardown(self) -> None:
        """Leaves nothing the next example's claims, pauses or archives would meet: no job queued,
        paused or running (failed here, without a refund: these users are not used again), and
        none completed long ago."""
        self.world.run(lambda: self.admin.execute(CLEAN_UP))


CLEAN_UP = """
UPDATE generation.generation_job SET status = 'FAILED', completed_at = now(), lease_expires_at = NULL
WHERE status IN ('QUEUED', 'PAUSED', 'RUNNING');
UPDATE generation.generation_job SET completed_at = now()
WHERE status IN ('SUCCEEDED', 'FAILED') AND completed_at < now() - interval '1 hour';
"""


@pytest.fixture(scope="module")
def reconciler_settings() -> ReconcilerSettings:
    """No passes after the first (at start-up, with no jobs yet): only ClaimNextJob sweeps leases."""
    return ReconcilerSettings(claim_seconds=3.0, interval_seconds=3600.0)


@pytest.fixture(scope="module")
def sweep_interval_seconds() -> float:
    """Every claim sweeps, as the model says (leases run out through the admin connection, at once)."""
    return 0.0


async def test_the_model_predicts_every_reply_of_the_generation_service(
    token: TokenStub, generation: GenerationStub, admin: asyncpg.Connection
) -> None:
    assert await admin.fetchval("SELECT count(*) FROM generation.generation_job") == 0, "the module's jobs only"
    world = World(asyncio.get_running_loop())
    await run_machine(
        world, lambda: JobsMachine(world, token, generation, admin), machine_settings(max_examples=30, steps=50)
    )
    print(world.report("jobs model"))
    assert world.steps >= world.examples * 2
    everything = await token.CheckBalances(tpb.CheckBalancesRequest())
    assert everything.accounts_checked >= world.examples and not everything.mismatches
