"""Failures of whole processes: the token service down, the generation service killed.

These run the services as real processes and stop, kill and restart them; the
invariants are checked in the ledger itself.
"""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo_common import retry, server
from blumpo_common.db import create_pool
from generation_service.charging import ReconcilerSettings
from generation_service.server import parts, service
from harness.processes import ServiceProcess, free_port
from tests import support
from tests.conftest import database_config
from tests.generation_support import (
    GenerationStub,
    TokenStub,
    balance,
    job_request,
    ledger_matches_jobs,
    no_mismatches,
    references,
    running_job,
)

pytestmark = pytest.mark.slow
WAIT_SECONDS = 20.0


async def eventually(check: object, what: str, seconds: float = WAIT_SECONDS) -> None:
    """Polls an async predicate until it holds, failing after a bound."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true after {seconds}s: {what}")
        await asyncio.sleep(0.1)


def process_env(database_url: str, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", "SHUTDOWN_GRACE_SECONDS": "1", **extra}


@pytest.fixture
async def token_process(database_url: str, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    port = free_port()
    env = process_env(
        database_url, TOKEN_LISTEN_ADDR=f"127.0.0.1:{port}", TOKEN_METRICS_ADDR=f"127.0.0.1:{free_port()}"
    )
    process = ServiceProcess("token_service", env, port, tmp_path / "token.log")
    await process.start()
    yield process
    process.stop()


async def _status(admin: asyncpg.Connection, job_id: str) -> str | None:
    status: str | None = await admin.fetchval(
        "SELECT status FROM generation.generation_job WHERE id = $1", uuid.UUID(job_id)
    )
    return status


async def test_token_service_down_then_back(
    database_url: str, token_process: ServiceProcess, token: TokenStub, admin: asyncpg.Connection
) -> None:
    config = database_config(database_url, "generation_service")
    pool = await create_pool(config)
    policy = retry.RetryPolicy(attempt_timeout_seconds=0.5, max_attempts=3, total_timeout_seconds=1.5)
    settings = ReconcilerSettings(claim_seconds=3.0, interval_seconds=0.2)
    async with grpc.aio.insecure_channel(token_process.address, options=retry.CHANNEL_OPTIONS) as channel:
        wired = parts(pool, config, channel, policy, settings)
        running = await server.start(service(wired), pool, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as gen_channel:
                generation: GenerationStub = generation_pb2_grpc.GenerationServiceStub(gen_channel)
                await _token_down_then_back(generation, token, token_process, admin)
        finally:
            await running.stop(1)
            await pool.close()


async def _token_down_then_back(
    generation: GenerationStub, token: TokenStub, token_process: ServiceProcess, admin: asyncpg.Connection
) -> None:
    user_id = await support.user_with_balance(token, 20)
    failing = await running_job(generation, user_id, cost=2)
    assert await balance(token, user_id) == 18

    token_process.kill(signal.SIGKILL)
    retried = job_request(user_id, cost=3)
    abandoned = job_request(user_id, cost=4)
    unaffordable = job_request(user_id, cost=1000)
    for request in (retried, abandoned, unaffordable):
        await support.expect_error(
            generation.CreateGenerationJob(request), grpc.StatusCode.UNAVAILABLE, "TOKEN_SERVICE_UNAVAILABLE"
        )
        await support.expect_error(
            generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=request.job_id)), grpc.StatusCode.NOT_FOUND
        )
        assert await _status(admin, request.job_id) == "CHARGING"
    # Failing a job while the token service is down succeeds; the refund is owed.
    failed = await generation.UpdateGenerationJobStatus(
        gpb.UpdateGenerationJobStatusRequest(
            job_id=failing.job_id, status=gpb.JOB_STATUS_FAILED, error_message="gpu", lease_id=failing.lease_id
        )
    )
    assert failed.job.status == gpb.JOB_STATUS_FAILED
    owed = await admin.fetchval(
        "SELECT refund_state FROM generation.generation_job WHERE id = $1", uuid.UUID(failing.job_id)
    )
    assert owed == "PENDING"
    listed = await generation.ListGenerationJobs(gpb.ListGenerationJobsRequest(user_id=user_id))
    assert [j.job_id for j in listed.jobs] == [failing.job_id]
    assert await references(admin, user_id) == {failing.job_id: 1}

    await token_process.start()
    job: gpb.Job | None = None
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while job is None:
        try:
            job = (await generation.CreateGenerationJob(retried)).job
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert asyncio.get_running_loop().time() < deadline, "the retry never succeeded"
            await asyncio.sleep(0.2)
    assert job.status == gpb.JOB_STATUS_QUEUED

    async def settled() -> bool:
        states = {await _status(admin, r.job_id) for r in (abandoned, unaffordable)}
        refund = await admin.fetchval(
            "SELECT refund_state FROM generation.generation_job WHERE id = $1", uuid.UUID(failing.job_id)
        )
        return "CHARGING" not in states and refund == "DONE"

    await eventually(settled, "the reconciler finished the intents and the refund")
    assert await _status(admin, abandoned.job_id) == "QUEUED"
    assert await _status(admin, unaffordable.job_id) == "REJECTED"
    assert await references(admin, user_id) == {
        failing.job_id: 1,
        f"{failing.job_id}:refund": 1,
        retried.job_id: 1,
        abandoned.job_id: 1,
    }
    assert await balance(token, user_id) == 20 - 3 - 4
    await no_mismatches(token, user_id)


async def test_generation_service_killed_mid_burst(
    database_url: str, token_address: str, token: TokenStub, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    port = free_port()
    env = process_env(
        database_url,
        GENERATION_LISTEN_ADDR=f"127.0.0.1:{port}",
        GENERATION_METRICS_ADDR=f"127.0.0.1:{free_port()}",
        TOKEN_SERVICE_TARGET=token_address,
        CHARGE_CLAIM_MS="3000",
        TOKEN_CALL_BUDGET_MS="900",
        RECONCILE_INTERVAL_MS="200",
        DB_POOL_SIZE="10",
    )
    process = ServiceProcess("generation_service", env, port, tmp_path / "generation.log")
    await process.start()
    users = [await support.user_with_balance(token, 100_000) for _ in range(4)]
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            generation: GenerationStub = generation_pb2_grpc.GenerationServiceStub(channel)
            outcomes = await _burst_then_kill(generation, users, process)
            outcomes.update(await _unfinished(admin, users))
            await process.start()

            async def settled() -> bool:
                left = await admin.fetchval(
                    "SELECT count(*) FROM generation.generation_job WHERE user_id = ANY($1::uuid[])"
                    " AND (status = 'CHARGING' OR refund_state = 'PENDING')",
                    [uuid.UUID(u) for u in users],
                )
                return bool(left == 0)

            await eventually(settled, "no intent or owed refund left after the restart")
            # The restarted service serves as before, and SIGTERM stops it cleanly. (The channel may
            # still be waiting to dial again after the kill: the call waits for it, not fails fast.)
            request = job_request(users[0])
            job = (await generation.CreateGenerationJob(request, wait_for_ready=True, timeout=WAIT_SECONDS)).job
            assert job.status == gpb.JOB_STATUS_QUEUED
        assert process.stop() == 0, process.logs()
    finally:
        process.stop()
    assert outcomes["ok"] > 0 and outcomes["failed"] > 0, outcomes
    await ledger_matches_jobs(admin, token, users)


async def _unfinished(admin: asyncpg.Connection, users: list[str]) -> dict[str, int]:
    """What the kill left half done: intents and owed refunds."""
    row = await admin.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'CHARGING') AS intents,"
        " count(*) FILTER (WHERE refund_state = 'PENDING') AS refunds"
        " FROM generation.generation_job WHERE user_id = ANY($1::uuid[])",
        [uuid.UUID(u) for u in users],
    )
    assert row is not None
    return {"intents_left": row["intents"], "refunds_left": row["refunds"]}


async def _burst_then_kill(generation: GenerationStub, users: list[str], process: ServiceProcess) -> dict[str, int]:
    """Creates jobs and fails half of them from many tasks, and SIGKILLs the service midway."""
    outcomes = {"ok": 0, "failed": 0}
    rng = random.Random(7)
    under_way = asyncio.Event()

    async def one(user_id: str) -> None:
        try:
            job = (await generation.CreateGenerationJob(job_request(user_id, cost=rng.randint(1, 9)), timeout=5)).job
            if rng.random() < 0.5:
                await generation.UpdateGenerationJobStatus(
                    gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=gpb.JOB_STATUS_FAILED), timeout=5
                )
            outcomes["ok"] += 1
            if outcomes["ok"] >= 100:
                under_way.set()
        except grpc.aio.AioRpcError:
            outcomes["failed"] += 1

    limit = asyncio.Semaphore(40)

    async def bounded(user_id: str) -> None:
        async with limit:
            await one(user_id)

    tasks = [asyncio.create_task(bounded(users[n % len(users)])) for n in range(600)]
    await asyncio.wait_for(under_way.wait(), WAIT_SECONDS)
    process.kill(signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_SECONDS)
    return outcomes
