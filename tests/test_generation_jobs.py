"""Jobs through the real service: the charge, visibility, listing and the state machine."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.generation_support import (
    GenerationStub,
    TokenStub,
    balance,
    create_job,
    job_request,
    no_mismatches,
    references,
    running_job,
)


async def test_create_charges_once_and_queues(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 50)
    request = job_request(user_id, cost=7)
    request.params.extra.update({"style": "watercolor", "strength": 0.5})
    job = (await generation.CreateGenerationJob(request)).job
    assert job.status == gpb.JOB_STATUS_QUEUED
    assert (job.job_id, job.user_id, job.prompt, job.tokens_cost) == (request.job_id, user_id, request.prompt, 7)
    assert job.params == request.params
    assert job.HasField("created_at") and not job.HasField("started_at")
    assert await balance(token, user_id) == 43
    assert await references(admin, user_id) == {request.job_id: 1}
    fetched = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job.job_id))).job
    assert fetched == job
    await no_mismatches(token, user_id)


async def test_same_job_id_same_request_is_the_same_job(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 10)
    request = job_request(user_id, cost=3)
    first = (await generation.CreateGenerationJob(request)).job
    again = (await generation.CreateGenerationJob(request)).job
    assert again == first
    assert await balance(token, user_id) == 7
    assert await references(admin, user_id) == {request.job_id: 1}


@pytest.mark.parametrize("change", ["prompt", "cost", "params"])
async def test_same_job_id_other_request_is_already_exists(
    generation: GenerationStub, token: TokenStub, change: str
) -> None:
    user_id = await support.user_with_balance(token, 10)
    request = job_request(user_id, cost=3)
    await generation.CreateGenerationJob(request)
    other = job_request(user_id, job_id=request.job_id, cost=3)
    if change == "prompt":
        other.prompt = "something else"
    elif change == "cost":
        other = job_request(user_id, job_id=request.job_id, cost=4)
    else:
        other.params.steps = 31
    error = await support.expect_error(
        generation.CreateGenerationJob(other), grpc.StatusCode.ALREADY_EXISTS, "JOB_ID_REUSED"
    )
    assert support.error_info(error).domain == "blumpo.generation"
    assert await balance(token, user_id) == 7


async def test_insufficient_tokens_lists_nothing_and_may_be_retried(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 5)
    request = job_request(user_id, cost=8)
    error = await support.expect_error(
        generation.CreateGenerationJob(request), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_TOKENS"
    )
    info = support.error_info(error)
    assert (info.metadata["balance"], info.metadata["requested"]) == ("5", "8")
    await support.expect_error(
        generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=request.job_id)), grpc.StatusCode.NOT_FOUND
    )
    listed = await generation.ListGenerationJobs(gpb.ListGenerationJobsRequest(user_id=user_id))
    assert list(listed.jobs) == []
    assert await references(admin, user_id) == {}
    hidden = gpb.UpdateGenerationJobStatusRequest(job_id=request.job_id, status=gpb.JOB_STATUS_PAUSED)
    await support.expect_error(generation.UpdateGenerationJobStatus(hidden), grpc.StatusCode.NOT_FOUND)
    # Once the balance allows it, the same request goes through, charged once.
    await token.AppendLedgerEntry(
        tpb.AppendLedgerEntryRequest(
            user_id=user_id, delta=10, reason=tpb.LEDGER_REASON_PURCHASE, reference_id=f"buy-{uuid.uuid4()}"
        )
    )
    job = (await generation.CreateGenerationJob(request)).job
    assert job.status == gpb.JOB_STATUS_QUEUED
    assert await balance(token, user_id) == 7
    assert await references(admin, user_id) == {request.job_id: 1}


async def test_unknown_user_is_not_found_and_lists_nothing(
    generation: GenerationStub, admin: asyncpg.Connection
) -> None:
    user_id = str(uuid.uuid4())
    request = job_request(user_id)
    await support.expect_error(generation.CreateGenerationJob(request), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    # The token service said so when asked for the plan, before anything was written.
    status = await admin.fetchval(
        "SELECT status FROM generation.generation_job WHERE id = $1", uuid.UUID(request.job_id)
    )
    assert status is None
    listed = await generation.ListGenerationJobs(gpb.ListGenerationJobsRequest(user_id=user_id))
    assert list(listed.jobs) == []


async def test_get_unknown_job_is_not_found(generation: GenerationStub) -> None:
    await support.expect_error(
        generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=str(uuid.uuid4()))),
        grpc.StatusCode.NOT_FOUND,
        "JOB_NOT_FOUND",
    )


async def test_list_newest_first_with_pages_and_status_filter(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 100)
    jobs = [await create_job(generation, user_id) for _ in range(5)]
    await generation.UpdateGenerationJobStatus(
        gpb.UpdateGenerationJobStatusRequest(job_id=jobs[1].job_id, status=gpb.JOB_STATUS_PAUSED)
    )
    seen: list[str] = []
    token_ = ""
    for _ in range(10):
        page = await generation.ListGenerationJobs(
            gpb.ListGenerationJobsRequest(user_id=user_id, page_size=2, page_token=token_)
        )
        assert len(page.jobs) <= 2
        seen += [j.job_id for j in page.jobs]
        token_ = page.next_page_token
        if not token_:
            break
    assert seen == [j.job_id for j in reversed(jobs)]
    paused = await generation.ListGenerationJobs(
        gpb.ListGenerationJobsRequest(user_id=user_id, statuses=[gpb.JOB_STATUS_PAUSED])
    )
    assert [j.job_id for j in paused.jobs] == [jobs[1].job_id]
    # A token is bound to its query.
    first = await generation.ListGenerationJobs(gpb.ListGenerationJobsRequest(user_id=user_id, page_size=2))
    for bad in (first.next_page_token[:-2] + "xx", "not-a-token"):
        error = await support.expect_error(
            generation.ListGenerationJobs(gpb.ListGenerationJobsRequest(user_id=user_id, page_token=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert support.bad_fields(error) == ["page_token"]
    other_query = gpb.ListGenerationJobsRequest(
        user_id=user_id, statuses=[gpb.JOB_STATUS_QUEUED], page_token=first.next_page_token
    )
    await support.expect_error(generation.ListGenerationJobs(other_query), grpc.StatusCode.INVALID_ARGUMENT)


async def test_list_uses_the_user_time_index(admin: asyncpg.Connection) -> None:
    from generation_service.store import Q

    await _bulk_rows(admin)
    plan = await _explain(
        admin, Q["list_jobs"].sql, uuid.uuid4(), datetime.max, uuid.UUID(int=2**128 - 1), ["QUEUED"], 51
    )
    assert "idx_generation_job_user_time" in plan, plan


async def _bulk_rows(admin: asyncpg.Connection) -> None:
    """Enough rows of other users that a sequential scan would cost more than the index."""
    if await admin.fetchval("SELECT count(*) FROM generation.generation_job") > 5000:
        return
    await admin.execute(
        """
        INSERT INTO generation.generation_job
          (id, user_id, prompt, params, tokens_cost, status, request_digest, created_at)
        SELECT gen_random_uuid(), gen_random_uuid(), 'bulk', '{}'::jsonb, 1, 'ARCHIVED', '\\x00'::bytea,
               now() - make_interval(days => 400 + n % 50)
        FROM generate_series(1, 6000) AS n
        """
    )
    await admin.execute("ANALYZE generation.generation_job")


async def _explain(admin: asyncpg.Connection, sql: str, *args: object) -> str:
    async with admin.transaction():
        await admin.execute("SET LOCAL search_path = generation")
        rows = await admin.fetch("EXPLAIN " + sql, *args)
    return "\n".join(r[0] for r in rows)


# What UpdateGenerationJobStatus allows: RUNNING only through a claim, and RUNNING to CANCELLED
# only once the user asked (test_generation_workers.py).
ALLOWED = {
    (gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_PAUSED),
    (gpb.JOB_STATUS_PAUSED, gpb.JOB_STATUS_QUEUED),
    (gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED),
    (gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_FAILED),
    (gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_FAILED),
    (gpb.JOB_STATUS_SUCCEEDED, gpb.JOB_STATUS_ARCHIVED),
    (gpb.JOB_STATUS_FAILED, gpb.JOB_STATUS_ARCHIVED),
    (gpb.JOB_STATUS_CANCELLED, gpb.JOB_STATUS_ARCHIVED),
}
# How to bring a fresh job to each status: claimed first or not, then the moves.
PATHS = {
    gpb.JOB_STATUS_QUEUED: (False, []),
    gpb.JOB_STATUS_PAUSED: (False, [gpb.JOB_STATUS_PAUSED]),
    gpb.JOB_STATUS_RUNNING: (True, []),
    gpb.JOB_STATUS_SUCCEEDED: (True, [gpb.JOB_STATUS_SUCCEEDED]),
    gpb.JOB_STATUS_FAILED: (False, [gpb.JOB_STATUS_FAILED]),
    gpb.JOB_STATUS_ARCHIVED: (False, [gpb.JOB_STATUS_FAILED, gpb.JOB_STATUS_ARCHIVED]),
    gpb.JOB_STATUS_CANCELLED: (False, [gpb.JOB_STATUS_CANCELLED]),
}
MOVES = [(source, target) for source in PATHS for target in PATHS]


def _name(status: gpb.JobStatus.ValueType) -> str:
    return gpb.JobStatus.Name(status).removeprefix("JOB_STATUS_")


async def _move(generation: GenerationStub, job_id: str, status: int, message: str = "", lease_id: str = "") -> gpb.Job:
    request = gpb.UpdateGenerationJobStatusRequest(
        job_id=job_id,
        status=status,  # type: ignore[arg-type]
        error_message=message,
        lease_id=lease_id,
    )
    return (await generation.UpdateGenerationJobStatus(request)).job


async def _step(generation: GenerationStub, job: gpb.Job, status: int) -> gpb.Job:
    """A move by the job's worker (its lease), or by the user for CANCELLED."""
    if status == gpb.JOB_STATUS_CANCELLED:
        cancel = gpb.CancelGenerationJobRequest(job_id=job.job_id, user_id=job.user_id)
        return (await generation.CancelGenerationJob(cancel)).job
    return await _move(generation, job.job_id, status, lease_id=job.lease_id)


