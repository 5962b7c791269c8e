"""`make backup` and `make restore`: a populated database (users, ledger, jobs, assets) dumped and
restored into a fresh database, on the same server and on a new cluster that lacks the service
roles, holds the same rows, sequences and migrations, and every balance is the sum of its ledger."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from blumpo_common.config import login_url
from harness import ROOT, databases
from harness.cluster import PrivateCluster
from scripts import seed

pytestmark = pytest.mark.slow

SCHEMAS = ("token", "generation", "public")
# A balance that is not the sum of its user's ledger.
MISMATCHES = """
SELECT count(*) FROM token.token_account a
WHERE a.balance <> (SELECT coalesce(sum(l.delta), 0) FROM token.token_ledger l WHERE l.user_id = a.user_id)
"""


def make(target: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target, *(f"{k}={v}" for k, v in env.items() if k.isupper())],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def contents(url: str) -> dict[str, list[str]]:
    """Every row of every table of the three schemas, and every sequence's position."""
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables"
            " WHERE schemaname = ANY($1) ORDER BY 1",
            list(SCHEMAS),
        )
        found = {
            t["name"]: [r[0] for r in await conn.fetch(f"SELECT t::text FROM {t['name']} t ORDER BY 1")] for t in tables
        }
        sequences = await conn.fetch(
            "SELECT format('%I.%I', schemaname, sequencename) AS name, last_value FROM pg_sequences "
            "WHERE schemaname = ANY($1) ORDER BY 1",
            list(SCHEMAS),
        )
        found["sequences"] = [f"{s['name']}={s['last_value']}" for s in sequences]
        found["mismatches"] = [str(await conn.fetchval(MISMATCHES))]
    finally:
        await conn.close()
    return found


async def service_reads(url: str) -> int:
    """Accounts the token service's own login sees through its search_path and grants."""
    conn = await asyncpg.connect(login_url(url, "token_service"))
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM token_account")
    finally:
        await conn.close()
    return count


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    """A new cluster: no service roles until a restore makes them."""
    made = PrivateCluster()
    made.start()
    yield made
    made.destroy()


@pytest.fixture
def scratch_url(database_url: str) -> Iterator[str]:
    url = databases.scratch_database_url(database_url, "restored")
    yield url
    asyncio.run(databases.drop(url))


async def test_a_backup_restores_into_a_fresh_database_with_the_same_rows(
    token_address: str,
    generation_address: str,
    database_url: str,
    scratch_url: str,
    cluster: PrivateCluster,
    tmp_path: Path,
) -> None:
    await seed.seed(token_address, generation_address)
    original = await contents(database_url)
    assert len(original["token.token_ledger"]) >= 10 and len(original["generation.asset_image_variant"]) == 5
    assert len(original["public.schema_migrations"]) == len(list((ROOT / "db/migrations").glob("*.sql")))
    assert original["mismatches"] == ["0"]

    backed_up = await asyncio.to_thread(make, "backup", DATABASE_URL=database_url, BACKUP_DIR=str(tmp_path))
    assert backed_up.returncode == 0, backed_up.stderr
    dump = backed_up.stdout.strip().splitlines()[-1].removeprefix("backup written to ")
    assert Path(dump).parent == tmp_path

    restored = await asyncio.to_thread(make, "restore", FILE=dump, TARGET_DATABASE_URL=scratch_url)
    assert restored.returncode == 0, restored.stderr
    assert await contents(scratch_url) == original
    assert await service_reads(scratch_url) == 2

    # Never over a database that has data.
    again = await asyncio.to_thread(make, "restore", FILE=dump, TARGET_DATABASE_URL=scratch_url)
    assert again.returncode != 0 and "already has" in again.stderr, again.stderr

    # A new cluster: the restore creates the service roles the migrations would have.
    elsewhere = cluster.url("blumpo")
    moved = await asyncio.to_thread(make, "restore", FILE=dump, TARGET_DATABASE_URL=elsewhere)
    assert moved.returncode == 0, moved.stderr
    assert await contents(elsewhere) == original
    assert await service_reads(elsewhere) == 2
