"""What the benchmarks share: seeded accounts, pgbench, the machine, docs sections."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blumpo_common.db import Query
from harness import ROOT
from harness.processes import ServiceProcess, free_port

DOCS = ROOT / "docs" / "benchmarks.md"

__all__ = [
    "ACCOUNTS",
    "DOCS",
    "SEED_ACCOUNTS_SQL",
    "START_BALANCE",
    "Pgbench",
    "account_id",
    "cpu_seconds",
    "machine",
    "one_line",
    "parent_pid",
    "run_pgbench",
]


# Accounts that pgbench and the service pick at random: user n has id md5(n)::uuid.
ACCOUNTS = 1000
START_BALANCE = 10**12

SEED_ACCOUNTS_SQL = f"""
WITH g AS (
  SELECT n, md5(n::text)::uuid AS id FROM generate_series(1, {ACCOUNTS}) AS n
), users AS (
  INSERT INTO token.app_user (id, email) SELECT id, 'bench-' || n || '@example.com' FROM g
), accounts AS (
  INSERT INTO token.token_account (user_id, balance, plan_code) SELECT id, {START_BALANCE}, 'free' FROM g
)
INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after, created_by)
SELECT id, {START_BALANCE}, 'PURCHASE', 'bench-start', {START_BALANCE}, 'bench' FROM g
"""


def account_id(n: int) -> str:
    """The id of seeded account n (1..ACCOUNTS), as pgbench computes it: md5(n)::uuid."""
    return str(uuid.UUID(hex=hashlib.md5(str(n).encode()).hexdigest()))


def one_line(query: Query, values: Mapping[int | str, str]) -> str:
    """A statement of queries.sql as one pgbench line, its parameters (by number, or by name
    for a statement with `:name` parameters) replaced by pgbench expressions."""
    numbered = {query.params.index(k) + 1 if isinstance(k, str) else k: v for k, v in values.items()}
    # Comments go first: joined into one line, one would hide the rest of the statement.
    lines = (re.sub(r"--.*$", "", line).strip() for line in query.sql.splitlines())
    text = " ".join(line for line in lines if line).rstrip(";")
    return re.sub(r"\$(\d+)", lambda m: numbered[int(m.group(1))], text)


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
        return str(candidate)
    raise SystemExit("pgbench not found: install postgresql-client (or put pgbench on PATH)")


@dataclass
class Pgbench:
    transactions: int
    latency_ms: float
    tps: float
    wall_seconds: float
    # Each transaction's latency, when asked for (run_pgbench's percentiles).
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies_ms, n=100)[q - 1]


def run_pgbench(
    url: str,
    script: str,
    clients: int,
    transactions_per_client: int,
    search_path: str,
    *,
    seconds: float = 0,
    rate: float = 0,
    percentiles: bool = False,
) -> Pgbench:
    """Runs a custom script with the prepared protocol (as asyncpg uses), no vacuum: the given
    transactions per client, or for the given seconds; at rate transactions per second in all
    (0: as fast as it can); with percentiles, each transaction's latency is kept (pgbench's log;
    at a rate, counted from when the transaction was due)."""
    with tempfile.TemporaryDirectory() as work:
        script_path = Path(work) / "script.sql"
        script_path.write_text(script)
        env = {**os.environ, "PGOPTIONS": f"-c search_path={search_path}"}
        threads = min(clients, os.cpu_count() or 1)
        cmd = [pgbench_binary(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads)]
        cmd += ["-T", str(max(1, round(seconds)))] if seconds else ["-t", str(transactions_per_client)]
        cmd += ["-R", f"{rate:.0f}"] if rate else []
        cmd += ["-l", "--log-prefix", f"{work}/log"] if percentiles else []
        cmd += ["-f", str(script_path), url]
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        # A line of the log: client, transaction, latency (us), script, epoch, us[, schedule lag].
        lines = [line for log in Path(work).glob("log.*") for line in log.read_text().splitlines()]
        latencies = [int(line.split()[2]) / 1000 for line in lines]
    latency = re.search(r"latency average = ([0-9.]+) ms", done.stdout)
    tps = re.search(r"tps = ([0-9.]+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: ([0-9]+)", done.stdout)
    if done.returncode != 0 or latency is None or tps is None or processed is None:
        raise SystemExit(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
    return Pgbench(int(processed.group(1)), float(latency.group(1)), float(tps.group(1)), wall, latencies)


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) used so far by process pid and every process under it, those
    that ended included (Linux's /proc); 0 for a process gone or out of sight."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        # utime, stime, and cutime, cstime: the children it has reaped (a database's closed connections).
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, IndexError, ValueError):
        pass
    return total


def parent_pid(backend: int) -> int | None:
    """The parent of a PostgreSQL backend (the postmaster), None when it cannot be seen here
    (the database on another machine)."""
    try:
        if not Path(f"/proc/{backend}/cmdline").read_bytes().startswith(b"postgres"):
            return None
        return int(Path(f"/proc/{backend}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu})"


def write_docs(section: str, lines: Sequence[str]) -> None:
    """Replaces the figures between the section's markers in docs/benchmarks.md."""
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    text = DOCS.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)


def token_service(url: str, work_dir: Path, **settings: str) -> ServiceProcess:
    """The token service as its own process on free ports (not started yet), as deployed but
    for its bound on calls, raised so that 256 clients are queued rather than refused."""
    port = free_port()
    env = {
        "DATABASE_URL": url,
        "TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "DB_POOL_SIZE": "20",
        "LOG_LEVEL": "WARNING",
        "MAX_CONCURRENT_CALLS": "1000",
        **settings,
    }
    return ServiceProcess("token_service", env, port, work_dir / "token.log")
