"""Generation jobs: CreateGenerationJob (the charge saga) and ClaimNextJob, over gRPC,
against pgbench running the same SQL in the same run.

A create whose owner's plan the service knows (PLAN_CACHE_SECONDS; after each owner's first
create) is four statements: the price (generation's price), the intent (insert_intent), the
debit (token's append_entry, reached through the token service) and the settle
(finish_charged); the baseline runs those four with pgbench. A claim is claim_next (the
lease sweep runs at most once per LEASE_SWEEP_INTERVAL_MS per process, not per claim); the
baseline runs claim_next. Both services run as their own processes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import asyncpg
import grpc

from bench import common
from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from generation_service.store import Q as GQ
from harness.processes import service_pair
from token_service import ledger
from token_service.store import Q as TQ

COST = 10
# The default model at 1024 x 1024, 30 steps: 10 tokens by the migrations' price list.
PARAMS = {"width": 1024, "height": 1024, "steps": 30, "seed": 0, "model": "sdxl", "extra": {}}
# (clients, creates per client)
CREATE_RUNS = ((1, 1000), (16, 250))
WORKERS, CLAIMS_PER_WORKER = 16, 250


def create_script() -> str:
    job = "md5(:client_id || '-' || :r)::uuid"
    price = common.one_line(GQ["price"], {1: "'sdxl'", 2: ":width", 3: ":height", 4: ":steps"})
    intent = common.one_line(
        GQ["insert_intent"],
        {
            "id": job,
            "user_id": "md5(:u::text)::uuid",
            "prompt": "'bench prompt'",
            "params": f"'{json.dumps(PARAMS)}'",
            "tokens_cost": str(COST),
            "request_digest": "'\\x00'::bytea",
            "plan": "'free'",
            "claim_seconds": "10",
        },
    )
    debit = common.one_line(
        TQ["append_entry"],
        {
            "user_id": "md5(:u::text)::uuid",
            "delta": f"-{COST}::bigint",
            "reason": "'GENERATION'",
            "reference_id": f"{job}::text",
            "max_balance": str(ledger.MAX_BALANCE),
            "created_by": "'bench'",
        },
    )
    settle = common.one_line(GQ["finish_charged"], {1: job})
    return "\n".join(
        [
            f"\\set u random(1, {common.ACCOUNTS})",
            "\\set r random(1, 9000000000000000000)",
            "\\set width 1024",
            "\\set height 1024",
            "\\set steps 30",
            f"{price};",
            f"{intent};",
            f"{debit};",
            f"{settle};",
            "",
        ]
    )


def claim_script() -> str:
    claim = common.one_line(
        GQ["claim_next"],
        {
            "worker_id": "'pgbench-' || :client_id",
            "lease_seconds": "300",
            "models": "ARRAY[]::text[]",
            "aging_seconds": "300",
        },
    )
    return f"{claim};\n"


async def timed(clients: int, per_client: int, call: object) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def client(number: int) -> None:
        for n in range(per_client):
            started = time.perf_counter()
            await call(number, n)  # type: ignore[operator]
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - started, latencies


def p50(latencies: list[float]) -> float:
    return sorted(latencies)[len(latencies) // 2]


async def bench(url: str, work_dir: Path) -> list[str]:
    admin = await asyncpg.connect(url)
    lines: list[str] = []
    try:
        await admin.execute(common.SEED_ACCOUNTS_SQL)
        # Each plan may run every job at once: the benchmark measures the queue, not the caps.
        await admin.execute("UPDATE generation.plan_limit SET max_running_jobs = 1000000")
        await admin.execute("ANALYZE")
        pg_version = await admin.fetchval("SHOW server_version")
        token, generation = service_pair({"DATABASE_URL": url, "LOG_LEVEL": "WARNING"}, work_dir)
        await token.start()
        await generation.start()
        rows = []
        try:
            async with grpc.aio.insecure_channel(generation.address) as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                params = gpb.GenerationParams(width=1024, height=1024, steps=30, model="sdxl")

                async def create(client: int, n: int) -> None:
                    await stub.CreateGenerationJob(
                        gpb.CreateGenerationJobRequest(
                            user_id=common.account_id(1 + (client * 7919 + n * 104729) % common.ACCOUNTS),
                            job_id=str(uuid.uuid4()),
                            prompt="bench prompt",
                            params=params,
                            tokens_cost=COST,
                        ),
                        timeout=30,
                    )

                async def claim(client: int, n: int) -> None:
                    reply = await stub.ClaimNextJob(
                        gpb.ClaimNextJobRequest(worker_id=f"worker-{client}", lease_seconds=300), timeout=30
                    )
                    assert reply.HasField("job"), "the queue ran dry"

                def services_cpu() -> float:
                    assert token.process is not None and generation.process is not None
                    return common.cpu_seconds(token.process.pid) + common.cpu_seconds(generation.process.pid)

                async def measured(clients: int, per_client: int, call: object) -> tuple[float, float, float]:
                    """Calls per second, p50 ms, and both services' CPU ms per call."""
                    cpu = services_cpu()
                    seconds, latencies = await timed(clients, per_client, call)
                    calls = clients * per_client
                    return calls / seconds, p50(latencies), (services_cpu() - cpu) * 1000 / calls

                for clients, per_client in CREATE_RUNS:
                    await admin.execute("CHECKPOINT")
                    baseline = common.run_pgbench(url, create_script(), clients, per_client, "generation,token")
                    rows.append(("create", clients, baseline, *await measured(clients, per_client, create)))
                await admin.execute("CHECKPOINT")
                baseline = common.run_pgbench(url, claim_script(), WORKERS, CLAIMS_PER_WORKER, "generation")
                rows.append(("claim", WORKERS, baseline, *await measured(WORKERS, CLAIMS_PER_WORKER, claim)))
        finally:
            generation.stop()
            token.stop()
        mismatches = await admin.fetchval(
            "SELECT count(*) FROM token.token_account a WHERE a.balance <> "
            "(SELECT sum(delta) FROM token.token_ledger l WHERE l.user_id = a.user_id)"
        )
        unpaid = await admin.fetchval(
            "SELECT count(*) FROM generation.generation_job j WHERE j.status <> 'CHARGING' AND NOT EXISTS "
            "(SELECT FROM token.token_ledger l WHERE l.user_id = j.user_id AND l.reference_id = j.id::text)"
        )
        assert (mismatches, unpaid) == (0, 0), f"{mismatches} accounts off their ledger, {unpaid} jobs unpaid"
    finally:
        await admin.close()
    lines += [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {common.machine()}, PostgreSQL "
        f"{pg_version} (stock settings), {common.ACCOUNTS:,} accounts; both services as their own processes. "
        "Services' CPU per call: the CPU the token and generation services' processes (all their workers) "
        "used over the service's run, per call; unlike the rates, it holds on a machine shared with other work.",
        "",
        "| call | clients | pgbench (same SQL) | service over gRPC | service p50 | services' CPU per call "
        "| service / baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for call, clients, baseline, rate, median, cpu_ms in rows:
        lines.append(
            f"| `{'CreateGenerationJob' if call == 'create' else 'ClaimNextJob'}` | {clients} "
            f"| {baseline.tps:,.0f} /s ({baseline.latency_ms:.2f} ms) | {rate:,.0f} /s | {median:.2f} ms "
            f"| {cpu_ms:.2f} ms | {rate / baseline.tps:.2f} |"
        )
    return lines
