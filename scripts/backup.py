"""Backups of the database with pg_dump's custom format, and their restore into a fresh one.

    python -m scripts.backup dump                  # DATABASE_URL -> $BACKUP_DIR/blumpo-<UTC time>.dump
    python -m scripts.backup restore FILE          # FILE -> TARGET_DATABASE_URL (default DATABASE_URL)

A dump holds the whole database: the schemas token and generation (tables, rows, sequences,
functions, grants to the service roles) and dbmate's public.schema_migrations, so a restored
database knows which migrations it has. It holds no role: roles belong to the cluster. A
restore therefore first makes sure the service roles exist as the migrations leave them (LOGIN,
their schema on their search_path; no password, which stays the deployment's), then restores
with --no-owner: every object is owned by the login that restores, which should be the
migrations' owner, as the ledger functions run with their owner's rights. The grants are kept.
The target must be new or empty: a restore never writes over a database that has data.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from scripts.postgres_tools import tool

# The login roles the migrations create, and the schema each has on its search_path.
SERVICE_ROLES = {"token_service": "token", "generation_service": "generation"}


def dump(url: str, folder: Path) -> Path:
    """A new custom-format dump of url's database in folder, named by the time it was taken."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"blumpo-{stamp}.dump"
    subprocess.run([tool("pg_dump"), "--format=custom", f"--file={path}", f"--dbname={url}"], check=True)
    return path


def maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


async def prepare_target(url: str) -> None:
    """Creates the database if missing (refuses one with tables), and the missing service roles."""
    name = urlsplit(url).path.lstrip("/")
    server = await asyncpg.connect(maintenance_url(url))
    try:
        if not await server.fetchval("SELECT true FROM pg_database WHERE datname = $1", name):
            await server.execute(await server.fetchval("SELECT format('CREATE DATABASE %I', $1::text)", name))
        for role, schema in SERVICE_ROLES.items():
            if not await server.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role):
                for statement in ("CREATE ROLE %I LOGIN", "ALTER ROLE %I SET search_path = %I"):
                    await server.execute(
                        await server.fetchval("SELECT format($1, $2::text, $3::text)", statement, role, schema)
                    )
    finally:
        await server.close()
    target = await asyncpg.connect(url)
    try:
        tables = await target.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
    finally:
        await target.close()
    if tables:
        raise RefusedTarget(f"database {name!r} already has {tables} tables: restore into a new or empty database")


class RefusedTarget(Exception):
    pass


def restore(path: Path, url: str) -> None:
    asyncio.run(prepare_target(url))
    subprocess.run(
        [tool("pg_restore"), "--no-owner", "--exit-on-error", "--single-transaction", f"--dbname={url}", str(path)],
        check=True,
    )


def main(argv: list[str]) -> int:
    source = os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL") or ""
    try:
        if argv == ["dump"] and source:
            path = dump(source, Path(os.environ.get("BACKUP_DIR") or "backups"))
            print(f"backup written to {path}")
            return 0
        if len(argv) == 2 and argv[0] == "restore":
            target = os.environ.get("TARGET_DATABASE_URL") or source
            if not target:
                print("backup: set TARGET_DATABASE_URL (or DATABASE_URL)", file=sys.stderr)
                return 2
            if not Path(argv[1]).is_file():
                print(f"backup: no backup file {argv[1]!r}", file=sys.stderr)
                return 2
            restore(Path(argv[1]), target)
            print(f"restored {argv[1]} into database {urlsplit(target).path.lstrip('/')!r}")
            return 0
    except RefusedTarget as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"backup: {Path(str(exc.cmd[0])).name} failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    print("usage: DATABASE_URL=... python -m scripts.backup dump | restore FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