@pytest.mark.parametrize(("source", "target"), MOVES, ids=[f"{_name(s)}-{_name(t)}" for s, t in MOVES])
async def test_each_move_of_the_state_machine(
    generation: GenerationStub, token: TokenStub, source: gpb.JobStatus.ValueType, target: gpb.JobStatus.ValueType
) -> None:
    user_id = await support.user_with_balance(token, 10)
    claimed, steps = PATHS[source]
    job = await (running_job if claimed else create_job)(generation, user_id)
    for step in steps:
        job = await _step(generation, job, step)
    assert job.status == source
    if (source, target) in ALLOWED or (source == target and target != gpb.JOB_STATUS_RUNNING):
        moved = await _move(generation, job.job_id, target, lease_id=job.lease_id)
        assert moved.status == target
        if source == target:
            assert moved.updated_at == job.updated_at, "a no-op writes nothing"
    else:
        error = await support.expect_error(
            _move(generation, job.job_id, target, lease_id=job.lease_id),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_TRANSITION",
        )
        assert support.error_info(error).metadata["current_status"] == _name(source)


async def test_moves_stamp_times(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await running_job(generation, user_id)
    assert job.HasField("started_at") and not job.HasField("completed_at")
    done = await _move(generation, job.job_id, gpb.JOB_STATUS_SUCCEEDED, lease_id=job.lease_id)
    assert done.HasField("completed_at")
    assert done.started_at == job.started_at
    assert done.completed_at.ToDatetime() >= done.started_at.ToDatetime()


async def test_failing_refunds_exactly_once(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 20)
    job = await running_job(generation, user_id, cost=6)
    assert await balance(token, user_id) == 14
    failed = await _move(generation, job.job_id, gpb.JOB_STATUS_FAILED, "out of GPU memory", job.lease_id)
    assert failed.status == gpb.JOB_STATUS_FAILED and failed.error_message == "out of GPU memory"
    again = await _move(generation, job.job_id, gpb.JOB_STATUS_FAILED, "again", job.lease_id)
    assert again.error_message == "out of GPU memory"
    await _move(generation, job.job_id, gpb.JOB_STATUS_ARCHIVED)
    assert await balance(token, user_id) == 20
    assert await references(admin, user_id) == {job.job_id: 1, f"{job.job_id}:refund": 1}
    state = await admin.fetchval(
        "SELECT refund_state FROM generation.generation_job WHERE id = $1", uuid.UUID(job.job_id)
    )
    assert state == "DONE"
    await no_mismatches(token, user_id)


async def test_racing_moves_cannot_both_win(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 200)
    for _ in range(10):
        job = await running_job(generation, user_id)
        results = await asyncio.gather(
            _move(generation, job.job_id, gpb.JOB_STATUS_SUCCEEDED, lease_id=job.lease_id),
            _move(generation, job.job_id, gpb.JOB_STATUS_FAILED, lease_id=job.lease_id),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, gpb.Job)]
        losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(wins) == 1 and len(losses) == 1, results
        assert losses[0].code() == grpc.StatusCode.FAILED_PRECONDITION
        final = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job.job_id))).job
        assert final.status == wins[0].status
    counts = await references(admin, user_id)
    assert all(n == 1 for n in counts.values())
    await no_mismatches(token, user_id)


