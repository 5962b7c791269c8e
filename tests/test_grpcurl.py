"""The token service through a real grpcurl, with no proto files: reflection only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub

GRPCURL = Path(sys.executable).with_name("grpcurl")


async def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=60
    )


async def test_lists_services_through_reflection(token_address: str) -> None:
    done = await grpcurl(token_address, "list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "blumpo.token.v1.TokenService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


async def test_append_ledger_entry_call(token: TokenStub, token_address: str) -> None:
    user_id = await support.user_with_balance(token, 100)
    request: dict[str, Any] = {
        "user_id": user_id,
        "delta": -25,
        "reason": "LEDGER_REASON_GENERATION",
        "reference_id": "grpcurl-job-1",
    }
    done = await grpcurl("-d", json.dumps(request), token_address, "blumpo.token.v1.TokenService/AppendLedgerEntry")
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)["entry"]
    assert (entry["delta"], entry["balance_after"], entry["reason"]) == ("-25", "75", "LEDGER_REASON_GENERATION")
    assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance == 75


async def test_error_details_reach_grpcurl(token_address: str) -> None:
    done = await grpcurl("-d", '{"user_id": "nope"}', token_address, "blumpo.token.v1.TokenService/GetTokenBalance")
    assert done.returncode != 0
    assert "Code: InvalidArgument" in done.stderr
    assert '"reason":"INVALID_ARGUMENT"' in done.stderr
    assert '"field":"user_id"' in done.stderr
