"""Monthly refill of 100,000 accounts: end to end over gRPC, against a pgbench baseline.

Builds a scratch database with the dbmate migrations, bulk-inserts users, accounts
and their signup entries with generate_series, then in the same run:

1. baseline: pgbench runs the statements of one refill batch (refill_batch, then
   append_distinct_entries, taken from token_service/queries.sql) once per batch of 1000
   accounts, one client, prepared protocol as asyncpg uses; the arrays the service
   builds between the two are built in SQL and passed on with \\gset;
2. RunMonthlyRefill over a real gRPC channel to an in-process token server, for
   another period (so it writes as much as the baseline did), then again for the
   same period (every account a replay), then CheckBalances over all accounts.
"""

from __future__ import annotations

import time

import asyncpg
import grpc

from bench import common
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import server
from blumpo_common.config import DatabaseConfig, login_url
from blumpo_common.db import create_pool
from token_service import ledger
from token_service import refill as refill_job
from token_service.server import service
from token_service.store import Q, Store

BASELINE_PERIOD, GRPC_PERIOD = "2001-01", "2001-02"
DEADLINE_SECONDS = 600.0

SEED_SQL = """
WITH g AS (
  SELECT n, gen_random_uuid() AS id FROM generate_series(1, $1::int) AS n
), users AS (
  INSERT INTO token.app_user (id, email) SELECT id, 'bench-' || n || '@example.com' FROM g
), accounts AS (
  -- One account in five on pro, the rest on free.
  -- Opened long before the (past) periods the benchmark refills.
  INSERT INTO token.token_account (user_id, balance, plan_code, created_at)
  SELECT id, 100, CASE WHEN n % 5 = 0 THEN 'pro' ELSE 'free' END, '2000-01-01T00:00:00Z' FROM g
)
INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after, created_by)
SELECT id, 100, 'SIGNUP_BONUS', 'signup', 100, 'bench' FROM g
"""

# The keyset start of each batch, so every pgbench transaction takes the next batch.
CURSOR_SQL = """
CREATE TABLE public.bench_cursor AS
SELECT 0 AS batch_no, '00000000-0000-0000-0000-000000000000'::uuid AS after_id
UNION ALL
SELECT (rn / $batch)::int, user_id
FROM (SELECT user_id, row_number() OVER (ORDER BY user_id) AS rn FROM token.token_account) t
WHERE rn % $batch = 0;
CREATE UNIQUE INDEX ON public.bench_cursor (batch_no);
CREATE SEQUENCE public.bench_batch_no MINVALUE 0 START 0;
"""


def pgbench_script(period: str, batch_size: int) -> str:
    ref = f"'{refill_job.reference(period)}'::text"
    end = f"'{refill_job.period_end(period).isoformat()}'::timestamptz"
    select_batch = common.one_line(Q["refill_batch"], {1: ":after_id::uuid", 2: str(batch_size), 3: end})
    append = common.one_line(
        Q["append_distinct_entries"],
        {
            "user_ids": ":ids",
            "deltas": ":allowances",
            "reasons": ":reasons",
            "reference_ids": ":refs",
            "max_balance": str(ledger.MAX_BALANCE),
            "created_by": "'bench'",
        },
    )
    eligible = "FILTER (WHERE monthly_allowance > 0)"
    count = f"count(*) {eligible}"
    return "\n".join(
        [
            "SELECT nextval('public.bench_batch_no') AS batch_no \\gset",
            "SELECT after_id FROM public.bench_cursor WHERE batch_no = :batch_no \\gset",
            "BEGIN;",
            f"SELECT (array_agg(user_id ORDER BY user_id) {eligible})::text AS ids, "
            f"(array_agg(monthly_allowance ORDER BY user_id) {eligible})::text AS allowances, "
            f"array_fill({ref}, ARRAY[{count}::int])::text AS refs, "
            f"array_fill('MONTHLY_REFILL'::text, ARRAY[{count}::int])::text AS reasons "
            f"FROM ({select_batch}) b \\gset",
            f"SELECT count(*) FROM ({append}) a;",
            "COMMIT;",
            "",
        ]
    )


