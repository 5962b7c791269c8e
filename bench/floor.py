"""The floor under a call: a bare grpc.aio server against the token service, one process each.

The bare server (`python -m bench.floor ADDRESS`) answers AppendLedgerEntry with a fixed
response and does nothing else: no interceptor, no database, on uvloop as the services run.
Both servers get the same debits from the same client (bench/load.py, processes of its own);
each one's CPU a call (the CPU time of its process over the run, over the calls) says how
much of a call's cost is gRPC's and the event loop's, and how much the service's.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from google.protobuf.timestamp_pb2 import Timestamp

from bench import common, load
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from harness import ROOT
from harness.processes import free_port

CLIENTS = (16, 64)
SECONDS = 4.0

# What the service answers a debit, field for field.
RESPONSE = tpb.AppendLedgerEntryResponse(
    entry=tpb.LedgerEntry(
        entry_id="1000001",
        user_id=common.account_id(1),
        delta=-1,
        reason=tpb.LEDGER_REASON_GENERATION,
        reference_id="load-0-12345-3-17",
        balance_after=999_999_999_999,
        occurred_at=Timestamp(seconds=1_790_000_000, nanos=123_000),
        created_by="development",
    )
)


async def append(request: Any, context: Any) -> tpb.AppendLedgerEntryResponse:
    return RESPONSE


async def balance(request: Any, context: Any) -> tpb.GetTokenBalanceResponse:
    return tpb.GetTokenBalanceResponse()


def unary(handler: Any, request: Any) -> Any:
    return grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=request.FromString, response_serializer=lambda m: m.SerializeToString()
    )


async def serve(address: str) -> None:
    server = grpc.aio.server()
    methods = {
        "AppendLedgerEntry": unary(append, tpb.AppendLedgerEntryRequest),
        "GetTokenBalance": unary(balance, tpb.GetTokenBalanceRequest),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("blumpo.token.v1.TokenService", methods),))
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def ready(address: str) -> None:
    """Waits (bounded) until the bare server answers."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        for _ in range(100):
            try:
                await stub.GetTokenBalance(tpb.GetTokenBalanceRequest(), timeout=1)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    raise AssertionError(f"the bare server on {address} did not answer")


def spawn(address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.floor", address], cwd=ROOT)


def row(name: str, clients: int, pid: int, address: str) -> str:
    before = common.cpu_seconds(pid)
    measured = load.run(address, "spread", clients, SECONDS, label=f"floor-{name}-{clients}-{time.time():.0f}")
    cpu = common.cpu_seconds(pid) - before
    assert measured.errors == 0, f"{measured.errors} calls failed"
    return (
        f"| {name} | {clients} | {measured.rate:,.0f} calls/s | {measured.percentile(50):.2f} / "
        f"{measured.percentile(99):.2f} ms | {1000 * cpu / measured.calls:.3f} ms "
        f"| {1000 * measured.client_cpu_seconds / measured.calls:.3f} ms |"
    )


async def bench(url: str, work_dir: Path) -> list[str]:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(common.SEED_ACCOUNTS_SQL)
    finally:
        await admin.close()
    rows = []
    address = f"127.0.0.1:{free_port()}"
    bare = spawn(address)
    try:
        await ready(address)
        rows += [row("bare grpc.aio, empty handler", clients, bare.pid, address) for clients in CLIENTS]
    finally:
        bare.terminate()
        bare.wait()
    service = common.token_service(url, work_dir, WORKERS="1")  # in one process
    await service.start()
    try:
        assert service.process is not None
        rows += [row("token service", clients, service.process.pid, service.address) for clients in CLIENTS]
    finally:
        service.stop()
    return [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {common.machine()}; one server "
        f"process each, debits of 1 token over {common.ACCOUNTS:,} accounts, {SECONDS:.0f} s a point, the "
        "clients in processes of their own.",
        "",
        "| server | clients | served | p50 / p99 | server CPU a call | client CPU a call |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


# Guarded: the load generator's processes (spawned) import this module again.
if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1]))
