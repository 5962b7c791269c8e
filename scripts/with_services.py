"""Runs a command while both services serve, telling it where (TOKEN_SERVICE_ADDR,
GENERATION_SERVICE_ADDR): the ones already running where TOKEN_LISTEN_ADDR and
GENERATION_LISTEN_ADDR put them (`make run`), else a pair started for the command on free
loopback ports and stopped after it. Such a pair writes no pid file and takes no fixed port,
so it never meets another run's services or pid files. Expects DATABASE_URL migrated.

    python -m scripts.with_services COMMAND [ARG...]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blumpo_common.config import ConfigError
from harness.processes import free_port
from scripts import services

LOG = Path(".data/with-services.log")
STOP_SECONDS = 15


@contextmanager
def temporary_pair(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Both services as child processes on free ports, metrics on ports the system picks."""
    token, generation = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    own = env | {
        "TOKEN_LISTEN_ADDR": token,
        "TOKEN_METRICS_ADDR": "127.0.0.1:0",
        "GENERATION_LISTEN_ADDR": generation,
        "GENERATION_METRICS_ADDR": "127.0.0.1:0",
        "TOKEN_SERVICE_TARGET": token,
    }
    LOG.parent.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []
    with LOG.open("ab") as log:
        try:
            for module in ("token_service", "generation_service"):
                started.append(subprocess.Popen([sys.executable, "-m", module], env=own, stdout=log, stderr=log))
            if not asyncio.run(services.wait_serving([token, generation])):
                raise RuntimeError(f"the services started for the command did not serve; see {LOG}")
            yield token, generation
        finally:
            for process in started:
                process.terminate()
            for process in started:
                try:
                    process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()


def main(command: list[str]) -> int:
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    env = dict(os.environ)
    try:
        found = services.configured(env)
    except ConfigError as exc:
        print(f"with_services: {exc}", file=sys.stderr)
        return 2
    token, generation = services.dialable(found.token), services.dialable(found.generation)
    if asyncio.run(services.wait_serving([token, generation], seconds=0)):
        print(f"using the services serving at {token} and {generation}", file=sys.stderr)
        return subprocess.call(command, env=env | {"TOKEN_SERVICE_ADDR": token, "GENERATION_SERVICE_ADDR": generation})
    try:
        with temporary_pair(env) as (token, generation):
            print(f"started both services for the while, at {token} and {generation}", file=sys.stderr)
            return subprocess.call(
                command, env=env | {"TOKEN_SERVICE_ADDR": token, "GENERATION_SERVICE_ADDR": generation}
            )
    except RuntimeError as exc:
        print(f"with_services: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
