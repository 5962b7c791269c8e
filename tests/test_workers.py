"""WORKERS: server processes sharing one port, their metrics served together, and none
outliving the process that started them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from harness.processes import ServiceProcess, free_port
from tests.test_token_process import read_metrics

pytestmark = pytest.mark.slow

CONNECTIONS = 8
CALLS = 5
POOL_SIZE = 3


def workers_process(tmp_path: Path, database_url: str) -> tuple[ServiceProcess, int]:
    port, metrics = free_port(), free_port()
    env = {
        "DATABASE_URL": database_url,
        "TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_METRICS_ADDR": f"127.0.0.1:{metrics}",
        "WORKERS": "2",
        "DB_POOL_SIZE": str(POOL_SIZE),
    }
    return ServiceProcess("token_service", env, port, tmp_path / "token.log"), metrics


def workers_of(pid: int) -> list[int]:
    """The worker processes of the service pid (not multiprocessing's resource tracker)."""
    found = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [child for child in found if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


async def ended(pids: list[int], seconds: float = 10.0) -> bool:
    """Whether every one of pids has ended, waiting up to seconds."""
    for _ in range(int(seconds * 10)):
        if not any(alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def port_free(port: int) -> bool:
    """Whether nothing listens on port: a connection is refused (binding is no test, as the
    connections the kill closed may hold the port in TIME_WAIT or FIN_WAIT a while)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_workers_serve_one_port_and_report_their_calls_together(database_url: str, tmp_path: Path) -> None:
    service, metrics = workers_process(tmp_path, database_url)
    await service.start()
    try:
        assert service.process is not None
        assert len(workers_of(service.process.pid)) == 2
        # Connections of their own (not one shared), so the kernel spreads them over the workers.
        channels = [
            grpc.aio.insecure_channel(service.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)
        ]
        try:
            for channel in channels:
                stub = token_pb2_grpc.TokenServiceStub(channel)
                for _ in range(CALLS):
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await stub.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=str(uuid.uuid4())), timeout=10)
                    assert error.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            for channel in channels:
                await channel.close(None)
        # The pool gauges are copied out by each worker every second (metrics.publish_scraped).
        for _ in range(50):
            text = await asyncio.to_thread(read_metrics, metrics)
            scraped = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }
            if scraped.get(("db_pool_connections", ()), 0) >= 2:
                break
            await asyncio.sleep(0.1)
        handled = (
            "grpc_server_handled_total",
            (
                ("grpc_code", "NotFound"),
                ("grpc_method", "GetTokenBalance"),
                ("grpc_service", "blumpo.token.v1.TokenService"),
                ("grpc_type", "unary"),
            ),
        )
        assert scraped.get(handled) == CONNECTIONS * CALLS, text
        # Read in each worker, and summed: both pools' bounds and connections (each has its health probe's).
        assert scraped.get(("db_pool_connections_max", ())) == 2 * POOL_SIZE, text
        assert scraped.get(("db_pool_connections", ()), 0) >= 2, text
        assert service.stop() == 0
    finally:
        if service.process is not None and service.process.poll() is None:
            service.kill()


async def test_a_killed_service_leaves_no_worker_behind(database_url: str, tmp_path: Path) -> None:
    service, _ = workers_process(tmp_path, database_url)
    await service.start()
    assert service.process is not None
    workers = workers_of(service.process.pid)
    assert len(workers) == 2
    service.kill(signal.SIGKILL)
    assert await ended(workers)
    # The kernel finishes closing the dead workers' listeners a moment after they exit.
    for _ in range(50):
        if port_free(service.port):
            break
        await asyncio.sleep(0.1)
    assert port_free(service.port)


async def test_a_worker_that_dies_stops_the_service(database_url: str, tmp_path: Path) -> None:
    """Whatever supervises the service sees it fail, rather than serve on at half strength."""
    service, _ = workers_process(tmp_path, database_url)
    await service.start()
    assert service.process is not None
    first, second = workers_of(service.process.pid)
    os.kill(first, signal.SIGKILL)
    assert await asyncio.to_thread(service.process.wait, 30) != 0
    assert await ended([second])
