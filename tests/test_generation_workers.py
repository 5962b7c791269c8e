"""Workers and users in control: fenced leases, heartbeats with progress, cancellation, routing
by model, priority with aging, plan caps, server-side prices, and delivered means paid. Each
money-moving test ends on the ledger invariants (ledger_matches_jobs)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from blumpo_common.config import ConfigError
from blumpo_common.validation import Checker
from generation_service import config as generation_config
from generation_service.api import check_params
from generation_service.charging import request_digest
from generation_service.model import NewJob
from generation_service.server import Parts as GenerationParts
from generation_service.store import Q
from tests import support
from tests.generation_support import (
    GenerationStub,
    TokenStub,
    asset_input,
    balance,
    claim,
    claim_this,
    finish,
    lane_job,
    lane_request,
    ledger_matches_jobs,
    references,
    refunds_paid,
    running_job,
)

# A lease short enough to run out within a test.
SHORT_LEASE = 2
RAN_OUT_SECONDS = SHORT_LEASE + 0.3


async def _get(generation: GenerationStub, job_id: str) -> gpb.Job:
    return (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job_id))).job


async def _renew(
    generation: GenerationStub, job: gpb.Job, percent: int = 0, message: str = "", lease_id: str | None = None
) -> gpb.RenewJobLeaseResponse:
    return await generation.RenewJobLease(
        gpb.RenewJobLeaseRequest(
            job_id=job.job_id,
            worker_id=job.worker_id,
            lease_id=job.lease_id if lease_id is None else lease_id,
            lease_seconds=60,
            progress_percent=percent,
            progress_message=message,
        )
    )


async def _cancel(generation: GenerationStub, job: gpb.Job, user_id: str = "") -> gpb.Job:
    request = gpb.CancelGenerationJobRequest(job_id=job.job_id, user_id=user_id or job.user_id)
    return (await generation.CancelGenerationJob(request)).job


async def _attach(generation: GenerationStub, job: gpb.Job, lease_id: str | None = None) -> gpb.Asset:
    request = gpb.AttachAssetToJobRequest(
        job_id=job.job_id,
        user_id=job.user_id,
        asset=asset_input(),
        lease_id=job.lease_id if lease_id is None else lease_id,
    )
    return (await generation.AttachAssetToJob(request)).asset


def _variant(
    asset: gpb.Asset, job: gpb.Job, user_id: str = "", lease_id: str | None = None
) -> gpb.AddAssetVariantRequest:
    return gpb.AddAssetVariantRequest(
        asset_id=asset.asset_id,
        user_id=user_id or asset.user_id,
        lease_id=job.lease_id if lease_id is None else lease_id,
        kind=gpb.VARIANT_KIND_THUMBNAIL,
        storage_key=f"thumbs/{asset.asset_id}.webp",
        mime_type="image/webp",
        bytes_size=100,
        width=256,
        height=256,
        format=gpb.IMAGE_FORMAT_WEBP,
    )


# Fenced leases.


async def test_a_claim_hands_out_a_fresh_lease_and_only_it_moves_the_job(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await running_job(generation, user_id, cost=3)
    assert job.status == gpb.JOB_STATUS_RUNNING and job.worker_id == "worker"
    assert uuid.UUID(job.lease_id) and job.HasField("lease_expires_at")
    assert job.lease_expires_at.ToDatetime() > job.started_at.ToDatetime()
    for lease_id in ("", str(uuid.uuid4())):
        for status in (gpb.JOB_STATUS_SUCCEEDED, gpb.JOB_STATUS_FAILED):
            request = gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=status, lease_id=lease_id)
            await support.expect_error(
                generation.UpdateGenerationJobStatus(request), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST"
            )
        await support.expect_error(
            _renew(generation, job, lease_id=lease_id or str(uuid.uuid4())),
            grpc.StatusCode.FAILED_PRECONDITION,
            "LEASE_LOST",
        )
        await support.expect_error(
            _attach(generation, job, lease_id), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST"
        )
    assert await _get(generation, job.job_id) == job, "a refused call changes nothing"
    assert (
        await admin.fetchval("SELECT count(*) FROM generation.asset_image WHERE job_id = $1", uuid.UUID(job.job_id))
        == 0
    )
    done = await finish(generation, job, gpb.JOB_STATUS_SUCCEEDED)
    assert done.status == gpb.JOB_STATUS_SUCCEEDED and not done.HasField("lease_expires_at")
    # The worker's retry of its move (an answer lost on the way) is the same answer.
    assert await finish(generation, job, gpb.JOB_STATUS_SUCCEEDED) == done
    await ledger_matches_jobs(admin, token, [user_id])


async def test_workers_racing_after_a_lease_ran_out_finish_once(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 100)
    first = [await running_job(generation, user_id, worker_id="a", lease_seconds=SHORT_LEASE) for _ in range(10)]
    await asyncio.sleep(RAN_OUT_SECONDS)
    # Worker b's claims sweep the expired leases and take the jobs back, each under a new lease.
    second = [await claim_this(generation, job, worker_id="b") for job in first]
    assert all(b.lease_id != a.lease_id and b.worker_id == "b" for a, b in zip(first, second, strict=True))

    async def both(a: gpb.Job, b: gpb.Job) -> tuple[gpb.Job | BaseException, gpb.Job | BaseException]:
        return await asyncio.gather(
            finish(generation, a, gpb.JOB_STATUS_FAILED, "a gave up"),
            finish(generation, b, gpb.JOB_STATUS_SUCCEEDED),
            return_exceptions=True,
        )

    outcomes = await asyncio.gather(*(both(a, b) for a, b in zip(first, second, strict=True)))
    for current, results in zip(second, outcomes, strict=True):
        lost, won = results
        assert isinstance(won, gpb.Job) and won.status == gpb.JOB_STATUS_SUCCEEDED, won
        assert isinstance(lost, grpc.aio.AioRpcError) and support.error_info(lost).reason == "LEASE_LOST", lost
        final = await _get(generation, current.job_id)
        assert (final.status, final.worker_id) == (gpb.JOB_STATUS_SUCCEEDED, "b")
    assert await balance(token, user_id) == 90, "ten jobs paid, none refunded"
    await ledger_matches_jobs(admin, token, [user_id])


async def test_a_lease_lost_to_the_sweep_refuses_the_old_worker(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await running_job(generation, user_id, lease_seconds=SHORT_LEASE)
    await asyncio.sleep(RAN_OUT_SECONDS)
    # Ran out but not swept yet: already lost.
    await support.expect_error(_renew(generation, job), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    await claim(generation, models=("no-such-model",))  # a claim sweeps
    requeued = await _get(generation, job.job_id)
    assert (requeued.status, requeued.lease_id, requeued.worker_id) == (gpb.JOB_STATUS_QUEUED, "", "")
    for status in (gpb.JOB_STATUS_SUCCEEDED, gpb.JOB_STATUS_FAILED):
        await support.expect_error(finish(generation, job, status), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    await ledger_matches_jobs(admin, token, [user_id])


# Heartbeats with progress.


async def test_renewals_extend_the_lease_and_stream_progress(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await lane_job(generation, user_id)
    stream = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=30)
    seen: list[tuple[int, int, str]] = []
    running: gpb.Job | None = None
    # Each step waits for the stream to show the one before (watchers may miss intermediate states).
    async for response in stream:
        got = response.job
        seen.append((got.status, got.progress_percent, got.progress_message))
        if got.status == gpb.JOB_STATUS_QUEUED:
            running = await claim_this(generation, job, lease_seconds=30)
            continue
        assert running is not None
        if got.status == gpb.JOB_STATUS_RUNNING and got.progress_percent == 0:
            renewed = await _renew(generation, running, 40, "denoising")
            assert renewed.job.lease_expires_at.ToDatetime() > running.lease_expires_at.ToDatetime()
            assert not renewed.cancel_requested
            # The same progress again extends the lease and sends watchers nothing.
            again = await _renew(generation, running, 40, "denoising")
            assert again.job.updated_at == renewed.job.updated_at
            assert again.job.lease_expires_at.ToDatetime() >= renewed.job.lease_expires_at.ToDatetime()
        elif got.status == gpb.JOB_STATUS_RUNNING and got.progress_percent == 40:
            await _renew(generation, running, 90, "upscaling")
        elif got.status == gpb.JOB_STATUS_RUNNING:
            await finish(generation, running, gpb.JOB_STATUS_SUCCEEDED)
    assert seen == [
        (gpb.JOB_STATUS_QUEUED, 0, ""),
        (gpb.JOB_STATUS_RUNNING, 0, ""),
        (gpb.JOB_STATUS_RUNNING, 40, "denoising"),
        (gpb.JOB_STATUS_RUNNING, 90, "upscaling"),
        (gpb.JOB_STATUS_SUCCEEDED, 90, "upscaling"),
    ]


# Cancellation.


async def test_cancel_a_waiting_job_refunds_it_once(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 20)
    queued = await lane_job(generation, user_id, cost=4)
    paused = await lane_job(generation, user_id, cost=5)
    await generation.UpdateGenerationJobStatus(
        gpb.UpdateGenerationJobStatusRequest(job_id=paused.job_id, status=gpb.JOB_STATUS_PAUSED)
    )
    assert await balance(token, user_id) == 11
    for job in (queued, paused):
        cancelled = await _cancel(generation, job)
        assert cancelled.status == gpb.JOB_STATUS_CANCELLED and cancelled.HasField("completed_at")
        assert await _cancel(generation, job) == cancelled, "cancelling twice is a no-op"
        assert await claim(generation, models=(job.params.model,)) is None
    await refunds_paid(admin, [user_id])
    assert await balance(token, user_id) == 20
    assert await references(admin, user_id) == {
        queued.job_id: 1,
        f"{queued.job_id}:refund": 1,
        paused.job_id: 1,
        f"{paused.job_id}:refund": 1,
    }
    await ledger_matches_jobs(admin, token, [user_id])
    # A cancelled job is terminal: a watch sends it and ends; it archives like a finished one.
    stream = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=queued.job_id), timeout=10)
    assert [r.job.status async for r in stream] == [gpb.JOB_STATUS_CANCELLED]
    archived = await generation.UpdateGenerationJobStatus(
        gpb.UpdateGenerationJobStatusRequest(job_id=queued.job_id, status=gpb.JOB_STATUS_ARCHIVED)
    )
    assert archived.job.status == gpb.JOB_STATUS_ARCHIVED


async def test_cancel_refusals(generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection) -> None:
    user_id = await support.user_with_balance(token, 20)
    other = await support.user_with_balance(token, 20)
    job = await lane_job(generation, user_id)
    await support.expect_error(
        _cancel(generation, job, user_id=other), grpc.StatusCode.PERMISSION_DENIED, "JOB_NOT_OWNED"
    )
    assert (await _get(generation, job.job_id)).status == gpb.JOB_STATUS_QUEUED
    done = await finish(generation, await claim_this(generation, job), gpb.JOB_STATUS_SUCCEEDED)
    error = await support.expect_error(
        _cancel(generation, done), grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION"
    )
    assert support.error_info(error).metadata["current_status"] == "SUCCEEDED"
    missing = gpb.Job(job_id=str(uuid.uuid4()), user_id=user_id)
    await support.expect_error(_cancel(generation, missing), grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    # A worker may not cancel a job its user did not ask to cancel.
    running = await running_job(generation, user_id)
    await support.expect_error(
        finish(generation, running, gpb.JOB_STATUS_CANCELLED), grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION"
    )
    await ledger_matches_jobs(admin, token, [user_id, other])


async def test_cancel_a_running_job_reaches_its_worker_at_its_next_renewal(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 20)
    job = await running_job(generation, user_id, cost=7)
    marked = await _cancel(generation, job)
    assert (marked.status, marked.cancel_requested) == (gpb.JOB_STATUS_RUNNING, True)
    assert await _cancel(generation, job) == marked, "cancelling twice is a no-op"
    renewed = await _renew(generation, job, 30, "stopping")
    assert renewed.cancel_requested and renewed.job.cancel_requested
    assert await balance(token, user_id) == 13, "not refunded before the worker stopped"
    cancelled = await finish(generation, job, gpb.JOB_STATUS_CANCELLED)
    assert cancelled.status == gpb.JOB_STATUS_CANCELLED
    assert await finish(generation, job, gpb.JOB_STATUS_CANCELLED) == cancelled
    await refunds_paid(admin, [user_id])
    assert await balance(token, user_id) == 20
    await ledger_matches_jobs(admin, token, [user_id])


async def test_a_cancelled_job_whose_worker_went_quiet_is_cancelled_by_the_sweep(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 20)
    job = await running_job(generation, user_id, cost=6, lease_seconds=SHORT_LEASE)
    await _cancel(generation, job)
    await asyncio.sleep(RAN_OUT_SECONDS)
    await claim(generation, models=("no-such-model",))  # a claim sweeps
    swept = await _get(generation, job.job_id)
    assert (swept.status, swept.lease_id) == (gpb.JOB_STATUS_CANCELLED, "")
    await refunds_paid(admin, [user_id])
    assert await balance(token, user_id) == 20
    await support.expect_error(
        finish(generation, job, gpb.JOB_STATUS_SUCCEEDED), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST"
    )
    await ledger_matches_jobs(admin, token, [user_id])


async def test_cancel_racing_a_worker_ends_one_way_and_refunds_only_a_cancel(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    """The user cancels while a worker claims the job, renews and finishes it: the worker that
    learns of the cancel stops (CANCELLED), else it delivers (SUCCEEDED); never both."""
    user_id = await support.user_with_balance(token, 1000)
    jobs = [await lane_job(generation, user_id, cost=3) for _ in range(20)]

    async def work(job: gpb.Job) -> None:
        running = await claim(generation, models=(job.params.model,))
        if running is None:
            return  # cancelled before it was claimed
        renewed = await _renew(generation, running, 50)
        # A cancel asked between the renewal and the finish: SUCCEEDED still delivers.
        status = gpb.JOB_STATUS_CANCELLED if renewed.cancel_requested else gpb.JOB_STATUS_SUCCEEDED
        await finish(generation, running, status)

    async def cancel(job: gpb.Job) -> None:
        try:
            await _cancel(generation, job)
        except grpc.aio.AioRpcError as error:
            # The worker delivered before the cancel arrived: a finished job stays finished.
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
            assert f"job {job.job_id} is SUCCEEDED" in (error.details() or ""), error

    await asyncio.gather(*(task for job in jobs for task in (work(job), cancel(job))))
    finals = [await _get(generation, job.job_id) for job in jobs]
    assert {f.status for f in finals} <= {gpb.JOB_STATUS_CANCELLED, gpb.JOB_STATUS_SUCCEEDED}
    cancelled = [f for f in finals if f.status == gpb.JOB_STATUS_CANCELLED]
    await refunds_paid(admin, [user_id])
    assert await balance(token, user_id) == 1000 - 3 * (len(jobs) - len(cancelled))
    await ledger_matches_jobs(admin, token, [user_id])


# Delivered means paid.


async def test_a_job_with_an_asset_cannot_fail_or_be_cancelled(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 20)
    job = await running_job(generation, user_id, cost=5)
    await _attach(generation, job)
    await _cancel(generation, job)
    for status in (gpb.JOB_STATUS_FAILED, gpb.JOB_STATUS_CANCELLED):
        await support.expect_error(
            finish(generation, job, status), grpc.StatusCode.FAILED_PRECONDITION, "JOB_HAS_ASSETS"
        )
    assert (await _get(generation, job.job_id)).status == gpb.JOB_STATUS_RUNNING
    assert (await finish(generation, job, gpb.JOB_STATUS_SUCCEEDED)).status == gpb.JOB_STATUS_SUCCEEDED
    # A worker that went quiet after attaching: the sweep completes the job, paid.
    quiet = await running_job(generation, user_id, cost=5, lease_seconds=SHORT_LEASE)
    await _attach(generation, quiet)
    await asyncio.sleep(RAN_OUT_SECONDS)
    await claim(generation, models=("no-such-model",))
    assert (await _get(generation, quiet.job_id)).status == gpb.JOB_STATUS_SUCCEEDED
    assert await balance(token, user_id) == 10
    await ledger_matches_jobs(admin, token, [user_id])


async def test_a_failure_racing_an_attach_never_refunds_a_delivered_job(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 100)
    jobs = [await running_job(generation, user_id, cost=2) for _ in range(20)]
    await asyncio.gather(
        *(call for job in jobs for call in (_attach(generation, job), finish(generation, job, gpb.JOB_STATUS_FAILED))),
        return_exceptions=True,
    )
    for job in jobs:
        final = await _get(generation, job.job_id)
        assets = await admin.fetchval(
            "SELECT count(*) FROM generation.asset_image WHERE job_id = $1", uuid.UUID(job.job_id)
        )
        assert (final.status, assets) in ((gpb.JOB_STATUS_FAILED, 0), (gpb.JOB_STATUS_RUNNING, 1)), (final, assets)
    await ledger_matches_jobs(admin, token, [user_id])


async def test_variants_need_the_owner_and_the_live_lease(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 20)
    other = await support.user_with_balance(token, 20)
    job = await running_job(generation, user_id)
    asset = await _attach(generation, job)
    await support.expect_error(
        generation.AddAssetVariant(_variant(asset, job, user_id=other)),
        grpc.StatusCode.PERMISSION_DENIED,
        "ASSET_NOT_OWNED",
    )
    for lease_id in ("", str(uuid.uuid4())):
        await support.expect_error(
            generation.AddAssetVariant(_variant(asset, job, lease_id=lease_id)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "LEASE_LOST",
        )
    assert (await generation.GetAsset(gpb.GetAssetRequest(asset_id=asset.asset_id))).asset.variants == []
    added = (await generation.AddAssetVariant(_variant(asset, job))).variant
    await finish(generation, job, gpb.JOB_STATUS_SUCCEEDED)
    # A SUCCEEDED job's assets take variants without a lease.
    again = (await generation.AddAssetVariant(_variant(asset, job, lease_id=""))).variant
    assert again == added


# Routing, caps and priority. Jobs here share a lane (one model), so that claims of that model see only them.


def _lane_requests(user_id: str, count: int, model: str = "") -> list[gpb.CreateGenerationJobRequest]:
    first = lane_request(user_id)
    model = model or first.params.model
    requests = []
    for _ in range(count):
        request = lane_request(user_id)
        request.params.model = model
        requests.append(request)
    return requests


async def test_a_claim_takes_only_the_models_asked_for(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 20)
    job = await lane_job(generation, user_id)
    assert await claim(generation, models=("no-such-model", "nor-this-one")) is None
    assert (await _get(generation, job.job_id)).status == gpb.JOB_STATUS_QUEUED
    claimed = await claim(generation, models=("no-such-model", job.params.model))
    assert claimed is not None and claimed.job_id == job.job_id


async def _user_on_plan(token: TokenStub, admin: asyncpg.Connection, plan: str, balance: int = 100) -> str:
    user_id = await support.user_with_balance(token, balance)
    await token.ChangePlan(tpb.ChangePlanRequest(user_id=user_id, plan=plan))
    return user_id


async def _plan_with_cap(admin: asyncpg.Connection, code: str, max_running_jobs: int) -> None:
    """A plan (no allowance, no grant) whose users run at most max_running_jobs jobs at once."""
    await admin.execute(
        "INSERT INTO token.plan (code, name, monthly_allowance, signup_grant) VALUES ($1, $1, 0, 0)"
        " ON CONFLICT DO NOTHING",
        code,
    )
    await admin.execute(
        "INSERT INTO generation.plan_limit VALUES ($1, 0, $2) ON CONFLICT DO NOTHING", code, max_running_jobs
    )


async def test_a_user_at_the_plan_cap_is_skipped(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    await _plan_with_cap(admin, "solo", 1)
    capped = await _user_on_plan(token, admin, "solo")
    other = await support.user_with_balance(token, 100)
    first, second = _lane_requests(capped, 2)
    model = first.params.model
    [third] = _lane_requests(other, 1, model)
    for request in (first, second, third):
        await generation.CreateGenerationJob(request)
    got = await claim(generation, models=(model,))
    assert got is not None and got.job_id == first.job_id
    # The capped user's next job waits; the other user's, younger, goes ahead.
    got_other = await claim(generation, models=(model,))
    assert got_other is not None and got_other.job_id == third.job_id
    assert await claim(generation, models=(model,)) is None
    await finish(generation, got, gpb.JOB_STATUS_SUCCEEDED)
    after = await claim(generation, models=(model,))
    assert after is not None and after.job_id == second.job_id
    running = await admin.fetchval("SELECT running FROM generation.job_owner WHERE user_id = $1", uuid.UUID(capped))
    assert running == 1


async def test_racing_claims_never_pass_the_cap(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    await _plan_with_cap(admin, "duo", 2)
    user_id = await _user_on_plan(token, admin, "duo")
    requests = _lane_requests(user_id, 10)
    for request in requests:
        await generation.CreateGenerationJob(request)
    got = await asyncio.gather(*(claim(generation, f"w{n}", (requests[0].params.model,)) for n in range(10)))
    assert len([j for j in got if j is not None]) == 2


async def test_higher_priority_first_and_a_starving_job_is_served_after_the_aging_time(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    free = await support.user_with_balance(token, 100)
    pro = await _user_on_plan(token, admin, "pro")
    [old_free] = _lane_requests(free, 1)
    model = old_free.params.model
    (young_free,) = _lane_requests(free, 1, model)
    await generation.CreateGenerationJob(old_free)
    await generation.CreateGenerationJob(young_free)
    pro_jobs = _lane_requests(pro, 2, model)
    for request in pro_jobs:
        created = (await generation.CreateGenerationJob(request)).job
        assert created.priority == 1
    assert (await _get(generation, old_free.job_id)).priority == 0
    # Pro first though younger.
    got = await claim(generation, models=(model,))
    assert got is not None and got.job_id == pro_jobs[0].job_id
    # The oldest free job has waited past the aging time (300 s): it is served as a pro job,
    # and before the younger pro job, being older.
    await admin.execute(
        "UPDATE generation.generation_job SET created_at = now() - interval '301 seconds' WHERE id = $1",
        uuid.UUID(old_free.job_id),
    )
    order = [await claim(generation, models=(model,)) for _ in range(3)]
    assert [j.job_id if j else None for j in order] == [old_free.job_id, pro_jobs[1].job_id, young_free.job_id]


async def test_the_claim_is_one_index_scan_at_any_queue_length(admin: asyncpg.Connection) -> None:
    await admin.execute(
        """
        INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest,
                                               priority, created_at)
        SELECT gen_random_uuid(), gen_random_uuid(), 'bulk', '{"model": "bulk"}'::jsonb, 1, 'QUEUED',
               '\\x00'::bytea, n % 2, now() - make_interval(secs => n)
        FROM generate_series(1, 20000) AS n
        """
    )
    await admin.execute(
        "INSERT INTO generation.job_owner (user_id) SELECT user_id FROM generation.generation_job"
        " ON CONFLICT DO NOTHING"
    )
    await admin.execute("ANALYZE generation.generation_job")
    query = Q["claim_next"]
    args = query.args((), {"worker_id": "explain", "lease_seconds": 60.0, "models": [], "aging_seconds": 300.0})
    claiming = admin.transaction()
    await claiming.start()
    try:
        await admin.execute("SET LOCAL search_path = generation")
        rows = await admin.fetch("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + query.sql, *args)
    finally:
        await claiming.rollback()  # the claim EXPLAIN ANALYZE made
    plan = "\n".join(r[0] for r in rows)
    # The queue is read by the index, in its order: each claim-order segment a range of it,
    # scanned once and stopped at its first row (only the few segments are sorted).
    assert "Seq Scan on generation_job" not in plan, plan
    scan = plan.index("Index Scan using idx_generation_job_queued on generation_job q")
    assert "(actual rows=1 loops=1)" in plan[scan:].splitlines()[0], plan
    condition = plan[scan:].splitlines()[1]
    assert "Index Cond: ((priority = " in condition and "created_at >=" in condition, plan
    assert "Sort Key: ((levels" in plan and plan.count("Sort Key") == 1, plan
    assert "Update on generation_job j (actual rows=1 loops=1)" in plan, "a job was claimed"


# Prices.


async def test_the_service_prices_each_job(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 100)
    sdxl = gpb.GenerationParams(width=1024, height=1024, steps=30, model="sdxl")
    quote = await generation.QuoteGenerationJob(gpb.QuoteGenerationJobRequest(params=sdxl))
    # 3 + ceil(1.048576 megapixels x 30 steps x 0.22)
    assert quote.tokens_cost == 10
    unnamed = gpb.GenerationParams(width=1024, height=1024, steps=30)
    assert (await generation.QuoteGenerationJob(gpb.QuoteGenerationJobRequest(params=unnamed))).tokens_cost == 10
    # No price given: the current one is charged; the empty model is the default model.
    request = gpb.CreateGenerationJobRequest(user_id=user_id, job_id=str(uuid.uuid4()), prompt="p", params=unnamed)
    job = (await generation.CreateGenerationJob(request)).job
    assert (job.tokens_cost, job.params.model) == (10, "sdxl")
    assert await balance(token, user_id) == 90
    # A price that is not the current one: refused, nothing charged or written.
    stale = gpb.CreateGenerationJobRequest(
        user_id=user_id, job_id=str(uuid.uuid4()), prompt="p", params=sdxl, tokens_cost=9
    )
    error = await support.expect_error(
        generation.CreateGenerationJob(stale), grpc.StatusCode.FAILED_PRECONDITION, "PRICE_CHANGED"
    )
    assert support.error_info(error).metadata["price"] == "10"
    assert await balance(token, user_id) == 90
    assert (
        await admin.fetchval("SELECT count(*) FROM generation.generation_job WHERE id = $1", uuid.UUID(stale.job_id))
        == 0
    )
    # A price list edited by SQL is the price from then on; a retry of a job made before is that job.
    await admin.execute("UPDATE generation.model_price SET base_tokens = 5 WHERE model = 'sdxl'")
    try:
        assert (await generation.QuoteGenerationJob(gpb.QuoteGenerationJobRequest(params=sdxl))).tokens_cost == 12
        assert (await generation.CreateGenerationJob(request)).job == job
    finally:
        await admin.execute("UPDATE generation.model_price SET base_tokens = 3 WHERE model = 'sdxl'")
    await support.expect_error(
        generation.QuoteGenerationJob(
            gpb.QuoteGenerationJobRequest(params=gpb.GenerationParams(width=64, height=64, steps=1, model="nope"))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await ledger_matches_jobs(admin, token, [user_id])


async def test_a_retry_of_a_job_being_charged_when_the_price_changes_is_charged_its_price_once(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection, generation_parts: GenerationParts
) -> None:
    """A create whose debit got no answer left its job CHARGING; the price changes; the client
    retries the same request (several times at once): no PRICE_CHANGED, the job is charged the
    price it was made at, once."""
    user_id = await support.user_with_balance(token, 100)
    sdxl = gpb.GenerationParams(width=1024, height=1024, steps=30, model="sdxl")
    request = gpb.CreateGenerationJobRequest(
        user_id=user_id, job_id=str(uuid.uuid4()), prompt="p", params=sdxl, tokens_cost=10
    )
    # The intent exactly as the create recorded it before its debit, still claimed by that call.
    params = check_params(Checker(), request.params)
    intent = NewJob(
        id=uuid.UUID(request.job_id),
        user_id=uuid.UUID(user_id),
        prompt="p",
        params={**params, "model": "sdxl"},
        tokens_cost=10,
        request_digest=request_digest(uuid.UUID(user_id), "p", params, 10),
    )
    assert await generation_parts.store.insert_intent(intent, plan=None) is not None
    await admin.execute("UPDATE generation.model_price SET base_tokens = 5 WHERE model = 'sdxl'")
    try:
        assert (await generation.QuoteGenerationJob(gpb.QuoteGenerationJobRequest(params=sdxl))).tokens_cost == 12
        retries = [generation.CreateGenerationJob(request, timeout=30) for _ in range(5)]
        jobs = {(await r).job.SerializeToString(deterministic=True) for r in asyncio.as_completed(retries)}
    finally:
        await admin.execute("UPDATE generation.model_price SET base_tokens = 3 WHERE model = 'sdxl'")
    assert len(jobs) == 1, "every retry answers the same job"
    job = gpb.Job.FromString(jobs.pop())
    assert (job.status, job.tokens_cost) == (gpb.JOB_STATUS_QUEUED, 10)
    assert await references(admin, user_id) == {request.job_id: 1}
    assert await balance(token, user_id) == 90
    await ledger_matches_jobs(admin, token, [user_id])


@pytest.mark.parametrize("status", ["CANCELLED", "FAILED"])
async def test_the_ledger_check_counts_refunds_of_failed_and_cancelled_jobs_only(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection, status: str
) -> None:
    """ledger_matches_jobs itself: a refund of a job that was neither failed nor cancelled is caught."""
    user_id = await support.user_with_balance(token, 20)
    job = await lane_job(generation, user_id, cost=2)
    await _cancel(generation, job) if status == "CANCELLED" else await generation.UpdateGenerationJobStatus(
        gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=gpb.JOB_STATUS_FAILED)
    )
    await ledger_matches_jobs(admin, token, [user_id])
    await admin.execute(
        "UPDATE generation.generation_job SET status = 'SUCCEEDED' WHERE id = $1", uuid.UUID(job.job_id)
    )
    with pytest.raises(AssertionError):
        await ledger_matches_jobs(admin, token, [user_id])


def test_the_aging_time_is_a_setting() -> None:
    env = {"BLUMPO_ENV": "development", "DATABASE_URL": "postgresql://postgres@localhost/blumpo"}
    assert generation_config.load(env).aging_seconds == 300
    assert generation_config.load({**env, "PRIORITY_AGING_SECONDS": "60"}).aging_seconds == 60
    for bad in ("0", "soon"):
        with pytest.raises(ConfigError, match="PRIORITY_AGING_SECONDS"):
            generation_config.load({**env, "PRIORITY_AGING_SECONDS": bad})


async def test_racing_sweeps_of_many_lost_leases_requeue_each_job_once(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    """Workers of many users die at once; many claims sweep side by side, none fails, and the
    running counts come back to what is RUNNING."""
    users = [await support.user_with_balance(token, 100) for _ in range(4)]
    jobs = [await running_job(generation, user, lease_seconds=SHORT_LEASE) for _ in range(10) for user in users]
    await asyncio.sleep(RAN_OUT_SECONDS)
    await asyncio.gather(*(claim(generation, f"w{n}", ("no-such-model",)) for n in range(16)))
    finals = [await _get(generation, job.job_id) for job in jobs]
    assert {(f.status, f.lease_id) for f in finals} == {(gpb.JOB_STATUS_QUEUED, "")}
    counts = await admin.fetch(
        "SELECT o.running, (SELECT count(*) FROM generation.generation_job j"
        "  WHERE j.user_id = o.user_id AND j.status = 'RUNNING') AS actual"
        " FROM generation.job_owner o WHERE o.user_id = ANY($1::uuid[])",
        [uuid.UUID(u) for u in users],
    )
    assert [(r["running"], r["actual"]) for r in counts] == [(0, 0)] * len(users)
    await ledger_matches_jobs(admin, token, users)


def test_the_plan_cache_and_sweep_interval_are_settings() -> None:
    env = {"BLUMPO_ENV": "development", "DATABASE_URL": "postgresql://postgres@localhost/blumpo"}
    default = generation_config.load(env)
    assert (default.plan_cache_seconds, default.sweep_interval_seconds) == (60, 1.0)
    chosen = generation_config.load({**env, "PLAN_CACHE_SECONDS": "0", "LEASE_SWEEP_INTERVAL_MS": "250"})
    assert (chosen.plan_cache_seconds, chosen.sweep_interval_seconds) == (0, 0.25)
    for name, bad in (("PLAN_CACHE_SECONDS", "-1"), ("LEASE_SWEEP_INTERVAL_MS", "60001")):
        with pytest.raises(ConfigError, match=name):
            generation_config.load({**env, name: bad})
