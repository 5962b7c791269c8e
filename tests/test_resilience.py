"""Edge cases across both services: a reconciler no row can starve, settings that cannot be
used, shutdown with a silent database, health before the database answered, undecodable
requests, forged page tokens, refills before an account opened, pages under the message limit."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from harness import ROOT
from harness.processes import ServiceProcess, free_port
from harness.tcp_proxy import TcpProxy
from tests import support
from tests.generation_support import GenerationStub, TokenStub, create_job, job_request, running_job

REFUSED = 50


async def _move(generation: GenerationStub, job: gpb.Job, status: int) -> gpb.Job:
    request = gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=status, lease_id=job.lease_id)  # type: ignore[arg-type]
    return (await generation.UpdateGenerationJobStatus(request)).job


def _gen_env(database_url: str, token_target: str, port: int, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "WARNING",
        "GENERATION_LISTEN_ADDR": f"127.0.0.1:{port}",
        "GENERATION_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "TOKEN_SERVICE_TARGET": token_target,
        **extra,
    }


async def test_refused_refunds_do_not_starve_other_owed_refunds(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    """A refund the token service refuses is deferred to the back of the line: a full batch of
    them does not keep other owed refunds from being paid."""
    user_id = await support.user_with_balance(token, 1000)
    stuck: list[uuid.UUID] = []
    try:
        await _starve(generation, token, admin, user_id, stuck)
    finally:  # leave the reconciler no stuck refund to retry through the module's later tests
        await admin.execute(
            "UPDATE generation.generation_job SET refund_state = 'DONE' WHERE id = ANY($1::uuid[])", stuck
        )


async def _starve(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection, user_id: str, stuck: list[uuid.UUID]
) -> None:
    for _ in range(REFUSED):
        job = await running_job(generation, user_id)
        stuck.append(uuid.UUID(job.job_id))
        # Another client already used the refund's reference (with another delta): refused for good.
        await token.AppendLedgerEntry(
            tpb.AppendLedgerEntryRequest(
                user_id=user_id, delta=5, reason=tpb.LEDGER_REASON_ADJUSTMENT, reference_id=f"{job.job_id}:refund"
            )
        )
        await _move(generation, job, gpb.JOB_STATUS_FAILED)
    victim = await support.user_with_balance(token, 10)
    owed = await running_job(generation, victim, cost=4)
    # A crash right after FAILED was committed, before the refund call: the reconciler owes it.
    await admin.execute(
        "UPDATE generation.generation_job SET status = 'FAILED', completed_at = now(), refund_state = 'PENDING',"
        " updated_at = now() WHERE id = $1",
        uuid.UUID(owed.job_id),
    )
    deadline = time.monotonic() + 8  # grace 1 s, interval 0.2 s in the test reconciler
    state = None
    while time.monotonic() < deadline:
        state = await admin.fetchval(
            "SELECT refund_state FROM generation.generation_job WHERE id = $1", uuid.UUID(owed.job_id)
        )
        if state == "DONE":
            break
        await asyncio.sleep(0.2)
    assert state == "DONE", "the owed refund was never paid: 50 refused refunds fill every batch"
    assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=victim))).balance == 10


def _run_generation(env: dict[str, str]) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    full = {**os.environ, "BLUMPO_ENV": "development", **env}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "generation_service"],
            cwd=ROOT,
            env=full,
            capture_output=True,
            text=True,
            timeout=8,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return -1, err
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "setting",
    [
        {"DATABASE_URL": "postgresql://postgres@127.0.0.1:notaport/blumpo"},
        {"GENERATION_LISTEN_ADDR": "999.1.1.1:50952"},
        {"GENERATION_METRICS_ADDR": "nosuch.invalid:9952"},
    ],
    ids=["database-url-port", "listen-addr", "metrics-addr"],
)
async def test_malformed_setting_is_one_line_exit_2(database_url: str, setting: dict[str, str]) -> None:
    env = {
        "DATABASE_URL": database_url,
        "GENERATION_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "GENERATION_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "LOG_LEVEL": "ERROR",
        **setting,
    }
    code, stderr = await asyncio.get_running_loop().run_in_executor(None, _run_generation, env)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr:\n{stderr[-1500:]}"
    assert len(lines) == 1, stderr[-1500:]


async def _health(address: str) -> int | None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return None
        return int(answer.status)


async def test_sigterm_while_database_silent_exits_within_grace(
    database_url: str, token_address: str, token: TokenStub, tmp_path: Path
) -> None:
    proxy = TcpProxy(free_port(), database_url)
    await proxy.start()
    port = free_port()
    env = _gen_env(proxy.url, token_address, port, SHUTDOWN_GRACE_SECONDS="1", LOG_LEVEL="INFO")
    process = ServiceProcess("generation_service", env, port, tmp_path / "g.log")
    await process.start()
    loop = asyncio.get_running_loop()
    try:
        user_id = await support.user_with_balance(token, 10)
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub: GenerationStub = generation_pb2_grpc.GenerationServiceStub(channel)
            await create_job(stub, user_id)  # the pool now holds connections
        proxy.frozen = True
        await asyncio.sleep(0.5)
        assert process.process is not None
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        try:
            code = await loop.run_in_executor(None, process.process.wait, 20)
        except Exception:  # subprocess.TimeoutExpired
            code = None
        elapsed = time.monotonic() - started
        assert code == 0 and elapsed < 1 + 3.0, f"exit {code} after {elapsed:.1f}s\n{process.logs()[-1500:]}"
        process.process = None
    finally:
        if process.process is not None:
            process.process.kill()
            await loop.run_in_executor(None, process.process.wait, 10)
            process.process = None
        await proxy.stop()


async def test_undecodable_request_is_not_unknown(generation_address: str) -> None:
    """A request the server cannot decode (here params.extra nested 33 deep, past protobuf's
    depth limit; any client not written in Python can send it) is INVALID_ARGUMENT, not UNKNOWN."""
    request = job_request(str(uuid.uuid4()))
    nested: Any = {"leaf": 1}
    for _ in range(33):
        nested = {"k": nested}
    request.params.extra.update(nested)
    payload = request.SerializeToString()
    async with grpc.aio.insecure_channel(generation_address) as channel:
        call = channel.unary_unary(
            "/blumpo.generation.v1.GenerationService/CreateGenerationJob",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        await support.expect_error(call(payload, timeout=5), grpc.StatusCode.INVALID_ARGUMENT)


async def test_health_is_not_serving_before_the_database_answered(
    database_url: str, token_address: str, tmp_path: Path
) -> None:
    """With the database host silent from the start, Health/Check never says SERVING (gRPC's
    HealthServicer would start with "" = SERVING)."""
    from grpc_health.v1 import health_pb2

    proxy = TcpProxy(free_port(), database_url)
    proxy.frozen = True
    await proxy.start()
    port = free_port()
    process = ServiceProcess("generation_service", _gen_env(proxy.url, token_address, port), port, tmp_path / "g.log")
    process.spawn()
    loop = asyncio.get_running_loop()
    seen: list[int | None] = []
    try:
        deadline = time.monotonic() + 13
        while time.monotonic() < deadline:
            seen.append(await _health(process.address))
            await asyncio.sleep(0.05)
    finally:
        assert process.process is not None
        process.process.kill()
        await loop.run_in_executor(None, process.process.wait, 10)
        process.process = None
        await proxy.stop()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen
    assert health_pb2.HealthCheckResponse.SERVING not in seen, "SERVING reported while the database never answered"


async def test_well_signed_page_token_with_out_of_range_key_is_invalid_argument(token: TokenStub) -> None:
    """Should the page-token secret leak, a caller could sign any key; one no query can take
    (a sequence number past int64) is INVALID_ARGUMENT, not INTERNAL."""
    from datetime import UTC, datetime

    from tests.conftest import TEST_PAGE_TOKENS

    user_id = await support.user_with_balance(token, 5)
    forged = TEST_PAGE_TOKENS.encode(f"ledger:{user_id}", datetime.now(UTC), 2**70)
    await support.expect_error(
        token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user_id, page_token=forged)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_refill_of_a_month_before_the_account_existed_credits_nothing(token: TokenStub) -> None:
    """Periods back to 2000-01 are accepted, but an account opened today is credited for none of
    them: a month before an account existed is not owed to it."""
    user_id = await support.user_with_balance(token, 0)
    await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2001-01"))
    balance = (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance
    assert balance == 0, f"an account opened today was credited {balance} tokens for 2001-01"


async def test_a_full_page_of_large_jobs_fits_a_default_client(generation: GenerationStub, token: TokenStub) -> None:
    """Jobs at their documented maxima (prompt 4000 characters, extra 16 KiB of JSON) with a
    page_size the contract allows would exceed gRPC's default 4 MiB receive limit: a page stops
    short of it and the next page token carries on, so every job is listed once."""
    user_id = await support.user_with_balance(token, 1000)
    sem = asyncio.Semaphore(16)
    created: set[str] = set()

    async def one() -> None:
        request = job_request(user_id, prompt="🦄" * 4000)
        request.params.extra.update({"notes": "x" * 16000})
        async with sem:
            created.add((await generation.CreateGenerationJob(request, timeout=30)).job.job_id)

    await asyncio.gather(*(one() for _ in range(150)))
    listed: list[str] = []
    page_token = ""
    pages = 0
    while True:
        try:
            page = await generation.ListGenerationJobs(
                gpb.ListGenerationJobsRequest(user_id=user_id, page_size=500, page_token=page_token), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            pytest.fail(f"{exc.code().name}: {exc.details()}")
        assert page.ByteSize() < 4 * 1024 * 1024
        listed += [job.job_id for job in page.jobs]
        pages += 1
        page_token = page.next_page_token
        if not page_token:
            break
    assert pages >= 2
    assert sorted(listed) == sorted(created)
