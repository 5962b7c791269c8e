"""How the reads and the bulk jobs grow with the data: `python -m bench scale` (make bench-scale).

Seeds, with generate_series, 1,000,000 accounts holding 10,000,000 ledger entries (ten
each, and one account with 100,000) and 1,000,000 assets (one user with 10,000 of them), then
measures with both services running as their own processes:

- the first page of ListLedgerEntries and of GetAssetsForUser for the busiest user: the
  statement alone on the database (prepared, as the service runs it; p50 / p99 of a few
  hundred calls) and the call over gRPC, with the plan EXPLAIN ANALYZE shows;
- CheckBalances over every account;
- RunMonthlyRefill of every account, first run (a credit each) and again (all replays).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import common
from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from generation_service.store import Q as GQ
from harness.processes import service_pair
from token_service.store import Q as TQ

ACCOUNTS = 1_000_000
ENTRIES_PER_ACCOUNT = 10
BUSY_ENTRIES = 100_000
ASSETS = 1_000_000
BUSY_ASSETS = 10_000
SAMPLES = 300
REFILL_PERIOD = "2001-01"
DEADLINE_SECONDS = 1800.0
# The busiest user of each kind: most entries, most assets.
BUSY_ACCOUNT = uuid.UUID(int=1)
BUSY_ASSET_USER = uuid.UUID(int=2)

# Seeding writes rows the schema would accept, consistent by construction (each balance is the
# sum of its entries), with the foreign-key triggers off (replica role), and the entries in
# user order with increasing ids, so that each index grows at its end: minutes, not an hour.
SEED = [
    "SET session_replication_role = replica",
    "SET work_mem = '256MB'",
    f"""INSERT INTO token.app_user (id, email)
SELECT CASE WHEN n = 1 THEN '{BUSY_ACCOUNT}'::uuid ELSE md5('scale' || n)::uuid END, 'scale-' || n || '@example.com'
FROM generate_series(1, {ACCOUNTS}) n""",
    f"""INSERT INTO token.token_account (user_id, balance, plan_code, created_at)
SELECT id, 1000 - {ENTRIES_PER_ACCOUNT - 1}, CASE WHEN random() < 0.2 THEN 'pro' ELSE 'free' END, '2000-01-01'
FROM token.app_user ORDER BY id""",
    f"""INSERT INTO token.token_ledger (id, user_id, delta, reason, reference_id, balance_after, occurred_at,
                                  created_by)
SELECT lpad(to_hex(row_number() OVER (ORDER BY a.user_id, k)), 32, '0')::uuid, a.user_id,
       CASE WHEN k = 1 THEN 1000 ELSE -1 END, CASE WHEN k = 1 THEN 'PURCHASE' ELSE 'GENERATION' END,
       'seed-' || lpad(k::text, 2, '0'), 1000 - (k - 1), '2000-01-01'::timestamptz + make_interval(secs => k),
       'bench'
FROM token.token_account a, generate_series(1, {ENTRIES_PER_ACCOUNT}) k
ORDER BY a.user_id, k""",
    # The busy account: many more entries, credits and debits that leave its balance as it was.
    f"""INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after, occurred_at, created_by)
SELECT '{BUSY_ACCOUNT}', CASE WHEN k % 2 = 1 THEN 5 ELSE -5 END,
       CASE WHEN k % 2 = 1 THEN 'PURCHASE' ELSE 'GENERATION' END, 'busy-' || k,
       1000 - {ENTRIES_PER_ACCOUNT - 1} + CASE WHEN k % 2 = 1 THEN 5 ELSE 0 END,
       '2000-02-01'::timestamptz + make_interval(secs => k), 'bench'
FROM generate_series(1, {BUSY_ENTRIES}) k""",
    f"""INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest,
                                       created_at, completed_at)
SELECT lpad(to_hex(n), 32, '0')::uuid,
       CASE WHEN n <= {BUSY_ASSETS} THEN '{BUSY_ASSET_USER}'::uuid ELSE md5('scale' || (n % {ACCOUNTS}))::uuid END,
       'scale prompt', '{{}}', 10, 'SUCCEEDED', '\\x00', now() - make_interval(secs => n), now()
FROM generate_series(1, {ASSETS}) n""",
    """INSERT INTO generation.asset_image (id, job_id, user_id, title, storage_key, mime_type, bytes_size, width,
                                    height, format, created_at)
