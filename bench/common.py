"""What the benchmarks share: seeded accounts, pgbench, the machine, docs sections."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from blumpo_common.db import Query
from harness import ROOT

DOCS = ROOT / "docs" / "benchmarks.md"

__all__ = [
    "ACCOUNTS",
    "DOCS",
    "SEED_ACCOUNTS_SQL",
    "START_BALANCE",
    "Pgbench",
    "account_id",
    "machine",
    "one_line",
    "process_tree_cpu",
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


def run_pgbench(
    url: str, script: str, clients: int, transactions_per_client: int, search_path: str, *, seconds: float = 0
) -> Pgbench:
    """Runs a custom script with the prepared protocol (as asyncpg uses), no vacuum: the given
    transactions per client, or for the given seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as file:
        file.write(script)
    try:
        env = {**os.environ, "PGOPTIONS": f"-c search_path={search_path}"}
        threads = min(clients, os.cpu_count() or 1)
        cmd = [pgbench_binary(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads)]
        cmd += ["-T", str(max(1, round(seconds)))] if seconds else ["-t", str(transactions_per_client)]
        cmd += ["-f", file.name, url]
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    finally:
        os.unlink(file.name)
    latency = re.search(r"latency average = ([0-9.]+) ms", done.stdout)
    tps = re.search(r"tps = ([0-9.]+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: ([0-9]+)", done.stdout)
    if done.returncode != 0 or latency is None or tps is None or processed is None:
        raise SystemExit(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
    return Pgbench(int(processed.group(1)), float(latency.group(1)), float(tps.group(1)), wall)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user and system) a process and its live descendants have used (Linux /proc;
    0 elsewhere): a service's cost per call that survives a machine shared with other work."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children")).split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_tree_cpu(int(child)) for child in children)


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
