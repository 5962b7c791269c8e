"""The database failing under load (sessions cut with pg_terminate_backend, the server restarted)
or too busy to give a call a connection in time.

Every answer is a success or a retryable code with RetryInfo (never INTERNAL or UNKNOWN), the
services keep running and serve the next call, and no money goes astray: what a client was told
is written is in the ledger once, and every job has exactly the debit and refund its state owes.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import server
from blumpo_common.db import create_pool
from harness import databases
from harness.cluster import PrivateCluster
from harness.processes import ServiceProcess, free_port
from tests import support
from tests.conftest import database_config
from tests.generation_support import GenerationStub, TokenStub, add_test_prices, ledger_matches_jobs
from tests.mixed_load import MixedLoad, acknowledged_entries_kept
from token_service.server import service as token_service
from token_service.store import Store as TokenStore

CLIENTS = 32
USERS = 4
SETTLE_SECONDS = 20.0


async def _cut_sessions(database_url: str, spared: int, stop: asyncio.Event) -> tuple[int, int]:
    """Terminates every session of the database but its own and `spared`, at random intervals,
    until stop; returns (rounds, sessions cut)."""
    conn = await asyncpg.connect(database_url)
    rng = random.Random(11)
    rounds = cut = 0
    try:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            cut += await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND backend_type = 'client backend'"
                " AND pid NOT IN (pg_backend_pid(), $1)",
                spared,
            )
            rounds += 1
    finally:
        await conn.close()
    return rounds, cut


async def _settled(admin: asyncpg.Connection, users: list[str]) -> None:
    """Waits (bounded) until the reconciler has finished every charge intent and owed refund."""
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    while True:
        left = await admin.fetchval(
            "SELECT count(*) FROM generation.generation_job WHERE user_id = ANY($1::uuid[])"
            " AND (status = 'CHARGING' OR refund_state = 'PENDING')",
            [uuid.UUID(u) for u in users],
        )
        if left == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{left} intents or refunds never finished"
        await asyncio.sleep(0.2)


async def _nothing_lost(admin: asyncpg.Connection, token: TokenStub, load: MixedLoad) -> None:
    await _settled(admin, load.users)
    await acknowledged_entries_kept(admin, load.appended)
    statuses = await admin.fetch(
        "SELECT status FROM generation.generation_job WHERE id = ANY($1::uuid[])", [uuid.UUID(j) for j in load.jobs]
    )
    assert len(statuses) == len(load.jobs)
    assert {row["status"] for row in statuses} <= {"QUEUED", "FAILED"}, "an acknowledged job is not listed"
    await ledger_matches_jobs(admin, token, load.users)


async def test_no_free_connection_in_time_is_unavailable_and_the_next_call_works(
    database_url: str, token: TokenStub
) -> None:
    """A call that finds the pool taken waits for a connection no longer than its timeout (here
    DB_TIMEOUT, 0.3 s), and is then UNAVAILABLE with RetryInfo, not left waiting."""
    user_id = await support.user_with_balance(token, 5)
    pool = await create_pool(replace(database_config(database_url, "token_service"), pool_size=1))
    running = await server.start(token_service(TokenStore(pool, 0.3)), pool, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub: TokenStub = token_pb2_grpc.TokenServiceStub(channel)
            request = tpb.GetTokenBalanceRequest(user_id=user_id)
            async with pool.acquire():  # the pool's only connection
                error = await support.expect_error(
                    stub.GetTokenBalance(request, timeout=10), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"
                )
            assert support.retry_delay_seconds(error) >= 1
            assert (await stub.GetTokenBalance(request, timeout=10)).balance == 5
    finally:
        await running.stop(1)
        await pool.close()


@pytest.mark.slow
async def test_sessions_cut_during_calls_answer_retryable_and_lose_nothing(
    database_url: str, token: TokenStub, generation: GenerationStub, admin: asyncpg.Connection
) -> None:
    users = [await support.user_with_balance(token, 1_000_000) for _ in range(USERS)]
    load = MixedLoad(token, generation, users)
    stop = asyncio.Event()
    cutting = asyncio.create_task(_cut_sessions(database_url, admin.get_server_pid(), stop))
    loading = asyncio.create_task(load.run(CLIENTS, stop))
    await asyncio.sleep(6)
    stop.set()
    rounds, cut = await cutting
    await loading

    assert load.broken == [], load.broken[:10]
    # The cuts hit calls in flight, and the load went on between them.
    assert rounds > 10 and cut > 10, (rounds, cut)
    assert load.codes["UNAVAILABLE"] > 0 and load.codes["OK"] > 50, load.codes
    await load.check_every_call_works()
    await _nothing_lost(admin, token, load)


@dataclass
class _Deployment:
    cluster: PrivateCluster
    token: ServiceProcess
    generation: ServiceProcess


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[_Deployment]:
    """Both services as processes on a PostgreSQL server of this test's own."""
    cluster = PrivateCluster()
    try:
        await asyncio.to_thread(cluster.start)
        url = cluster.url("blumpo")
        await asyncio.to_thread(databases.dbmate, url, "up")
        await add_test_prices(url)
        token_port, generation_port = free_port(), free_port()
        common = {"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "SHUTDOWN_GRACE_SECONDS": "1"}
        token = ServiceProcess(
            "token_service",
            {
                **common,
                "TOKEN_LISTEN_ADDR": f"127.0.0.1:{token_port}",
                "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            },
            token_port,
            tmp_path / "token.log",
        )
        generation = ServiceProcess(
            "generation_service",
            {
                **common,
                "GENERATION_LISTEN_ADDR": f"127.0.0.1:{generation_port}",
                "GENERATION_METRICS_ADDR": f"127.0.0.1:{free_port()}",
                "TOKEN_SERVICE_TARGET": token.address,
                "CHARGE_CLAIM_MS": "3000",
                "TOKEN_CALL_BUDGET_MS": "900",
                "RECONCILE_INTERVAL_MS": "200",
            },
            generation_port,
            tmp_path / "generation.log",
        )
        token.spawn()
        generation.spawn()
        try:
            await asyncio.gather(token.wait_ready(), generation.wait_ready())
            yield _Deployment(cluster, token, generation)
        finally:
            token.stop()
            generation.stop()
    finally:
        await asyncio.to_thread(cluster.destroy)


@pytest.mark.slow
async def test_postgres_restarted_under_load_is_survived_without_restarting_the_services(
    deployment: _Deployment,
) -> None:
    async with (
        grpc.aio.insecure_channel(deployment.token.address) as token_channel,
        grpc.aio.insecure_channel(deployment.generation.address) as generation_channel,
    ):
        token: TokenStub = token_pb2_grpc.TokenServiceStub(token_channel)
        generation: GenerationStub = generation_pb2_grpc.GenerationServiceStub(generation_channel)
        users = [await support.user_with_balance(token, 1_000_000) for _ in range(USERS)]
        load = MixedLoad(token, generation, users)
        stop = asyncio.Event()
        loading = asyncio.create_task(load.run(CLIENTS, stop))
        for _ in range(2):
            await asyncio.sleep(1.5)
            await asyncio.to_thread(deployment.cluster.restart)
        await asyncio.sleep(1.5)
        stop.set()
        await loading

        assert load.broken == [], load.broken[:10]
        assert load.codes["UNAVAILABLE"] > 0, load.codes
        for process in (deployment.token, deployment.generation):
            assert process.process is not None and process.process.poll() is None, process.logs()
        await load.check_every_call_works()
        admin = await asyncpg.connect(deployment.cluster.url("blumpo"))
        try:
            await _nothing_lost(admin, token, load)
        finally:
            await admin.close()
    for process in (deployment.token, deployment.generation):
        assert process.stop() == 0, process.logs()