SELECT j.id, j.id, j.user_id, 'scale', 'assets/' || j.id, 'image/webp', 1000, 1024, 1024, 'WEBP', j.created_at
FROM generation.generation_job j ORDER BY j.id""",
    "RESET session_replication_role",
    "VACUUM ANALYZE",
]


def percentiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49], cuts[98]


async def sampled(call: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """p50 and p99 in ms of SAMPLES calls one after another (after a few to warm up)."""
    for _ in range(10):
        await call()
    latencies = []
    for _ in range(SAMPLES):
        started = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - started) * 1000)
    return percentiles(latencies)


async def plan(admin: asyncpg.Connection, sql: str, *args: Any) -> list[str]:
    rows = await admin.fetch(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {sql}", *args)
    return [row[0] for row in rows]


async def bench(url: str, work_dir: Path) -> list[str]:
    admin = await asyncpg.connect(url, command_timeout=DEADLINE_SECONDS)
    try:
        started = time.perf_counter()
        for statement in SEED:
            await admin.execute(statement)
        seed_seconds = time.perf_counter() - started
        pg_version = await admin.fetchval("SHOW server_version")
        ledger_rows = await admin.fetchval("SELECT count(*) FROM token.token_ledger")
        # The first page, as the stores ask for it (no keyset yet: the end of time).
        list_entries = (TQ["list_entries"].sql, BUSY_ACCOUNT, datetime.max, 2**63 - 1, 51)
        assets_for_user = (GQ["assets_for_user"].sql, BUSY_ASSET_USER, datetime.max, uuid.UUID(int=2**128 - 1), 21)
        await admin.execute("SET search_path = token, generation")
        ledger_plan = await plan(admin, *list_entries)
        assets_plan = await plan(admin, *assets_for_user)
        ledger_sql = await sampled(lambda: admin.fetch(*list_entries))
        assets_sql = await sampled(lambda: admin.fetch(*assets_for_user))

        token, generation = service_pair(
            {"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "DB_TIMEOUT": str(int(DEADLINE_SECONDS * 1000))}, work_dir
        )
        await token.start()
        await generation.start()
        try:
            async with (
                grpc.aio.insecure_channel(token.address) as token_channel,
                grpc.aio.insecure_channel(generation.address) as generation_channel,
            ):
                tokens = token_pb2_grpc.TokenServiceStub(token_channel)
                assets = generation_pb2_grpc.GenerationServiceStub(generation_channel)
                first_entries = tpb.ListLedgerEntriesRequest(user_id=str(BUSY_ACCOUNT), page_size=50)
                first_assets = gpb.GetAssetsForUserRequest(user_id=str(BUSY_ASSET_USER), page_size=20)
                page = await tokens.ListLedgerEntries(first_entries, timeout=10)
                assert len(page.entries) == 50 and page.next_page_token
                asset_page = await assets.GetAssetsForUser(first_assets, timeout=10)
                assert len(asset_page.assets) == 20 and asset_page.next_page_token
                ledger_grpc = await sampled(lambda: tokens.ListLedgerEntries(first_entries, timeout=10))
                assets_grpc = await sampled(lambda: assets.GetAssetsForUser(first_assets, timeout=10))

                started = time.perf_counter()
                checked = await tokens.CheckBalances(tpb.CheckBalancesRequest(), timeout=DEADLINE_SECONDS)
                check_seconds = time.perf_counter() - started
                assert checked.accounts_checked == ACCOUNTS and not checked.mismatches, checked.mismatches[:3]

                refills = []
                for _ in range(2):
                    started = time.perf_counter()
                    done = await tokens.RunMonthlyRefill(
                        tpb.RunMonthlyRefillRequest(period=REFILL_PERIOD), timeout=DEADLINE_SECONDS
                    )
                    refills.append((time.perf_counter() - started, done.accounts_credited, done.accounts_skipped))
                assert refills[0][1] == ACCOUNTS and refills[1][2] == ACCOUNTS, refills
        finally:
            generation.stop()
            token.stop()
    finally:
        await admin.close()

    def fence(lines: list[str]) -> list[str]:
        return ["```", *lines, "```"]

    return [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {common.machine()}, PostgreSQL "
        f"{pg_version} (stock settings): {ACCOUNTS:,} accounts, {ledger_rows:,} ledger entries (the busiest account "
        f"{BUSY_ENTRIES + ENTRIES_PER_ACCOUNT:,}), {ASSETS:,} assets (the busiest user {BUSY_ASSETS:,}); seeding "
        f"took {seed_seconds:.0f} s. Latencies are of {SAMPLES} calls one after another.",
        "",
        "| read (first page, busiest user) | statement on the database p50 / p99 | call over gRPC p50 / p99 |",
        "| --- | ---: | ---: |",
        f"| `ListLedgerEntries`, 50 entries | {ledger_sql[0]:.2f} / {ledger_sql[1]:.2f} ms "
        f"| {ledger_grpc[0]:.2f} / {ledger_grpc[1]:.2f} ms |",
        f"| `GetAssetsForUser`, 20 assets | {assets_sql[0]:.2f} / {assets_sql[1]:.2f} ms "
        f"| {assets_grpc[0]:.2f} / {assets_grpc[1]:.2f} ms |",
        "",
        "| bulk job | time | accounts/s |",
        "| --- | ---: | ---: |",
        f"| `CheckBalances`, every account (no mismatches) | {check_seconds:.1f} s | {ACCOUNTS / check_seconds:,.0f} |",
        f"| `RunMonthlyRefill`, first run (credits {refills[0][1]:,}) | {refills[0][0]:.1f} s "
        f"| {ACCOUNTS / refills[0][0]:,.0f} |",
        f"| `RunMonthlyRefill` again (skips {refills[1][2]:,} replays) | {refills[1][0]:.1f} s "
        f"| {ACCOUNTS / refills[1][0]:,.0f} |",
        "",
        "The plans (EXPLAIN ANALYZE), first page of the ledger:",
        "",
        *fence(ledger_plan),
        "",
        "and of the assets:",
        "",
        *fence(assets_plan),
    ]
