"""The worker queue at growing lengths: the statements of a ClaimNextJob that sweeps (the lease
sweep, then the claim; a process's claims sweep at most once per LEASE_SWEEP_INTERVAL_MS) as
the service's store runs them, with 1,000 to 1,000,000 jobs queued.

The queue is filled with generate_series: jobs of 10,000 users on two plans (priorities 0
and 1), of four models, created over the last two hours (so that with the default aging time
of five minutes most are aged). At each length, claims are timed one at a time and from 8
workers at once, without a model filter and with one (a model a quarter of the jobs use).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench import common
from blumpo_common.config import DatabaseConfig, login_url
from blumpo_common.db import create_pool
from generation_service.config import ROLE
from generation_service.store import Store

LENGTHS = (1_000, 10_000, 100_000, 1_000_000)
USERS = 10_000
MODELS = ("sdxl", "sd15", "flux", "blumpo-diffusion-v1")
CLAIMS = 200
WORKERS = 8
AGING_SECONDS = 300.0

FILL_SQL = f"""
INSERT INTO generation.generation_job
  (id, user_id, prompt, params, tokens_cost, priority, status, request_digest, created_at)
SELECT gen_random_uuid(), md5((n % {USERS})::text)::uuid, 'bench',
  jsonb_build_object('model', (ARRAY{list(MODELS)})[1 + n % {len(MODELS)}], 'width', 1024, 'height', 1024,
                     'steps', 30),
  10, CASE WHEN n % {USERS} % 5 = 0 THEN 1 ELSE 0 END, 'QUEUED', '\\x00'::bytea,
  now() - make_interval(secs => random() * 7200)
FROM generate_series($1::bigint, $2::bigint - 1) AS n
"""

OWNERS_SQL = f"""
INSERT INTO generation.job_owner (user_id, plan)
SELECT md5(n::text)::uuid, CASE WHEN n % 5 = 0 THEN 'pro' ELSE 'free' END FROM generate_series(0, {USERS - 1}) AS n
ON CONFLICT DO NOTHING
"""


def _ms(seconds: list[float], fraction: float) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


async def _claims(store: Store, workers: int, models: list[str]) -> list[float]:
    """Latencies of CLAIMS claims (sweep, then claim) from that many workers at once."""
    took: list[float] = []

    async def worker(number: int) -> None:
        for _ in range(CLAIMS // workers):
            started = time.perf_counter()
            await store.sweep_expired_leases()
            claimed = await store.claim_next(f"bench-{number}", 3600, models, AGING_SECONDS)
            took.append(time.perf_counter() - started)
            assert claimed is not None, "the queue ran dry"

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return took


async def bench(url: str, max_length: int) -> list[str]:
    admin = await asyncpg.connect(url)
    rows: list[str] = []
    fills: list[str] = []
    pool = await create_pool(DatabaseConfig(url=login_url(url, ROLE), pool_size=WORKERS, timeout_ms=60_000))
    try:
        pg_version = await admin.fetchval("SHOW server_version")
        # Each plan may run every job at once: the benchmark measures the queue, not the caps.
        await admin.execute("UPDATE generation.plan_limit SET max_running_jobs = 1000000")
        await admin.execute(OWNERS_SQL)
        store = Store(pool, 60.0)
        filled = 0

        async def top_up(length: int) -> None:
            """Queues jobs until length are queued (claims took some)."""
            nonlocal filled
            queued = await admin.fetchval("SELECT count(*) FROM generation.generation_job WHERE status = 'QUEUED'")
            await admin.execute(FILL_SQL, filled, filled + length - queued)
            filled += length - queued

        for length in (n for n in LENGTHS if n <= max_length):
            started = time.perf_counter()
            await top_up(length)
            await admin.execute("VACUUM ANALYZE generation.generation_job")
            fills.append(f"{length:,} in {time.perf_counter() - started:.0f} s")
            for workers, models in ((1, []), (WORKERS, []), (1, [MODELS[0]])):
                await top_up(length)
                took = await _claims(store, workers, models)
                what = f"{workers} worker{'s' if workers > 1 else ''}" + (f", models [{models[0]}]" if models else "")
                rows.append(f"| {length:,} | {what} | {_ms(took, 0.5):.2f} ms | {_ms(took, 0.99):.2f} ms |")
    finally:
        await pool.close()
        await admin.close()
    return [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {common.machine()}, PostgreSQL "
        f"{pg_version} (stock settings); {USERS:,} users (one in five on `pro`), {len(MODELS)} models, jobs created "
        f"over two hours (aging {AGING_SECONDS:.0f} s); {CLAIMS} claims per row, each the lease sweep then the claim. "
        f"Queue filled (and vacuumed) to {', '.join(fills)}.",
        "",
        "| queued jobs | claims from | p50 | p99 |",
        "| ---: | --- | ---: | ---: |",
        *rows,
    ]
