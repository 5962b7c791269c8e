"""The dbmate migrations: up, all the way down, up again, and db/schema.sql kept current."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
