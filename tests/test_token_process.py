"""`python -m token_service` as a process: configuration errors, health, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from harness import ROOT
from harness.processes import PROMPT_RECONNECT, ServiceProcess, free_port
from tests import support


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def token_process(tmp_path: Path, database_url: str) -> tuple[ServiceProcess, int]:
    port, metrics = free_port(), free_port()
    env = {
        "DATABASE_URL": database_url,
        "TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_METRICS_ADDR": f"127.0.0.1:{metrics}",
    }
    return ServiceProcess("token_service", env, port, tmp_path / "token.log"), metrics


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"DATABASE_URL": "", "POSTGRES_URL": ""}, "DATABASE_URL (or POSTGRES_URL) is not set"),
        ({"DATABASE_URL": "mysql://localhost/x"}, "DATABASE_URL must look like postgresql://"),
        ({"DB_POOL_SIZE": "many"}, "DB_POOL_SIZE must be a whole number"),
        ({"DB_TIMEOUT": "0"}, "DB_TIMEOUT must be between"),
        ({"TOKEN_LISTEN_ADDR": "nowhere"}, "TOKEN_LISTEN_ADDR must be host:port"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL must be"),
    ],
)
def test_bad_setting_stops_start_up_with_one_clear_line(database_url: str, env: dict[str, str], complaint: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "token_service"],
        cwd=ROOT,
        env=os.environ | {"BLUMPO_ENV": "development", "DATABASE_URL": database_url} | env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert complaint in lines[0]


async def test_serves_then_shuts_down_gracefully_on_sigterm(database_url: str, tmp_path: Path) -> None:
    service, metrics = token_process(tmp_path, database_url)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = token_pb2_grpc.TokenServiceStub(channel)
            user = (await stub.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user
            # Hold the account row so a debit is in flight when SIGTERM arrives.
            blocker = await asyncpg.connect(database_url)
            locked = blocker.transaction()
            await locked.start()
            await blocker.execute(
                "SELECT 1 FROM token.token_account WHERE user_id = $1 FOR UPDATE", uuid.UUID(user.user_id)
            )
            debit = asyncio.ensure_future(
                stub.AppendLedgerEntry(
                    tpb.AppendLedgerEntryRequest(
                        user_id=user.user_id, delta=-5, reason=tpb.LEDGER_REASON_GENERATION, reference_id="in-flight"
                    ),
                    timeout=20,
                )
            )
            await asyncio.sleep(0.5)
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert not debit.done()
            # New calls are refused while the one in flight finishes.
            await support.expect_error(
                stub.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user.user_id), timeout=5),
                grpc.StatusCode.UNAVAILABLE,
            )
            metrics_text = await asyncio.to_thread(read_metrics, metrics)
            await locked.rollback()
            await blocker.close()
            assert (await debit).entry.balance_after == 95
        assert 'grpc_server_handled_total{code="OK",method="/blumpo.token.v1.TokenService/CreateUser"} 1.0' in (
            metrics_text
        )
        assert await asyncio.to_thread(service.process.wait, 30) == 0
        logs = service.logs()
        assert '"message": "stopped"' in logs
        assert '"method": "/blumpo.token.v1.TokenService/AppendLedgerEntry", "code": "OK"' in logs
    finally:
        if service.process is not None and service.process.poll() is None:
            service.kill()


async def test_reports_not_serving_while_the_database_is_unreachable(tmp_path: Path) -> None:
    service, _ = token_process(tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    service.spawn()
    try:
        async with grpc.aio.insecure_channel(service.address, options=PROMPT_RECONNECT) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            for _ in range(100):
                try:
                    status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)).status
                except grpc.aio.AioRpcError:
                    status = None  # not listening yet, or no status set yet
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = token_pb2_grpc.TokenServiceStub(channel)
            await support.expect_error(
                stub.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=str(uuid.uuid4())), timeout=15),
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
    finally:
        service.stop()
