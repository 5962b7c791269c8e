"""Scratch databases on the server of DATABASE_URL: built by the real dbmate migrations, or
cloned from such a database used as a template (a clone takes a fraction of a migration)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from harness import ROOT
from scripts import development_logins

DBMATE = Path(sys.executable).with_name("dbmate")
# PostgreSQL cuts identifiers at 63 bytes; the label gets what the prefix and suffix leave.
MAX_LABEL = 30


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def scratch_database_url(base: str, label: str) -> str:
    """The URL of a database that does not exist yet, on the server of base."""
    return with_database(base, f"blumpo_{label[:MAX_LABEL]}_{os.getpid()}_{uuid.uuid4().hex[:8]}")


def dbmate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DBMATE), "--url", url, "--migrations-dir", str(ROOT / "db/migrations"), "--no-dump-schema", *args],
        check=True,
        capture_output=True,
        text=True,
    )


def drop_database(url: str) -> None:
    dbmate(url, "drop")


async def _on_server(url: str, statement: str) -> None:
    """Runs a statement from the server's maintenance database, never from the one it names."""
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def create_template(base: str, setup: str = "") -> str:
    """A migrated database that nothing may connect to: CREATE DATABASE ... TEMPLATE refuses
    a template with a session open on it. setup: SQL run on it after the migrations."""
    url = scratch_database_url(base, "template")
    await asyncio.to_thread(dbmate, url, "up")
    await development_logins.set_passwords(url)
    if setup:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(setup)
        finally:
            await conn.close()
    await _on_server(url, f'ALTER DATABASE "{database_name(url)}" WITH ALLOW_CONNECTIONS false')
    return url


async def clone(template: str, label: str) -> str:
    """A new database with the template's schema and rows."""
    url = scratch_database_url(template, label)
    await _on_server(url, f'CREATE DATABASE "{database_name(url)}" TEMPLATE "{database_name(template)}"')
    return url


async def drop(url: str) -> None:
    """Drops a database even if a killed service's session has not gone yet."""
    await _on_server(url, f'DROP DATABASE IF EXISTS "{database_name(url)}" WITH (FORCE)')


class Clones:
    """Clones of a template, each made while the tests given the one before it run, and dropped
    while the next ones run: neither CREATE nor DROP DATABASE holds up the tests. Both run in a
    thread, so they go on while a synchronous test holds the event loop."""

    def __init__(self, template: str, label: str) -> None:
        self.template = template
        self.label = label
        self.spare: asyncio.Future[str] | None = None
        self.dropping: list[asyncio.Future[None]] = []

    def _start(self) -> asyncio.Future[str]:
        return asyncio.get_running_loop().run_in_executor(None, asyncio.run, clone(self.template, self.label))

    async def take(self) -> str:
        taken = self.spare or self._start()
        self.spare = self._start()
        return await taken

    def release(self, url: str) -> None:
        self.dropping.append(asyncio.get_running_loop().run_in_executor(None, asyncio.run, drop(url)))

    async def close(self) -> None:
        """Drops the clone no one took, and waits for every drop."""
        if self.spare is not None:
            self.release(await self.spare)
            self.spare = None
        await asyncio.gather(*self.dropping)
        self.dropping.clear()
