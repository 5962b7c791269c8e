"""The lease sweep judges each job as it is when the sweep locks it, not as it was when the
statement began: an asset attached, or a cancel asked for, that commits in between decides the
job's end. The window is a few microseconds in production; a copy of the sweep with a pause
before its scan (SWEEP_WITH_PAUSE) holds it open long enough to commit into it."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from generation_service import rules
from generation_service.api import GenerationApi
from generation_service.charging import ReconcilerSettings
from generation_service.model import Job
from generation_service.server import Parts as GenerationParts
from generation_service.store import LEASE_SWEEP_BATCH, Q
from tests import support
from tests.generation_support import (
    GenerationStub,
    TokenStub,
    balance,
    lane_request,
    ledger_matches_jobs,
    running_job,
)

PAUSE_SECONDS = 3.0
_SCAN = "WHERE status = 'RUNNING' AND lease_expires_at < now()"
# The sweep statement as it is, with a pause (an InitPlan run once, after the statement's
# snapshot is taken and before the first row is read and locked). Test-only.
_PAUSE = f"(SELECT true FROM pg_sleep({PAUSE_SECONDS}))"
SWEEP_WITH_PAUSE = Q["sweep_expired_leases"].sql.replace(_SCAN, f"{_SCAN} AND {_PAUSE}")
assert SWEEP_WITH_PAUSE.count("pg_sleep") == 1, "the sweep's scan changed: update _SCAN"


@pytest.fixture(scope="module")
def reconciler_settings() -> ReconcilerSettings:
    """No passes after the first (at start-up, with no jobs yet): only the test sweeps."""
    return ReconcilerSettings(claim_seconds=3.0, interval_seconds=3600.0)


async def _sweep_with_pause(parts: GenerationParts) -> list[Job]:
    args = Q["sweep_expired_leases"].args(
        (),
        {
            "batch": LEASE_SWEEP_BATCH,
            "max_lost_leases": rules.MAX_LOST_LEASES,
            "owing": sorted(rules.UNDELIVERED),
            "claim_seconds": parts.store.claim_seconds,
        },
    )
    async with parts.store.pool.acquire() as conn:
        swept = [Job.from_row(r) for r in await conn.fetch(SWEEP_WITH_PAUSE, *args)]
    for job in swept:  # what the reconciler does after its sweep
        await parts.charger.refund(job)
    return swept


async def _paused(admin: asyncpg.Connection) -> None:
    """Waits until the sweep's statement is in its pause."""
    for _ in range(int(PAUSE_SECONDS / 0.01)):
        if await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'"
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the sweep never reached its pause")


@pytest.mark.parametrize(
    ("change", "lost_leases", "expected", "refunded"),
    [
        # The worker's attach commits on its third lease: before, the sweep FAILED it and refunded it.
        ("has_assets = true", rules.MAX_LOST_LEASES - 1, "SUCCEEDED", False),
        # The user's cancel commits: before, the sweep put the job back in the queue.
        ("cancel_requested = true", 0, "CANCELLED", True),
    ],
)
async def test_a_change_committed_while_the_sweep_runs_decides_the_job(
    generation: GenerationStub,
    token: TokenStub,
    admin: asyncpg.Connection,
    generation_parts: GenerationParts,
    change: str,
    lost_leases: int,
    expected: str,
    refunded: bool,
) -> None:
    user_id = await support.user_with_balance(token, 20)
    job = await running_job(generation, user_id, cost=7)
    job_id = uuid.UUID(job.job_id)
    # The lease runs out (the worker is slow), on the job's last lease for the first case.
    await admin.execute(
        "UPDATE generation.generation_job SET lease_expires_at = now() - interval '1 second', lost_leases = $2"
        " WHERE id = $1",
        job_id,
        lost_leases,
    )
    sweep = asyncio.ensure_future(_sweep_with_pause(generation_parts))
    await _paused(admin)  # the sweep's snapshot is taken; it pauses before its scan
    await admin.execute(f"UPDATE generation.generation_job SET {change} WHERE id = $1", job_id)
    assert not sweep.done(), "the change must commit while the sweep runs"
    swept = await sweep
    assert [s.id for s in swept] == [job_id], "the sweep must take the job, with the change committed"
    row = await admin.fetchrow(
        "SELECT status, refund_state, lease_id FROM generation.generation_job WHERE id = $1", job_id
    )
    assert row is not None
    assert (row["status"], row["lease_id"]) == (expected, None)
    assert row["refund_state"] == ("DONE" if refunded else "NONE")
    assert await balance(token, user_id) == (20 if refunded else 13)
    await ledger_matches_jobs(admin, token, [user_id])


