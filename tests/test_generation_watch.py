"""WatchGenerationJob over a real stream, woken by LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from generation_service.server import Parts
from tests import support
from tests.generation_support import GenerationStub, TokenStub, create_job

STEP_SECONDS = 5.0


async def _move(generation: GenerationStub, job_id: str, status: int) -> None:
    await generation.UpdateGenerationJobStatus(gpb.UpdateGenerationJobStatusRequest(job_id=job_id, status=status))  # type: ignore[arg-type]


async def test_watcher_sees_each_status_in_order_and_the_stream_ends(
    generation: GenerationStub, token: TokenStub, generation_parts: Parts
) -> None:
    await asyncio.wait_for(generation_parts.hub.listening.wait(), STEP_SECONDS)
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    stream = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=30)
    seen = []
    moves = iter([gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED])
    started = asyncio.get_running_loop().time()
    async for response in stream:
        seen.append(response.job.status)
        next_status = next(moves, None)
        if next_status is not None:
            await _move(generation, job.job_id, next_status)
    elapsed = asyncio.get_running_loop().time() - started
    assert seen == [gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED]
    assert await stream.code() == grpc.StatusCode.OK
    # Woken by notifications, not by the fallback poll.
    assert elapsed < 2.0, elapsed
    assert generation_parts.hub.count == 0


async def test_many_watchers_share_one_listener(
    generation: GenerationStub, token: TokenStub, generation_parts: Parts
) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    await _move(generation, job.job_id, gpb.JOB_STATUS_RUNNING)

    async def watch() -> list[int]:
        call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=30)
        return [r.job.status async for r in call]

    watchers = [asyncio.create_task(watch()) for _ in range(25)]
    for _ in range(100):
        if generation_parts.hub.count >= 25:
            break
        await asyncio.sleep(0.02)
    assert generation_parts.hub.count >= 25
    await _move(generation, job.job_id, gpb.JOB_STATUS_FAILED)
    results = await asyncio.wait_for(asyncio.gather(*watchers), STEP_SECONDS)
    assert all(r == [gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_FAILED] for r in results)


async def test_terminal_job_sends_once_and_ends(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    await _move(generation, job.job_id, gpb.JOB_STATUS_FAILED)
    call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=10)
    assert [r.job.status async for r in call] == [gpb.JOB_STATUS_FAILED]


async def test_cancelled_watch_releases_its_subscription(
    generation: GenerationStub, token: TokenStub, generation_parts: Parts
) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    before = generation_parts.hub.count
    call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=30)
    first = await call.read()
    assert isinstance(first, gpb.WatchGenerationJobResponse) and first.job.status == gpb.JOB_STATUS_QUEUED
    assert generation_parts.hub.count == before + 1
    call.cancel()
    for _ in range(100):
        if generation_parts.hub.count == before:
            break
        await asyncio.sleep(0.02)
    assert generation_parts.hub.count == before


@pytest.mark.parametrize(
    ("job_id", "code"),
    [(str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND), ("nope", grpc.StatusCode.INVALID_ARGUMENT)],
    ids=["unknown", "malformed"],
)
async def test_watch_errors(generation: GenerationStub, job_id: str, code: grpc.StatusCode) -> None:
    call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job_id), timeout=10)
    error = await support.expect_error(call.read(), code)
    assert support.error_info(error).domain == "blumpo.generation"
