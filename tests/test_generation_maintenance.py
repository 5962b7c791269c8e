"""Archive, pause and resume: the seed's maintenance SQL, in bounded batches."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo_common.timestamps import to_proto
from generation_service import store
from generation_service.charging import request_digest
from tests import support
from tests.generation_support import GenerationStub, TokenStub, create_job, job_request, running_job


async def _bulk_jobs(
    admin: asyncpg.Connection, count: int, status: str, completed_days_ago: int | None = None
) -> list[uuid.UUID]:
    rows = await admin.fetch(
        """
        INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest,
                                               completed_at, lease_expires_at)
        SELECT gen_random_uuid(), gen_random_uuid(), 'bulk', '{}'::jsonb, 1, $2, '\\x00'::bytea,
               now() - make_interval(days => $3),
               CASE WHEN $2 = 'RUNNING' THEN now() + interval '1 hour' END
        FROM generate_series(1, $1)
        RETURNING id
        """,
        count,
        status,
        completed_days_ago or 0,
    )
    return [r["id"] for r in rows]


async def _statuses(admin: asyncpg.Connection, ids: list[uuid.UUID]) -> dict[str, int]:
    rows = await admin.fetch(
        "SELECT status, count(*) AS n FROM generation.generation_job WHERE id = ANY($1::uuid[]) GROUP BY status", ids
    )
    return {r["status"]: r["n"] for r in rows}


async def test_archive_completed_jobs_in_batches(generation: GenerationStub, admin: asyncpg.Connection) -> None:
    count = store.MAINTENANCE_BATCH * 2 + 10
    old = await _bulk_jobs(admin, count, "SUCCEEDED", completed_days_ago=100)
    old_failed = await _bulk_jobs(admin, 5, "FAILED", completed_days_ago=100)
    old_failed += await _bulk_jobs(admin, 5, "CANCELLED", completed_days_ago=100)
    recent = await _bulk_jobs(admin, 5, "SUCCEEDED", completed_days_ago=10)
    old_running = await _bulk_jobs(admin, 5, "RUNNING", completed_days_ago=100)
    archived = await generation.ArchiveCompletedJobs(gpb.ArchiveCompletedJobsRequest())
    assert archived.archived >= count + 10
    assert await _statuses(admin, old + old_failed) == {"ARCHIVED": count + 10}
    assert await _statuses(admin, recent) == {"SUCCEEDED": 5}
    assert await _statuses(admin, old_running) == {"RUNNING": 5}
    again = await generation.ArchiveCompletedJobs(gpb.ArchiveCompletedJobsRequest(older_than_days=90))
    assert again.archived == 0
    week = await generation.ArchiveCompletedJobs(gpb.ArchiveCompletedJobsRequest(older_than_days=7))
    assert week.archived >= 5
    assert await _statuses(admin, recent) == {"ARCHIVED": 5}


async def test_pause_and_resume(generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection) -> None:
    user_id = await support.user_with_balance(token, 100)
    before = await create_job(generation, user_id)
    cutoff = datetime.now(UTC)
    after = [await create_job(generation, user_id) for _ in range(3)]
    running = await running_job(generation, user_id)
    paused = await generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=to_proto(cutoff)))
    assert paused.paused == 3
    ids = [uuid.UUID(j.job_id) for j in after]
    assert await _statuses(admin, ids) == {"PAUSED": 3}
    assert await _statuses(admin, [uuid.UUID(before.job_id)]) == {"QUEUED": 1}
    assert await _statuses(admin, [uuid.UUID(running.job_id)]) == {"RUNNING": 1}
    # Paused jobs are not claimable.
    claim = await generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id="w", lease_seconds=60))
    assert claim.job.job_id not in {j.job_id for j in after}
    resumed = await generation.ResumePausedJobs(gpb.ResumePausedJobsRequest(created_after=to_proto(cutoff)))
    assert resumed.resumed == 3
    assert await _statuses(admin, ids) == {"QUEUED": 3}
    await generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=to_proto(cutoff)))
    everything = await generation.ResumePausedJobs(gpb.ResumePausedJobsRequest())
    assert everything.resumed >= 3
    assert await _statuses(admin, ids) == {"QUEUED": 3}


async def test_pause_in_batches(generation: GenerationStub, admin: asyncpg.Connection) -> None:
    cutoff = await admin.fetchval("SELECT now()")
    count = store.MAINTENANCE_BATCH + 7
    ids = await _bulk_jobs(admin, count, "QUEUED")
    paused = await generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=to_proto(cutoff)))
    assert paused.paused >= count
    assert await _statuses(admin, ids) == {"PAUSED": count}


async def test_emergency_pause_does_not_skip_a_queued_job_that_is_momentarily_locked(
    generation: GenerationStub, token: TokenStub, database_url: str
) -> None:
    """PauseQueuedJobs is the emergency disable: every QUEUED job created after the cutoff must end
    PAUSED, including one whose row another call holds for a moment (here FOR SHARE, as a concurrent
    AttachAssetToJob takes it): the pause waits for it rather than skip it."""
    user_id = await support.user_with_balance(token, 10)
    job = (await generation.CreateGenerationJob(job_request(user_id))).job
    cutoff = Timestamp()
    cutoff.FromDatetime(job.created_at.ToDatetime() - timedelta(microseconds=1))
    other = await asyncpg.connect(database_url)
    try:
        locked = other.transaction()
        await locked.start()
        await other.execute("SELECT 1 FROM generation.generation_job WHERE id = $1 FOR SHARE", uuid.UUID(job.job_id))

        async def pause() -> gpb.PauseQueuedJobsResponse:
            return await generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=cutoff))

        pausing = asyncio.create_task(pause())
        await asyncio.sleep(0.5)
        await locked.rollback()
        paused = (await pausing).paused
    finally:
        await other.close()
    after = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job.job_id))).job
    assert (paused, after.status) == (1, gpb.JOB_STATUS_PAUSED)


async def test_emergency_pause_catches_a_job_whose_charge_was_in_flight(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    """A create whose charge is in flight when PauseQueuedJobs runs (here: an intent its caller
    abandoned, finished later by the reconciler) settles PAUSED, not QUEUED."""
    user_id = await support.user_with_balance(token, 10)
    request = job_request(user_id, cost=2)
    params = {"width": 1024, "height": 768, "steps": 30, "seed": 42, "model": "sdxl", "extra": {}}
    digest = request_digest(uuid.UUID(user_id), request.prompt, params, 2)
    created = await admin.fetchval(
        "INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest,"
        " updated_at) VALUES ($1, $2, $3, $4::jsonb, 2, 'CHARGING', $5, now() - interval '1 minute')"
        " RETURNING created_at",
        uuid.UUID(request.job_id),
        uuid.UUID(user_id),
        request.prompt,
        json.dumps(params),
        digest,
    )
    cutoff = Timestamp()
    cutoff.FromDatetime(created - timedelta(microseconds=1))
    await generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=cutoff))
    for _ in range(50):  # the reconciler settles the intent within a few of its passes
        status = await admin.fetchval(
            "SELECT status FROM generation.generation_job WHERE id = $1", uuid.UUID(request.job_id)
        )
        if status != "CHARGING":
            break
        await asyncio.sleep(0.2)
    job = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=request.job_id))).job
    assert job.status == gpb.JOB_STATUS_PAUSED, "a job created after the cutoff became QUEUED after the pause"
