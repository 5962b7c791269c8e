"""Scratch databases on the server of DATABASE_URL, built by the real dbmate migrations."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from harness import ROOT

DBMATE = Path(sys.executable).with_name("dbmate")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def scratch_database_url(base: str, label: str) -> str:
    """The URL of a database that does not exist yet, on the server of base."""
    return with_database(base, f"blumpo_{label}_{os.getpid()}_{uuid.uuid4().hex[:8]}")


def dbmate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DBMATE), "--url", url, "--migrations-dir", str(ROOT / "db/migrations"), "--no-dump-schema", *args],
        check=True,
        capture_output=True,
        text=True,
    )


def drop_database(url: str) -> None:
    dbmate(url, "drop")
