"""Ledger appends over gRPC against pgbench running the same SQL, in the same run.

Each AppendLedgerEntry runs one statement of token_service/queries.sql, append_entry (the
lean ledger function); the baseline runs that statement with pgbench, with as many clients,
on the same accounts, just before, so the difference is what the service adds: gRPC,
validation, the connection pool and Python. The service's clients run in processes of their
own (bench/load.py), whose CPU is reported. Measured:

- debits spread over the accounts, against the number of clients;
- the latency at half the service's peak rate (16 and 64 clients);
- one hot account (every client on one account), where group commit comes in;
- the ledger function against one set-based statement doing the same append;
- AppendLedgerEntries of a debit on each of 1,000 accounts (the set-based batch path).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import common, load
from token_service import ledger
from token_service.store import Q

CLIENTS = (1, 4, 16, 64, 256)
HALF_PEAK_CLIENTS = (16, 64)
HOT_CLIENTS = 16
SECONDS = 4.0
BATCH_CLIENTS = 1
SQL_ROUNDS, SQL_SECONDS = 3, 3.0
LEAN = "`token.append_entry` (one entry, lean)"
LOOP = "`token.append_entries` (the batch loop, one entry)"
SET = "one set-based statement (`UPDATE … RETURNING` → `INSERT`)"

RANDOM_ACCOUNT = f"\\set u random(1, {common.ACCOUNTS})"
REFERENCE = "\\set r random(1, 9000000000000000000)"


def append_entry_script(account: str) -> str:
    """One debit of 1 token, as AppendLedgerEntry runs it."""
    statement = common.one_line(
        Q["append_entry"],
        {
            "user_id": "md5(:u::text)::uuid",
            "delta": "-1::bigint",
            "reason": "'GENERATION'",
            "reference_id": "('lean-' || :client_id || '-' || :r)",
            "max_balance": str(ledger.MAX_BALANCE),
            "created_by": "'bench'",
        },
    )
    return f"{account}\n{REFERENCE}\n{statement};\n"


def append_entries_script() -> str:
    """The same debit through the batch function (one entry), as every append ran before."""
    statement = common.one_line(
        Q["append_entries"],
        {
            "user_ids": "ARRAY[md5(:u::text)::uuid]",
            "deltas": "ARRAY[-1]",
            "reasons": "ARRAY['GENERATION']",
            "reference_ids": "ARRAY[('loop-' || :client_id || '-' || :r)]",
            "max_balance": str(ledger.MAX_BALANCE),
            "created_by": "'bench'",
        },
    )
    return f"{RANDOM_ACCOUNT}\n{REFERENCE}\n{statement};\n"


# The least one debit can be: one statement that takes the row lock, checks the reference and
# the balance, updates the balance and writes the entry.
SET_BASED = (
    "WITH account AS (UPDATE token.token_account a SET balance = a.balance - 1, updated_at = now() "
    "WHERE a.user_id = md5(:u::text)::uuid AND a.balance >= 1 AND NOT EXISTS (SELECT FROM token.token_ledger l "
    "WHERE l.user_id = md5(:u::text)::uuid AND l.reference_id = ('set-' || :client_id || '-' || :r)) "
    "RETURNING a.user_id, a.balance) "
    "INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after, created_by) "
    "SELECT user_id, -1, 'GENERATION', ('set-' || :client_id || '-' || :r), balance, 'bench' FROM account "
    "RETURNING id, balance_after, occurred_at"
)


def set_based_script() -> str:
    return f"{RANDOM_ACCOUNT}\n{REFERENCE}\n{SET_BASED};\n"


def batch_script() -> str:
    """A debit on each account, in random order, through the set-based batch function."""
    statement = common.one_line(
        Q["append_distinct_entries"],
        {
            "user_ids": f"(SELECT array_agg(md5(n::text)::uuid ORDER BY random()) "
            f"FROM generate_series(1, {common.ACCOUNTS}) n)",
            "deltas": f"array_fill(-1::bigint, ARRAY[{common.ACCOUNTS}])",
            "reasons": f"array_fill('GENERATION'::text, ARRAY[{common.ACCOUNTS}])",
            "reference_ids": f"array_fill(('batch-' || :client_id || '-' || :r), ARRAY[{common.ACCOUNTS}])",
            "max_balance": str(ledger.MAX_BALANCE),
            "created_by": "'bench'",
        },
    )
    return f"{REFERENCE}\nSELECT count(*) FROM ({statement}) b;\n"


@dataclass
class Point:
    label: str
    clients: int
    baseline: common.Pgbench
    service: load.Load
    # CPU seconds over the service's run: its processes'; the database's (also over pgbench's run).
    service_cpu: float = 0.0
    database_cpu: float = 0.0
    baseline_database_cpu: float = 0.0
    # Entries per call (1, or the batch's).
    entries: int = 1

    @property
    def ratio(self) -> float:
        return self.service.rate / self.baseline.tps

    def row(self) -> str:
        s, b = self.service, self.baseline
        unit = "calls/s" if self.entries == 1 else f"batches/s ({s.rate * self.entries:,.0f} entries/s)"
        base_unit = "tx/s" if self.entries == 1 else f"tx/s ({b.tps * self.entries:,.0f} entries/s)"
        return (
            f"| {self.label} | {self.clients} | {b.tps:,.0f} {base_unit} ({b.latency_ms:.2f} ms) "
            f"| {s.rate:,.0f} {unit} | {s.percentile(50):.2f} / {s.percentile(99):.2f} ms "
            f"| {1000 * self.service_cpu / s.calls:.2f} ms "
            f"| {1000 * self.baseline_database_cpu / b.transactions:.2f} / {1000 * self.database_cpu / s.calls:.2f} ms "
            f"| {s.client_cpu_seconds / s.seconds:.2f} | {self.ratio:.2f} |"
        )


async def bench(url: str, work_dir: Path) -> list[str]:
    admin = await asyncpg.connect(url)
    points: list[Point] = []
    half_peak: list[tuple[int, float, load.Load, common.Pgbench]] = []
    sql_paths: dict[str, list[float]] = {}
    try:
        await admin.execute(common.SEED_ACCOUNTS_SQL)
        await admin.execute("ANALYZE")
        pg_version = await admin.fetchval("SHOW server_version")
        # The database's processes, when it runs on this machine (its CPU is then counted).
        backend = await admin.fetchval("SELECT pg_backend_pid()")
        postmaster = common.parent_pid(backend)

        def database_cpu() -> float:
            return common.cpu_seconds(postmaster) if postmaster else float("nan")

        service = common.token_service(url, work_dir)
        await service.start()
        spread = append_entry_script(RANDOM_ACCOUNT)

        assert service.process is not None
        service_pid = service.process.pid

        def measure(label: str, script: str, kind: str, clients: int, entries: int = 1) -> Point:
            database_before = database_cpu()
            baseline = common.run_pgbench(url, script, clients, 0, "token", seconds=SECONDS)
            # pgbench's backends end after it does, and their CPU is counted when they are reaped:
            # in pgbench's figure, not in the service's that follows.
            time.sleep(0.5)
            baseline_database = database_cpu() - database_before
            service_before, database_before = common.cpu_seconds(service_pid), database_cpu()
            measured = load.run(service.address, kind, clients, SECONDS, label=f"{label}-{clients}")
            service_cpu = common.cpu_seconds(service_pid) - service_before
            assert measured.errors == 0, f"{measured.errors} calls failed"
            point = Point(
                label,
                clients,
                baseline,
                measured,
                service_cpu=service_cpu,
                database_cpu=database_cpu() - database_before,
                baseline_database_cpu=baseline_database,
                entries=entries,
            )
            points.append(point)
            return point

        try:
            peaks = {}
            for clients in CLIENTS:
                peaks[clients] = measure("spread", spread, "spread", clients).service.rate
            for clients in HALF_PEAK_CLIENTS:
                rate = peaks[clients] / 2
                # The database's own latency at the same rate, for comparison.
                baseline = common.run_pgbench(
                    url, spread, clients, 0, "token", seconds=SECONDS, rate=rate, percentiles=True
                )
                measured = load.run(service.address, "spread", clients, SECONDS, rate=rate)
                half_peak.append((clients, rate, measured, baseline))
            measure("hot account", append_entry_script("\\set u 1"), "hot", HOT_CLIENTS)
            measure("batch of 1,000", batch_script(), "batch", BATCH_CLIENTS, entries=common.ACCOUNTS)
            # Interleaved, a few rounds: on a shared machine one run of each is noise.
            for _ in range(SQL_ROUNDS):
                for name, script in (
                    (LEAN, spread),
                    (LOOP, append_entries_script()),
                    (SET, set_based_script()),
                ):
                    run = common.run_pgbench(url, script, 16, 0, "token", seconds=SQL_SECONDS)
                    sql_paths.setdefault(name, []).append(run.tps)
        finally:
            service.stop()
        mismatches = await admin.fetchval(
            "SELECT count(*) FROM token.token_account a WHERE a.balance <> "
            "(SELECT sum(delta) FROM token.token_ledger l WHERE l.user_id = a.user_id)"
        )
        assert mismatches == 0, f"{mismatches} accounts disagree with their ledger"
    finally:
        await admin.close()
    workers = os.cpu_count() or 1
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {common.machine()}, PostgreSQL "
        f"{pg_version} (stock settings), debits of 1 token over {common.ACCOUNTS:,} accounts, {SECONDS:.0f} s a point; "
        f"the token service runs as its own process with {workers} workers (WORKERS, default: the CPUs), a pool of "
        "20 connections each, MAX_CONCURRENT_CALLS=1000; its clients run in processes of their own.",
        "",
        "| load | clients | pgbench (same SQL) | service over gRPC | service p50 / p99 | service CPU a call "
        "| database CPU a transaction: pgbench / service call | client CPU (cores) | service / pgbench |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(point.row() for point in points),
        "",
        "At half the service's peak rate (open loop, same debits), and pgbench at the same rate (its latency "
        "counted from when each transaction was due):",
        "",
        "| clients | rate asked | served | p50 / p99 | pgbench at that rate: p50 / p99 |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {clients} | {rate:,.0f} calls/s | {measured.rate:,.0f} calls/s "
            f"| {measured.percentile(50):.2f} / {measured.percentile(99):.2f} ms "
            f"| {baseline.percentile(50):.2f} / {baseline.percentile(99):.2f} ms |"
            for clients, rate, measured, baseline in half_peak
        ),
        "",
        f"The ledger's SQL for one debit, pgbench, 16 clients, {SQL_ROUNDS} rounds of {SQL_SECONDS:.0f} s "
        "interleaved (the cost: the set-based statement's rate over the statement's, per round, the median):",
        "",
        "| statement | pgbench, each round | cost against the set-based statement |",
        "| --- | ---: | ---: |",
        *(
            f"| {name} | {' / '.join(f'{tps:,.0f}' for tps in rates)} tx/s "
            f"| {statistics.median(s / r for s, r in zip(sql_paths[SET], rates, strict=True)):.2f}x |"
            for name, rates in sql_paths.items()
        ),
    ]
    return lines
