"""Where the services listen, as their settings say (TOKEN_LISTEN_ADDR, GENERATION_LISTEN_ADDR
and the metrics addresses, with the services' own defaults), and whether they answer there.

`python -m scripts.services banner` waits (bounded) until both answer and prints where they
serve; `make run` shows it. `python -m scripts.services token-target` prints where the
generation service finds the token service when TOKEN_SERVICE_TARGET is unset.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blumpo_common.config import ConfigError, address
from generation_service import config as generation_config
from token_service import config as token_config

READY_SECONDS = 30.0
# Listening on every interface: a client on this machine dials the loopback address.
WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}


@dataclass(frozen=True)
class Addresses:
    token: str
    token_metrics: str
    generation: str
    generation_metrics: str


def configured(env: Mapping[str, str]) -> Addresses:
    """The addresses the services take from env, as their config modules read them."""
    return Addresses(
        token=address(env, "TOKEN_LISTEN_ADDR", f"0.0.0.0:{token_config.PORT}"),
        token_metrics=address(env, "TOKEN_METRICS_ADDR", f"0.0.0.0:{token_config.METRICS_PORT}"),
        generation=address(env, "GENERATION_LISTEN_ADDR", f"0.0.0.0:{generation_config.PORT}"),
        generation_metrics=address(env, "GENERATION_METRICS_ADDR", f"0.0.0.0:{generation_config.METRICS_PORT}"),
    )


def dialable(listen: str) -> str:
    """The address a client on this machine dials to reach a server listening on `listen`."""
    host, _, port = listen.rpartition(":")
    return f"{WILDCARDS.get(host, host)}:{port}"


async def serving(target: str, timeout: float = 2.0) -> bool:
    """True when the health service at target answers SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_serving(targets: list[str], seconds: float = READY_SECONDS) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        answers = await asyncio.gather(*(serving(target, timeout=1.0) for target in targets))
        if all(answers):
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)


def banner(found: Addresses) -> str:
    return (
        f"serving: token service on {found.token} (metrics {found.token_metrics}), "
        f"generation service on {found.generation} (metrics {found.generation_metrics}); "
        "Ctrl-C or `make stop` stops them"
    )


def main(argv: list[str]) -> int:
    if argv not in (["banner"], ["token-target"]):
        print("usage: python -m scripts.services banner | token-target", file=sys.stderr)
        return 2
    try:
        found = configured(os.environ)
    except ConfigError as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 2
    if argv == ["token-target"]:
        print(dialable(found.token))
        return 0
    if asyncio.run(wait_serving([dialable(found.token), dialable(found.generation)])):
        print(banner(found), file=sys.stderr)
        return 0
    print(f"services: not serving after {READY_SECONDS:.0f} s; see the log above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