async def queued_in_a_lane(generation: GenerationStub, token: TokenStub, jobs: int) -> gpb.CreateGenerationJobRequest:
    """Jobs queued in a lane (a model) of their own, each of another owner (a free plan runs two
    at most); the request of the last."""
    request = lane_request(await support.user_with_balance(token, 20))
    for _ in range(jobs):
        request.user_id = await support.user_with_balance(token, 20)
        request.job_id = str(uuid.uuid4())
        await generation.CreateGenerationJob(request)
    return request


async def test_claims_sweep_at_most_once_per_interval(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection, generation_parts: GenerationParts
) -> None:
    """A claim sweeps the leases that ran out when the process's last sweep is an interval old,
    or when it finds the queue empty; claims in between that find a job do not (here nothing else
    sweeps: the reconciler makes no passes)."""
    parts = generation_parts
    api = GenerationApi(parts.store, parts.charger, parts.hub, parts.pages, sweep_interval_seconds=2.0)
    # One running job an owner, and queued jobs in a lane.
    owners = [await support.user_with_balance(token, 20) for _ in range(3)]
    first, second, third = [await running_job(generation, owner) for owner in owners]
    lane = await queued_in_a_lane(generation, token, 6)

    async def run_out(job: gpb.Job) -> None:
        await admin.execute(
            "UPDATE generation.generation_job SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(job.job_id),
        )

    async def status(job: gpb.Job) -> str:
        return str(
            await admin.fetchval("SELECT status FROM generation.generation_job WHERE id = $1", uuid.UUID(job.job_id))
        )

    async def claims(model: str, n: int) -> list[gpb.ClaimNextJobResponse]:
        request = gpb.ClaimNextJobRequest(worker_id="sweeper", lease_seconds=60, models=[model])
        return await asyncio.gather(*(api.ClaimNextJob(request, None) for _ in range(n)))  # type: ignore[arg-type]

    await run_out(first)
    await claims("no-such-model", 8)
    assert await status(first) == "QUEUED"
    await run_out(second)
    assert all(reply.HasField("job") for reply in await claims(lane.params.model, 3))
    assert await status(second) == "RUNNING", "swept within the interval by a claim that found a job"
    assert not (await claims("no-such-model", 1))[0].HasField("job")
    assert await status(second) == "QUEUED", "a claim that finds the queue empty sweeps"
    await run_out(third)
    assert all(reply.HasField("job") for reply in await claims(lane.params.model, 2))
    assert await status(third) == "RUNNING"
    await asyncio.sleep(2.1)
    assert all(reply.HasField("job") for reply in await claims(lane.params.model, 1))
    assert await status(third) == "QUEUED", "swept by the first claim after the interval"
    await ledger_matches_jobs(admin, token, owners)


async def test_a_full_sweep_is_followed_by_another_at_the_next_claim(
    generation: GenerationStub,
    token: TokenStub,
    admin: asyncpg.Connection,
    generation_parts: GenerationParts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep that took a full batch may have left more behind: the next claim sweeps again,
    however long the interval (here a batch of one, and an hour)."""
    import generation_service.api
    import generation_service.store

    monkeypatch.setattr(generation_service.store, "LEASE_SWEEP_BATCH", 1)
    monkeypatch.setattr(generation_service.api, "LEASE_SWEEP_BATCH", 1)
    parts = generation_parts
    api = GenerationApi(parts.store, parts.charger, parts.hub, parts.pages, sweep_interval_seconds=3600.0)
    owners = [await support.user_with_balance(token, 20) for _ in range(2)]
    jobs = [await running_job(generation, owner) for owner in owners]
    lane = await queued_in_a_lane(generation, token, 3)
    await admin.execute(
        "UPDATE generation.generation_job SET lease_expires_at = now() - interval '1 second' WHERE id = ANY($1)",
        [uuid.UUID(job.job_id) for job in jobs],
    )

    async def queued() -> int:
        return int(
            await admin.fetchval(
                "SELECT count(*) FROM generation.generation_job WHERE id = ANY($1) AND status = 'QUEUED'",
                [uuid.UUID(job.job_id) for job in jobs],
            )
        )

    claim = gpb.ClaimNextJobRequest(worker_id="sweeper", lease_seconds=60, models=[lane.params.model])
    for expected in (1, 2, 2):
        assert (await api.ClaimNextJob(claim, None)).HasField("job")  # type: ignore[arg-type]
        assert await queued() == expected
    await ledger_matches_jobs(admin, token, owners)
