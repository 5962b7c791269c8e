"""`python -m token_service` as a process: configuration errors, health, graceful shutdown."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common.errors import detail_of
from harness import ROOT
from harness.processes import PROMPT_RECONNECT, ServiceProcess, free_port
from tests import support
from tests.mixed_load import acknowledged_entries_kept


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
        ({"MAX_CONCURRENT_CALLS": "0"}, "MAX_CONCURRENT_CALLS must be between 1 and"),
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
        created = 'grpc_code="OK",grpc_method="CreateUser",grpc_service="blumpo.token.v1.TokenService"'
        created += ',grpc_type="unary"'
        assert f"grpc_server_handled_total{{{created}}} 1.0" in metrics_text
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


HELD_CALLS = 5
LOAD_CLIENTS = 16


@dataclass
class _Appends:
    # Entries a client was told were written, by reference.
    acknowledged: dict[str, int] = field(default_factory=dict)
    # Answers by code name, and SHUTTING_DOWN for the refusals of a draining server.
    codes: Counter[str] = field(default_factory=Counter)
    broken: list[str] = field(default_factory=list)


async def _append_until(stub: token_pb2_grpc.TokenServiceAsyncStub, users: list[str], stop: asyncio.Event) -> _Appends:
    """Clients appending credits until stop. Each answer is OK or UNAVAILABLE: SHUTTING_DOWN with
    RetryInfo while the server drains, without details once it no longer listens. A call that
    reaches the server in the instant it stops listening is cancelled by gRPC before the service
    sees it (CANCELLED without details): at most one per client."""
    seen = _Appends()

    async def client(n: int) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            reference = f"load-{n}-{i}"
            request = tpb.AppendLedgerEntryRequest(
                user_id=users[n % len(users)], delta=1, reason=tpb.LEDGER_REASON_ADJUSTMENT, reference_id=reference
            )
            try:
                await stub.AppendLedgerEntry(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                info = detail_of(exc, error_details_pb2.ErrorInfo)
                seen.codes[info.reason if info else exc.code().name] += 1
                if info is None:
                    expected = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                else:
                    expected = exc.code() == grpc.StatusCode.UNAVAILABLE and info.reason == "SHUTTING_DOWN"
                    expected &= detail_of(exc, error_details_pb2.RetryInfo) is not None
                if not expected:
                    seen.broken.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.05)
            else:
                seen.codes["OK"] += 1
                seen.acknowledged[reference] = 1

    await asyncio.gather(*(client(n) for n in range(LOAD_CLIENTS)))
    return seen


async def _health_seen(address: str, stop: asyncio.Event) -> list[int | None]:
    """Health/Check answers every 20 ms until stop; None when it did not answer."""
    seen: list[int | None] = []
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                seen.append((await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status)
            except grpc.aio.AioRpcError:
                seen.append(None)
            await asyncio.sleep(0.02)
    return seen


@pytest.mark.slow
async def test_sigterm_under_load_drains_and_loses_nothing_acknowledged(
    database_url: str, tmp_path: Path, admin: asyncpg.Connection, token: token_pb2_grpc.TokenServiceAsyncStub
) -> None:
    """SIGTERM while 16 clients append: health says NOT_SERVING and never SERVING again, new calls
    are refused with UNAVAILABLE (SHUTTING_DOWN, RetryInfo), the calls in flight finish, the process
    exits 0 within the grace period, and every entry a client was told of is in the ledger."""
    service, _ = token_process(tmp_path, database_url)
    service.env |= {"SHUTDOWN_GRACE_SECONDS": "10", "LOG_LEVEL": "WARNING"}
    await service.start()
    assert service.process is not None
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = token_pb2_grpc.TokenServiceStub(channel)
            users = [await support.user_with_balance(stub, 1_000_000) for _ in range(4)]
            # Debits of a locked account: in flight, waiting, when SIGTERM arrives.
            blocker = await asyncpg.connect(database_url)
            locked = blocker.transaction()
            await locked.start()
            await blocker.execute(
                "SELECT 1 FROM token.token_account WHERE user_id = $1 FOR UPDATE", uuid.UUID(users[0])
            )
            held = [
                asyncio.ensure_future(
                    stub.AppendLedgerEntry(
                        tpb.AppendLedgerEntryRequest(
                            user_id=users[0], delta=-1, reason=tpb.LEDGER_REASON_GENERATION, reference_id=f"held-{n}"
                        ),
                        timeout=20,
                    )
                )
                for n in range(HELD_CALLS)
            ]
            stop = asyncio.Event()
            health = asyncio.create_task(_health_seen(service.address, stop))
            appending = asyncio.create_task(_append_until(stub, users[1:], stop))
            await asyncio.sleep(1)
            signalled = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1)
            refused = await support.expect_error(
                stub.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=users[1]), timeout=5),
                grpc.StatusCode.UNAVAILABLE,
                "SHUTTING_DOWN",
            )
            assert support.retry_delay_seconds(refused) >= 0
            assert not any(call.done() for call in held)
            await locked.rollback()
            await blocker.close()
            held_entries = [(await call).entry for call in held]
            code = await asyncio.to_thread(service.process.wait, 20)
            drained_in = time.monotonic() - signalled
            stop.set()
            seen = await health
            load = await appending
        assert code == 0 and drained_in < 10, (code, drained_in, service.logs())
        service.process = None
    finally:
        service.stop()
    assert [e.delta for e in held_entries] == [-1] * HELD_CALLS
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen
    after = seen[seen.index(health_pb2.HealthCheckResponse.NOT_SERVING) :]
    assert health_pb2.HealthCheckResponse.SERVING not in after, seen
    assert load.broken == [], load.broken[:10]
    assert load.codes["OK"] > 0 and load.codes["SHUTTING_DOWN"] > 0, load.codes
    assert load.codes["CANCELLED"] <= LOAD_CLIENTS, load.codes
    await acknowledged_entries_kept(admin, load.acknowledged | {f"held-{n}": -1 for n in range(HELD_CALLS)})
    for user_id in users:
        assert list((await token.CheckBalances(tpb.CheckBalancesRequest(user_id=user_id))).mismatches) == []
