"""The dbmate migrations: up, all the way down, up again, and db/schema.sql kept current."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from harness import ROOT, databases

MIGRATIONS = sorted(p.name for p in (ROOT / "db/migrations").glob("*.sql"))


def make(target: str, url: str) -> str:
    env = os.environ | {"DATABASE_URL": url}
    done = subprocess.run(
        ["make", "--no-print-directory", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def applied(url: str) -> list[str]:
    status = make("migrate-status", url)
    return [line.split()[-1] for line in status.splitlines() if line.startswith("[X]")]


@pytest.fixture
def empty_database(database_url: str) -> Iterator[str]:
    url = databases.scratch_database_url(database_url, "migrations")
    yield url
    databases.drop_database(url)


def test_migrate_rollback_all_the_way_and_migrate_again(empty_database: str) -> None:
    make("migrate", empty_database)  # creates the database too
    assert applied(empty_database) == MIGRATIONS
    for remaining in range(len(MIGRATIONS) - 1, -1, -1):
        make("rollback", empty_database)
        assert applied(empty_database) == MIGRATIONS[:remaining]
    make("migrate", empty_database)
    assert applied(empty_database) == MIGRATIONS


def test_schema_file_matches_the_migrations(database_url: str, tmp_path: Path) -> None:
    dumped = tmp_path / "schema.sql"
    subprocess.run(
        [str(databases.DBMATE), "--url", database_url, "--schema-file", str(dumped), "dump"],
        check=True,
        capture_output=True,
    )
    committed = (ROOT / "db/schema.sql").read_text()
    assert dumped.read_text() == committed, "db/schema.sql is stale: run `make schema`"


WORKERS_MIGRATION = "20261127200001_workers_priority_pricing.sql"


async def test_running_jobs_without_a_fenced_lease_are_left_to_the_sweep(empty_database: str, tmp_path: Path) -> None:
    """Jobs moved to RUNNING by hand (no lease) or claimed before leases were fenced (no lease id)
    get a lease that has run out, so the next sweep takes them, and nothing is stuck RUNNING."""
    before = tmp_path / "migrations"
    before.mkdir()
    for name in MIGRATIONS[: MIGRATIONS.index(WORKERS_MIGRATION)]:
        (before / name).write_text((ROOT / "db/migrations" / name).read_text())
    up_to_before = [str(databases.DBMATE), "--url", empty_database, "--migrations-dir", str(before)]
    await asyncio.to_thread(subprocess.run, [*up_to_before, "--no-dump-schema", "up"], check=True, capture_output=True)
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(
            "INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest,"
            " worker_id, lease_expires_at) VALUES"
            " (gen_random_uuid(), gen_random_uuid(), 'by hand', '{}', 1, 'RUNNING', '\\x00', NULL, NULL),"
            " (gen_random_uuid(), gen_random_uuid(), 'claimed', '{}', 1, 'RUNNING', '\\x00', 'gpu-1',"
            "  now() + interval '1 hour')"
        )
        await asyncio.to_thread(make, "migrate", empty_database)
        ran_out = await conn.fetchval(
            "SELECT count(*) FROM generation.generation_job"
            " WHERE status = 'RUNNING' AND lease_expires_at <= now() AND lease_id IS NULL"
        )
        assert ran_out == 2
        # The owners' running counts start from their jobs.
        assert await conn.fetchval("SELECT sum(running) FROM generation.job_owner") == 2
    finally:
        await conn.close()
