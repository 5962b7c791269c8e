"""The services as processes: no start outside development without mutual TLS and a policy,
and certificates rotated by SIGHUP while a call is in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from harness import ROOT
from harness.processes import PROMPT_RECONNECT, READY_SECONDS, ServiceProcess, free_port
from tests import support
from tests.certificates import POLICY, Authority, Identity

PRODUCTION = {
    "TOKEN_DATABASE_URL": "postgresql://token_service@127.0.0.1:5432/blumpo",
    "GENERATION_DATABASE_URL": "postgresql://generation_service@127.0.0.1:5432/blumpo",
    "PAGE_TOKEN_SECRET": "p" * 32,
    "OTP_SECRET": "o" * 32,
    "OTP_SMTP_HOST": "smtp.example.com",
    "OTP_SMTP_FROM": "login@blumpo.example",
}


def start_up(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BLUMPO_ENV", "TLS_", "AUTHZ_", "OTP_"))}
    return subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


# BLUMPO_ENV unset or production: each service is tried with one of them.
@pytest.mark.parametrize(("module", "env_name"), [("token_service", ""), ("generation_service", "production")])
def test_outside_development_no_start_without_tls_or_policy(module: str, env_name: str, tmp_path: Path) -> None:
    server = Authority(tmp_path).server("token").settings()
    cases = [
        ({}, "TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE are not set"),
        ({"TLS_CERT_FILE": server["TLS_CERT_FILE"]}, "TLS_KEY_FILE, TLS_CA_FILE not set"),
        ({**server, "TLS_KEY_FILE": str(tmp_path / "missing.pem")}, "TLS_KEY_FILE"),
        (server, "AUTHZ_POLICY_FILE is not set"),
    ]
    for settings, complaint in cases:
        done = start_up(module, {**PRODUCTION, "BLUMPO_ENV": env_name, "AUTHZ_POLICY_FILE": "", **settings})
        assert done.returncode == 2, done.stderr
        [line] = (done.stdout + done.stderr).strip().splitlines()
        assert complaint in line


def test_a_policy_naming_an_unknown_method_stops_start_up(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[callers.web]\nmethods = ["blumpo.token.v1.TokenService/GiveTokens"]\n')
    server = Authority(tmp_path).server("token").settings()
    done = start_up("token_service", {**PRODUCTION, **server, "AUTHZ_POLICY_FILE": str(policy)})
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "callers.web.methods names no method" in line and "GiveTokens" in line


def channel(address: str, trusted: Authority, client: Identity) -> grpc.aio.Channel:
    """A channel of its own (no connection shared with another channel)."""
    credentials = grpc.ssl_channel_credentials(
        trusted.bundle.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    options = (*PROMPT_RECONNECT, ("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.secure_channel(address, credentials, options=options)


async def answers(address: str, trusted: Authority, client: Identity) -> bool:
    """Whether a new connection that trusts only `trusted` gets an answer."""
    async with channel(address, trusted, client) as ch:
        try:
            await token_pb2_grpc.TokenServiceStub(ch).GetTokenBalance(
                tpb.GetTokenBalanceRequest(user_id=str(uuid.uuid4())), timeout=3
            )
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
    return True


async def wait_serving(service: ServiceProcess, trusted: Authority, client: Identity) -> None:
    deadline = asyncio.get_running_loop().time() + READY_SECONDS
    while not await answers(service.address, trusted, client):
        assert service.process is not None and service.process.poll() is None, service.logs()
        assert asyncio.get_running_loop().time() < deadline, service.logs()
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_sighup_rotates_the_certificates_while_a_call_is_in_flight(
    database_url: str, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    old, new = Authority(tmp_path, "old"), Authority(tmp_path, "new")
    served = old.server("token")
    live = tmp_path / "live"
    live.mkdir()
    cert, key, bundle = live / "server.pem", live / "server.key", live / "ca.pem"
    cert.write_bytes(served.cert.read_bytes())
    key.write_bytes(served.key.read_bytes())
    bundle.write_bytes(old.bundle.read_bytes())
    env = {
        "DATABASE_URL": database_url,
        "TOKEN_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "TLS_CERT_FILE": str(cert),
        "TLS_KEY_FILE": str(key),
        "TLS_CA_FILE": str(bundle),
        "AUTHZ_POLICY_FILE": str(POLICY),
        # Worker processes: the SIGHUP the supervisor gets is passed on, and each re-reads its files.
        "WORKERS": "2",
    }
    service = ServiceProcess("token_service", env, int(env["TOKEN_LISTEN_ADDR"].rpartition(":")[2]), tmp_path / "log")
    service.spawn()
    try:
        admin_of_old = old.issue("admin")
        await wait_serving(service, old, admin_of_old)
        async with channel(service.address, old, admin_of_old) as held:
            stub = token_pb2_grpc.TokenServiceStub(held)
            user_id = await support.user_with_balance(stub, 100)
            # A call held in flight: the account is locked until the rotation is done.
            async with admin.transaction():
                await admin.execute(
                    "SELECT 1 FROM token.token_account WHERE user_id = $1 FOR UPDATE", uuid.UUID(user_id)
                )
                in_flight = asyncio.ensure_future(
                    stub.AppendLedgerEntry(
                        tpb.AppendLedgerEntryRequest(
                            user_id=user_id, delta=5, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="during-rotation"
                        ),
                        timeout=30,
                    )
                )
                await asyncio.sleep(0.5)
                assert not in_flight.done()

                assert not await answers(service.address, new, new.issue("admin"))
                # The new server certificate comes from the new CA; callers of both are accepted.
                rotated = new.server("token")
                cert.write_bytes(rotated.cert.read_bytes())
                key.write_bytes(rotated.key.read_bytes())
                bundle.write_bytes(old.bundle.read_bytes() + new.bundle.read_bytes())
                assert service.process is not None
                service.process.send_signal(signal.SIGHUP)
                for _ in range(50):
                    if await answers(service.address, new, new.issue("admin")):
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail(f"new connections never saw the new certificate\n{service.logs()}")
                # Whoever trusts only the old CA no longer accepts the server; callers with
                # certificates of the old CA are still accepted.
                assert not await answers(service.address, old, admin_of_old)
                assert await answers(service.address, new, admin_of_old)
                assert not in_flight.done()
            # The lock is gone: the call that was in flight through the rotation completes.
            answer = await in_flight
            assert answer.entry.balance_after == 105 and answer.entry.created_by == "admin"

        # Unreadable files on a later SIGHUP keep the certificates in use.
        cert.write_text("not a certificate")
        service.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert await answers(service.address, new, new.issue("admin"))
        assert "certificates not reloaded" in service.logs()
    finally:
        service.stop()


def ignores_sighup(pid: int) -> bool:
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


@pytest.mark.slow
async def test_sighup_while_starting_does_not_end_the_service(database_url: str, tmp_path: Path) -> None:
    """A rotation that lands while the supervisor or a worker is still starting is ignored until
    the handler is in place (the files are read at start anyway), instead of ending the service."""
    authority = Authority(tmp_path, "ca")
    served = authority.server("token")
    env = {
        "DATABASE_URL": database_url,
        "TOKEN_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "TLS_CERT_FILE": str(served.cert),
        "TLS_KEY_FILE": str(served.key),
        "TLS_CA_FILE": str(authority.bundle),
        "AUTHZ_POLICY_FILE": str(POLICY),
        "WORKERS": "2",
    }
    service = ServiceProcess("token_service", env, int(env["TOKEN_LISTEN_ADDR"].rpartition(":")[2]), tmp_path / "log")
    service.spawn()
    try:
        assert service.process is not None
        client = authority.issue("admin")
        deadline = asyncio.get_running_loop().time() + READY_SECONDS
        # From the service's first act on (SIGHUP ignored), through loading, workers and serving.
        while not ignores_sighup(service.process.pid):
            assert service.process.poll() is None and asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        while not await answers(service.address, authority, client):
            assert asyncio.get_running_loop().time() < deadline, service.logs()
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.05)
        assert service.process.poll() is None, service.logs()
        assert service.stop() == 0
    finally:
        service.stop()
