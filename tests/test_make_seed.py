"""`make seed` finds the services where their *_LISTEN_ADDR settings put them, and leaves the pid
files of a running `make run` alone, so `make stop` still stops that run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from harness import ROOT, databases
from harness.processes import free_port
from scripts import seed

pytestmark = pytest.mark.slow
SERVICES = ("token_service", "generation_service")


@pytest.fixture
def scratch_url() -> Iterator[str]:
    """A database that `make` creates and migrates itself."""
    base = os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL") or ""
    url = databases.scratch_database_url(base, "make_seed")
    yield url
    databases.drop_database(url)


def addresses() -> dict[str, str]:
    """Every address of both services on a free, non-default loopback port."""
    return {
        name: f"127.0.0.1:{free_port()}"
        for name in ("TOKEN_LISTEN_ADDR", "TOKEN_METRICS_ADDR", "GENERATION_LISTEN_ADDR", "GENERATION_METRICS_ADDR")
    }


def make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


async def seeded_emails(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT email FROM token.app_user ORDER BY email")
    finally:
        await conn.close()
    return [r["email"] for r in rows]


def wait_for(log: Path, text: str, process: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def test_seed_uses_a_running_make_run_at_its_addresses_and_keeps_its_pid_files(
    scratch_url: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = os.environ | addresses() | {"DATABASE_URL": scratch_url, "BLUMPO_RUN_DIR": str(run_dir)}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        running = subprocess.Popen(
            ["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_for(log, "serving: ", running)
        banner = next(line for line in log.read_text().splitlines() if line.startswith("serving: "))
        for name in ("TOKEN_LISTEN_ADDR", "TOKEN_METRICS_ADDR", "GENERATION_LISTEN_ADDR", "GENERATION_METRICS_ADDR"):
            assert env[name] in banner
        pids = {service: (run_dir / f"{service}.pid").read_text() for service in SERVICES}

        seeded = make("seed", env)
        assert seeded.returncode == 0, seeded.stdout + seeded.stderr
        assert f"using the services serving at {env['TOKEN_LISTEN_ADDR']}" in seeded.stderr
        assert asyncio.run(seeded_emails(scratch_url)) == sorted([seed.FREE_EMAIL, seed.TEST_EMAIL])
        assert {service: (run_dir / f"{service}.pid").read_text() for service in SERVICES} == pids

        again = subprocess.run(
            ["scripts/run-services"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )  # a second run refuses, and leaves the first one's pid files
        assert again.returncode == 1 and "running already" in again.stderr, again.stderr
        assert {service: (run_dir / f"{service}.pid").read_text() for service in SERVICES} == pids

        # What `make stop` does with them (it also stops a private PostgreSQL, which is not the test's).
        for pid in pids.values():
            os.kill(int(pid), signal.SIGTERM)
        running.wait(30)
        assert not any(run_dir.glob("*.pid"))
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGTERM)
            running.wait(30)


def test_seed_starts_a_pair_of_its_own_when_none_serves_and_touches_no_pid_file(
    scratch_url: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sentinel = run_dir / "token_service.pid"
    sentinel.write_text("999999\n")
    env = os.environ | addresses() | {"DATABASE_URL": scratch_url, "BLUMPO_RUN_DIR": str(run_dir)}

    seeded = make("seed", env)
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    assert "started both services for the while" in seeded.stderr
    assert asyncio.run(seeded_emails(scratch_url)) == sorted([seed.FREE_EMAIL, seed.TEST_EMAIL])
    assert sentinel.read_text() == "999999\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["token_service.pid"]