def run_baseline(url: str, period: str, batches: int, batch_size: int) -> common.Pgbench:
    """One client taking the batches one after another, as RunMonthlyRefill does."""
    return common.run_pgbench(url, pgbench_script(period, batch_size), 1, batches, "token")


async def timed_refill(stub: token_pb2_grpc.TokenServiceAsyncStub, period: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    response = await stub.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period=period), timeout=DEADLINE_SECONDS)
    return time.perf_counter() - started, response.accounts_credited, response.accounts_skipped


async def bench(url: str, accounts: int, batch_size: int) -> list[str]:
    admin = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await admin.execute(SEED_SQL.replace("$1::int", str(accounts)))
        await admin.execute("ANALYZE")
        seed_seconds = time.perf_counter() - started
        await admin.execute(CURSOR_SQL.replace("$batch", str(batch_size)))
        pg_version = await admin.fetchval("SHOW server_version")
        batches = -(-accounts // batch_size)

        await admin.execute("CHECKPOINT")
        baseline = run_baseline(url, BASELINE_PERIOD, batches, batch_size)
        baseline_seconds = baseline.transactions * baseline.latency_ms / 1000
        written = await admin.fetchval(
            "SELECT count(*) FROM token.token_ledger WHERE reference_id = $1", refill_job.reference(BASELINE_PERIOD)
        )
        assert written == accounts, f"the baseline wrote {written} entries, expected {accounts}"

        await admin.execute("CHECKPOINT")
        config = DatabaseConfig(url=login_url(url, "token_service"), pool_size=4, timeout_ms=600_000)
        pool = await create_pool(config)
        running = await server.start(service(Store(pool, 600.0)), pool, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = token_pb2_grpc.TokenServiceStub(channel)
                first = await timed_refill(stub, GRPC_PERIOD)
                again = await timed_refill(stub, GRPC_PERIOD)
                started = time.perf_counter()
                checked = await stub.CheckBalances(tpb.CheckBalancesRequest(), timeout=DEADLINE_SECONDS)
                check_seconds = time.perf_counter() - started
        finally:
            await running.stop(1)
            await pool.close()
    finally:
        await admin.close()
    assert first[1:] == (accounts, 0), f"first refill credited/skipped {first[1:]}"
    assert again[1:] == (0, accounts), f"second refill credited/skipped {again[1:]}"
    assert checked.accounts_checked == accounts and not checked.mismatches

    def per_batch(seconds: float) -> str:
        return f"{seconds / batches * 1000:.1f} ms"

    return [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {common.machine()}, PostgreSQL {pg_version} "
        f"(stock settings), {accounts:,} accounts (one in five on `pro`), batches of {batch_size}; "
        f"seeding took {seed_seconds:.1f} s.",
        "",
        "| run | total | per batch | accounts/s |",
        "| --- | ---: | ---: | ---: |",
        f"| baseline: pgbench, the batch's SQL only, 1 client, prepared | {baseline_seconds:.2f} s "
        f"| {baseline.latency_ms:.1f} ms | {accounts / baseline_seconds:,.0f} |",
        f"| `RunMonthlyRefill` over gRPC, first run (credits {first[1]:,}) | {first[0]:.2f} s "
        f"| {per_batch(first[0])} | {accounts / first[0]:,.0f} |",
        f"| `RunMonthlyRefill` again, same period (skips {again[2]:,} replays) | {again[0]:.2f} s "
        f"| {per_batch(again[0])} | {accounts / again[0]:,.0f} |",
        f"| `CheckBalances` over all accounts (no mismatches) | {check_seconds:.2f} s | | |",
        "",
        f"The service takes {first[0] / baseline_seconds:.1f}x the baseline's database time "
        f"(pgbench wall time, connection included: {baseline.wall_seconds:.2f} s).",
    ]