async def test_update_unknown_job_is_not_found(generation: GenerationStub) -> None:
    await support.expect_error(_move(generation, str(uuid.uuid4()), gpb.JOB_STATUS_RUNNING), grpc.StatusCode.NOT_FOUND)


async def test_the_caller_request_id_follows_the_charge_into_the_token_service(
    generation: GenerationStub, token: TokenStub, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = await support.user_with_balance(token, 10)
    request_id = f"trace-{uuid.uuid4()}"
    with caplog.at_level(logging.INFO, logger="blumpo_common.server"):
        await generation.CreateGenerationJob(job_request(user_id), metadata=(("x-request-id", request_id),))
    calls = {
        (getattr(r, "method", None), getattr(r, "code", None))
        for r in caplog.records
        if getattr(r, "request_id", None) == request_id
    }
    assert calls == {
        ("/blumpo.generation.v1.GenerationService/CreateGenerationJob", "OK"),
        ("/blumpo.token.v1.TokenService/GetTokenBalance", "OK"),
        ("/blumpo.token.v1.TokenService/AppendLedgerEntry", "OK"),
    }


async def test_refused_create_leaves_the_job_id_free_for_another_request(
    generation: GenerationStub, token: TokenStub
) -> None:
    """A rejected call writes nothing: after INSUFFICIENT_TOKENS the job id names no job, so a
    different request with that id (e.g. a cheaper one) must be judged as new, not ALREADY_EXISTS."""
    user_id = await support.user_with_balance(token, 5)
    job_id = str(uuid.uuid4())
    await support.expect_error(
        generation.CreateGenerationJob(job_request(user_id, job_id=job_id, cost=50)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await support.expect_error(
        generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job_id)), grpc.StatusCode.NOT_FOUND
    )
    job = (await generation.CreateGenerationJob(job_request(user_id, job_id=job_id, cost=3))).job
    assert job.status == gpb.JOB_STATUS_QUEUED
    assert await balance(token, user_id) == 2


async def test_refund_of_a_failed_job_is_not_lost_to_the_balance_limit(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    """Entering FAILED refunds the cost exactly once. A credit that lands between the debit and
    the failure and fills the account to the 10^15 cap must not make the refund impossible."""
    cap = 10**15
    user_id = await support.user_with_balance(token, 100)
    fill = cap - 100 - 5
    deltas = [10**12] * (fill // 10**12) + ([fill % 10**12] if fill % 10**12 else [])
    results = (
        await token.AppendLedgerEntries(
            tpb.AppendLedgerEntriesRequest(
                entries=[
                    tpb.AppendLedgerEntryRequest(
                        user_id=user_id, delta=d, reason=tpb.LEDGER_REASON_PURCHASE, reference_id=f"fill-{i}"
                    )
                    for i, d in enumerate(deltas)
                ]
            )
        )
    ).results
    assert all(r.status.code == 0 for r in results)
    assert await balance(token, user_id) == cap - 5
    job = (await generation.CreateGenerationJob(job_request(user_id, cost=5))).job
    await token.AppendLedgerEntry(
        tpb.AppendLedgerEntryRequest(
            user_id=user_id, delta=10, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="top-up"
        )
    )
    assert await balance(token, user_id) == cap
    await generation.UpdateGenerationJobStatus(
        gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=gpb.JOB_STATUS_FAILED, error_message="gpu lost")
    )
    refunds = await admin.fetchval(
        "SELECT count(*) FROM token.token_ledger WHERE user_id = $1 AND reference_id = $2",
        uuid.UUID(user_id),
        f"{job.job_id}:refund",
    )
    assert refunds == 1, "the failed job's cost was never given back"
    # From above the cap, debits are applied: spent back down, the account is where it started.
    excess = await balance(token, user_id) - 100
    await token.AppendLedgerEntries(
        tpb.AppendLedgerEntriesRequest(
            entries=[
                tpb.AppendLedgerEntryRequest(
                    user_id=user_id,
                    delta=-min(10**12, excess - n),
                    reason=tpb.LEDGER_REASON_ADJUSTMENT,
                    reference_id=f"spend-{n}",
                )
                for n in range(0, excess, 10**12)
            ]
        )
    )
    assert await balance(token, user_id) == 100
