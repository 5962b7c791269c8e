"""Archive, pause and resume: the seed's maintenance SQL, in bounded batches."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo_common.timestamps import to_proto
from generation_service import store
from tests import support
from tests.generation_support import GenerationStub, TokenStub, create_job, running_job


async def _bulk_jobs(
    admin: asyncpg.Connection, count: int, status: str, completed_days_ago: int | None = None
) -> list[uuid.UUID]:
    rows = await admin.fetch(
        """
        INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest,
                                               completed_at)
        SELECT gen_random_uuid(), gen_random_uuid(), 'bulk', '{}'::jsonb, 1, $2, '\\x00'::bytea,
               now() - make_interval(days => $3)
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
    recent = await _bulk_jobs(admin, 5, "SUCCEEDED", completed_days_ago=10)
    old_running = await _bulk_jobs(admin, 5, "RUNNING", completed_days_ago=100)
    archived = await generation.ArchiveCompletedJobs(gpb.ArchiveCompletedJobsRequest())
    assert archived.archived >= count + 5
    assert await _statuses(admin, old + old_failed) == {"ARCHIVED": count + 5}
    assert await _statuses(admin, recent) == {"SUCCEEDED": 5}
    assert await _statuses(admin, old_running) == {"RUNNING": 5}
    again = await generation.ArchiveCompletedJobs(gpb.ArchiveCompletedJobsRequest(older_than_days=90))
    assert again.archived == 0
    week = await generation.ArchiveCompletedJobs(gpb.ArchiveCompletedJobsRequest(older_than_days=7))
    assert week.archived >= 5
    assert await _statuses(admin, recent) == {"ARCHIVED": 5}
    # The claim-test queue must not see these rows.
    await admin.execute(
        "UPDATE generation.generation_job SET status = 'ARCHIVED' WHERE id = ANY($1::uuid[])", old_running
    )


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
    # Leave nothing claimable behind.
    await admin.execute("UPDATE generation.generation_job SET status = 'ARCHIVED' WHERE id = ANY($1::uuid[])", ids)
