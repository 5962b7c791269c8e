"""A throwaway PostgreSQL server of a test's own, to restart under load without touching the
shared one: initdb under a temporary folder, with the programs scripts/postgres_tools.py finds."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from harness.processes import free_port
from scripts import postgres_tools

WAIT_SECONDS = 30


class PrivateCluster:
    """Its own data folder, port and socket; fsync off, as nothing in it outlives the test."""

    def __init__(self) -> None:
        self.bin = postgres_tools.server_bin()
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="blumpo-cluster-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        # PostgreSQL refuses to run as root: it runs as another account, which must own the folder.
        self.as_user = postgres_tools.run_as()
        account = postgres_tools.server_account()
        if account is not None:
            shutil.chown(self.folder, account)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS + 30,
        )

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data), "-w", "-t", str(WAIT_SECONDS), *args)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("start", "-l", str(self.log), "-o", options)

    def restart(self) -> None:
        """A fast restart: every session is cut, and connecting fails until the server is back."""
        # Its own log, as at start: a server writing to pg_ctl's output would keep it open.
        self._pg_ctl("restart", "-m", "fast", "-l", str(self.log))

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
