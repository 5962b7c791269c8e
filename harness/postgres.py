"""A private, throwaway PostgreSQL server, for tests that restart or stop the database itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def _binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise RuntimeError("no PostgreSQL server binaries (pg_ctl) found")
    return Path(pg_ctl).parent


class PrivateServer:
    """initdb in a folder of its own, served on one port of 127.0.0.1 with trust auth.
    PostgreSQL refuses to run as root: as root, it runs as the postgres user."""

    def __init__(self, port: int) -> None:
        # Under /tmp, not a test's tmp_path: the postgres user must be able to reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="blumpo-pg-"))
        self.data = self.directory / "data"
        self.port = port
        self.bin = _binaries()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args)

    def init(self) -> None:
        if self.as_user:
            shutil.chown(self.directory, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-l", str(self.directory / "server.log"), "-o", options, "start")

    def restart(self) -> None:
        """A fast shutdown (every session cut) and a start, as `pg_ctlcluster ... restart` does."""
        self._pg_ctl("-l", str(self.directory / "server.log"), "-m", "fast", "restart")

    def stop(self) -> None:
        """Stops the server and removes its files."""
        self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)
