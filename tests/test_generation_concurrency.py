"""Many callers at once: charges, duplicate job ids, workers claiming, lost leases."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from tests import support
from tests.generation_support import (
    GenerationStub,
    TokenStub,
    balance,
    create_job,
    drain_queue,
    job_request,
    no_mismatches,
    references,
)


@pytest.fixture(scope="module")
def sweep_interval_seconds() -> float:
    """Every claim sweeps: the lost-lease test ages leases through the admin connection and claims at once."""
    return 0.0


async def test_hundred_concurrent_creates_for_thirty_tokens(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 30)
    requests = [job_request(user_id, cost=1) for _ in range(100)]
    results = await asyncio.gather(*(generation.CreateGenerationJob(r) for r in requests), return_exceptions=True)
    created = [r.job for r in results if isinstance(r, gpb.CreateGenerationJobResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 30 and len(refused) == 70, [
        r for r in results if not isinstance(r, (gpb.CreateGenerationJobResponse, grpc.aio.AioRpcError))
    ]
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in refused)
    assert all(support.error_info(e).reason == "INSUFFICIENT_TOKENS" for e in refused)
    assert all(j.status == gpb.JOB_STATUS_QUEUED for j in created)
    assert await balance(token, user_id) == 0
    refs = await references(admin, user_id)
    assert refs == Counter({j.job_id: 1 for j in created})
    listed = await generation.ListGenerationJobs(gpb.ListGenerationJobsRequest(user_id=user_id, page_size=500))
    assert {j.job_id for j in listed.jobs} == {j.job_id for j in created}
    statuses = await admin.fetch(
        "SELECT status, count(*) FROM generation.generation_job WHERE user_id = $1 GROUP BY status", uuid.UUID(user_id)
    )
    assert dict(statuses) == {"QUEUED": 30, "REJECTED": 70}  # type: ignore[arg-type]
    await no_mismatches(token, user_id)


async def test_same_job_id_ten_times_at_once(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 100)
    request = job_request(user_id, cost=9)
    results = await asyncio.gather(*(generation.CreateGenerationJob(request) for _ in range(10)))
    assert {r.job.job_id for r in results} == {request.job_id}
    assert all(r.job.status == gpb.JOB_STATUS_QUEUED for r in results)
    assert await balance(token, user_id) == 91
    assert await references(admin, user_id) == {request.job_id: 1}
    assert (
        await admin.fetchval("SELECT count(*) FROM generation.generation_job WHERE user_id = $1", uuid.UUID(user_id))
        == 1
    )


async def test_twenty_workers_claim_two_hundred_jobs_once_each(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 1000)
    mine = set()
    for chunk in range(4):
        jobs = await asyncio.gather(*(create_job(generation, user_id) for _ in range(50)))
        mine |= {j.job_id for j in jobs}
        del chunk
    claims: list[tuple[str, str]] = []

    async def worker(name: str) -> None:
        while True:
            claim = await generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id=name, lease_seconds=600))
            if not claim.HasField("job"):
                return
            assert claim.job.status == gpb.JOB_STATUS_RUNNING and claim.job.worker_id == name
            claims.append((claim.job.job_id, name))

    await asyncio.gather(*(worker(f"worker-{n}") for n in range(20)))
    claimed = Counter(job_id for job_id, _ in claims)
    assert all(n == 1 for n in claimed.values()), [j for j, n in claimed.items() if n > 1]
    assert mine <= set(claimed)
    assert len({w for _, w in claims}) > 1, "claims were not spread over workers"
    rows = await admin.fetch(
        "SELECT worker_id, status FROM generation.generation_job WHERE id = ANY($1::uuid[])",
        [uuid.UUID(j) for j in mine],
    )
    assert {r["status"] for r in rows} == {"RUNNING"}
    owner = dict(claims)
    assert all(
        owner[str(j)] == w
        for j, w in await admin.fetch(
            "SELECT id, worker_id FROM generation.generation_job WHERE id = ANY($1::uuid[])",
            [uuid.UUID(j) for j in mine],
        )
    )


async def test_claim_takes_the_oldest_and_empty_queue_returns_no_job(
    generation: GenerationStub, token: TokenStub
) -> None:
    user_id = await support.user_with_balance(token, 10)
    await drain_queue(generation)
    empty = await generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id="w", lease_seconds=30))
    assert not empty.HasField("job")
    first = await create_job(generation, user_id)
    await create_job(generation, user_id)
    claim = await generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id="w", lease_seconds=30))
    assert claim.job.job_id == first.job_id
    assert claim.job.HasField("lease_expires_at") and claim.job.HasField("started_at")
    lease = claim.job.lease_expires_at.ToDatetime() - claim.job.updated_at.ToDatetime()
    assert 29 <= lease.total_seconds() <= 31


async def _expire_lease(admin: asyncpg.Connection, job_id: str) -> None:
    """Ages the lease instead of sleeping through it."""
    await admin.execute(
        "UPDATE generation.generation_job SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(job_id),
    )


async def test_expired_leases_requeue_then_fail_with_refund(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 10)
    await drain_queue(generation)
    job = await create_job(generation, user_id, cost=4)
    assert await balance(token, user_id) == 6
    claim = await generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id="w0", lease_seconds=60))
    assert claim.job.job_id == job.job_id
    for lost in range(1, 4):
        await _expire_lease(admin, job.job_id)
        # A claim sweeps expired leases first (so may the reconciler): the job is back in the queue
        # and claimed again, until its third lost lease fails it.
        claim = await generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id=f"w{lost}", lease_seconds=60))
        state = await admin.fetchrow(
            "SELECT status, lost_leases FROM generation.generation_job WHERE id = $1", uuid.UUID(job.job_id)
        )
        assert state is not None and state["lost_leases"] == lost
        if lost < 3:
            assert claim.job.job_id == job.job_id and claim.job.worker_id == f"w{lost}"
        else:
            assert state["status"] == "FAILED"
            assert not claim.HasField("job")
    failed = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job.job_id))).job
    assert failed.status == gpb.JOB_STATUS_FAILED
    assert "lease" in failed.error_message
    assert await balance(token, user_id) == 10
    assert await references(admin, user_id) == {job.job_id: 1, f"{job.job_id}:refund": 1}
    await no_mismatches(token, user_id)
