"""Ledger appends: AppendLedgerEntry over gRPC against pgbench running the same SQL.

Each service call runs one statement of token_service/queries.sql, append_entries (the
ledger function); the baseline runs that same statement with pgbench, with as many
clients, on the same accounts, in the same run, so the difference is what the service
adds: gRPC, validation, the connection pool and Python.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc

from bench import common
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from harness.processes import ServiceProcess, free_port
from token_service import ledger
from token_service.store import Q

# (clients, calls per client)
RUNS = ((1, 2000), (16, 1000))


def pgbench_script() -> str:
    """One debit of 1 token on a random account, as AppendLedgerEntry runs it."""
    append = common.one_line(
        Q["append_entries"],
        {
            1: "ARRAY[md5(:u::text)::uuid]",
            2: "ARRAY[-1]",
            3: "ARRAY['GENERATION']",
            4: "ARRAY[('ref-' || :client_id || '-' || :r)]",
            5: str(ledger.MAX_BALANCE),
            6: "'bench'",
        },
    )
    return "\n".join(
        [
            f"\\set u random(1, {common.ACCOUNTS})",
            "\\set r random(1, 9000000000000000000)",
            f"{append};",
            "",
        ]
    )


@dataclass
class ServiceRun:
    calls: int
    seconds: float
    latencies_ms: list[float]

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies_ms, n=100)[q - 1]


async def run_service(address: str, clients: int, calls_per_client: int) -> ServiceRun:
    latencies: list[float] = []

    async def client(stub: token_pb2_grpc.TokenServiceAsyncStub, number: int) -> None:
        for call in range(calls_per_client):
            request = tpb.AppendLedgerEntryRequest(
                user_id=common.account_id(1 + (number * 7919 + call * 104729) % common.ACCOUNTS),
                delta=-1,
                reason=tpb.LEDGER_REASON_GENERATION,
                reference_id=f"grpc-{clients}-{number}-{call}",
            )
            started = time.perf_counter()
            await stub.AppendLedgerEntry(request, timeout=30)
            latencies.append((time.perf_counter() - started) * 1000)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        await stub.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=common.account_id(1)), timeout=10)  # warm up
        started = time.perf_counter()
        await asyncio.gather(*(client(stub, n) for n in range(clients)))
        seconds = time.perf_counter() - started
    return ServiceRun(clients * calls_per_client, seconds, latencies)


async def bench(url: str, work_dir: Path) -> list[str]:
    admin = await asyncpg.connect(url)
    rows = []
    try:
        await admin.execute(common.SEED_ACCOUNTS_SQL)
        await admin.execute("ANALYZE")
        pg_version = await admin.fetchval("SHOW server_version")
        port = free_port()
        env = {
            "DATABASE_URL": url,
            "TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
            "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        }
        env |= {"DB_POOL_SIZE": "20", "LOG_LEVEL": "WARNING"}
        service = ServiceProcess("token_service", env, port, work_dir / "token.log")
        await service.start()
        try:
            for clients, per_client in RUNS:
                await admin.execute("CHECKPOINT")
                baseline = common.run_pgbench(url, pgbench_script(), clients, per_client, "token")
                await admin.execute("CHECKPOINT")
                measured = await run_service(service.address, clients, per_client)
                rows.append((clients, baseline, measured))
        finally:
            service.stop()
        mismatches = await admin.fetchval(
            "SELECT count(*) FROM token.token_account a WHERE a.balance <> "
            "(SELECT sum(delta) FROM token.token_ledger l WHERE l.user_id = a.user_id)"
        )
        assert mismatches == 0, f"{mismatches} accounts disagree with their ledger"
    finally:
        await admin.close()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {common.machine()}, PostgreSQL "
        f"{pg_version} (stock settings), debits of 1 token spread over {common.ACCOUNTS:,} accounts; the token service "
        "runs as its own process with its default pool of 20 connections.",
        "",
        "| clients | pgbench (same SQL) | service over gRPC | service p50 / p99 latency | service / baseline |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for clients, baseline, measured in rows:
        rate = measured.calls / measured.seconds
        lines.append(
            f"| {clients} | {baseline.tps:,.0f} tx/s ({baseline.latency_ms:.2f} ms) | {rate:,.0f} calls/s "
            f"| {measured.percentile(50):.2f} / {measured.percentile(99):.2f} ms | {rate / baseline.tps:.2f} |"
        )
    return lines
