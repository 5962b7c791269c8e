"""The dbmate migrations: each up, each down back to exactly what was before it, all up again,
and db/schema.sql kept current."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from harness import ROOT, databases
from scripts.postgres_tools import tool

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


# Lines of a dump that differ between two dumps of the same objects (versions, a random key).
VARYING = ("-- Dumped", "\\restrict", "\\unrestrict")


def objects(url: str) -> str:
    """Every object of the database (tables, columns, indexes, constraints, functions, types,
    sequences, grants, comments) as pg_dump writes it; dbmate's own table left out."""
    done = subprocess.run(
        [tool("pg_dump"), "--schema-only", "--exclude-table=public.schema_migrations", f"--dbname={url}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return "\n".join(line for line in done.stdout.splitlines() if not line.startswith(VARYING))


def test_each_migration_up_then_each_down_leaves_what_was_before_then_up_again(
    empty_database: str, tmp_path: Path
) -> None:
    # Up one migration at a time (dbmate applies all it finds: a folder with the first k).
    before: list[str] = []
    for k, name in enumerate(MIGRATIONS, start=1):
        folder = tmp_path / f"first-{k}"
        folder.mkdir()
        for earlier in MIGRATIONS[:k]:
            shutil.copy(ROOT / "db/migrations" / earlier, folder / earlier)
        if k == 1:
            make("migrate", empty_database)  # creates the database; then back to nothing, to see it empty
            for _ in MIGRATIONS:
                make("rollback", empty_database)
            assert applied(empty_database) == []
        before.append(objects(empty_database))
        subprocess.run(
            [str(databases.DBMATE), "--url", empty_database, "--migrations-dir", str(folder), "--no-dump-schema", "up"],
            check=True,
            capture_output=True,
        )
        assert applied(empty_database) == MIGRATIONS[:k], name
    complete = objects(empty_database)
    for remaining in range(len(MIGRATIONS) - 1, -1, -1):
        make("rollback", empty_database)
        assert applied(empty_database) == MIGRATIONS[:remaining]
        assert objects(empty_database) == before[remaining], f"the down of {MIGRATIONS[remaining]} left objects behind"
    make("migrate", empty_database)
    assert applied(empty_database) == MIGRATIONS
    assert objects(empty_database) == complete


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


def migrate_up_to(migration: str, url: str, scratch: Path) -> None:
    """Applies every migration before the named one (and not it), as a database of that time was."""
    before = scratch / "migrations"
    before.mkdir()
    for name in MIGRATIONS[: MIGRATIONS.index(migration)]:
        (before / name).write_text((ROOT / "db/migrations" / name).read_text())
    up_to_before = [str(databases.DBMATE), "--url", url, "--migrations-dir", str(before)]
    subprocess.run([*up_to_before, "--no-dump-schema", "up"], check=True, capture_output=True)


async def test_running_jobs_without_a_fenced_lease_are_left_to_the_sweep(empty_database: str, tmp_path: Path) -> None:
    """Jobs moved to RUNNING by hand (no lease) or claimed before leases were fenced (no lease id)
    get a lease that has run out, so the next sweep takes them, and nothing is stuck RUNNING."""
    await asyncio.to_thread(migrate_up_to, WORKERS_MIGRATION, empty_database, tmp_path)
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
