"""Services run as real processes, to stop, kill and restart them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ROOT

READY_SECONDS = 20.0
# A channel that found nothing listening waits about a second before it dials again; one that
# polls a process coming up should dial again at once, so the test goes on as soon as it serves.
PROMPT_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """`python -m <module>` with the given environment, logging to a file."""

    def __init__(self, module: str, env: dict[str, str], port: int, log_path: Path) -> None:
        self.module = module
        # Development mode: OTP codes go to the log, no SMTP server or secret needed.
        self.env = {**os.environ, "BLUMPO_ENV": "development", **env}
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=ROOT, env=self.env, stderr=log, stdout=log
            )

    async def start(self) -> None:
        self.spawn()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Waits (bounded) until the health service answers SERVING."""
        deadline = asyncio.get_running_loop().time() + READY_SECONDS
        async with grpc.aio.insecure_channel(self.address, options=PROMPT_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process is not None and self.process.poll() is None, self.logs()
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{self.module} not ready in {READY_SECONDS}s\n{self.logs()}")
                await asyncio.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Sends sig and waits (bounded) for the exit; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=15)
        self.process = None
        return code

    def stop(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            return self.kill(signal.SIGTERM)
        return None

    def logs(self) -> str:
        return self.log_path.read_text()[-5000:] if self.log_path.exists() else ""


def service_pair(env: dict[str, str], work_dir: Path) -> tuple[ServiceProcess, ServiceProcess]:
    """A token service and a generation service that calls it, on free loopback ports, both with
    env; not started. Logs go to work_dir."""
    token_port, generation_port = free_port(), free_port()
    token = ServiceProcess(
        "token_service",
        env | {"TOKEN_LISTEN_ADDR": f"127.0.0.1:{token_port}", "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}"},
        token_port,
        work_dir / "token.log",
    )
    generation = ServiceProcess(
        "generation_service",
        env
        | {
            "GENERATION_LISTEN_ADDR": f"127.0.0.1:{generation_port}",
            "GENERATION_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            "TOKEN_SERVICE_TARGET": token.address,
        },
        generation_port,
        work_dir / "generation.log",
    )
    return token, generation
