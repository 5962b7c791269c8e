"""What a served call leaves in the log, and the request id it answers with."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blumpo.token.v1 import token_pb2 as tpb
from blumpo_common import logs
from tests import support
from tests.support import TokenStub

RFC3339_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The JSON lines the services write, at every level, for the test's duration."""
    stream = io.StringIO()
    handler = logs.handler("token_service", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def calls(stream: io.StringIO, method: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [r for r in records if r["message"] == "call" and r.get("method") == method]


async def request_id_of(call: Any) -> str:
    metadata = await call.initial_metadata()
    assert metadata is not None
    [value] = [v for k, v in metadata if k == "x-request-id"]
    return str(value)


async def test_times_are_rfc3339_utc_to_the_millisecond(token: TokenStub, log_lines: io.StringIO) -> None:
    before = datetime.now(UTC)
    await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))
    [line] = calls(log_lines, "/blumpo.token.v1.TokenService/CreateUser")
    assert RFC3339_UTC_MS.match(line["time"]), line["time"]
    logged = datetime.fromisoformat(line["time"])
    assert before - timedelta(milliseconds=1) <= logged <= datetime.now(UTC)
    assert line["level"] == "INFO" and line["code"] == "OK" and "reason" not in line


async def test_health_checks_are_logged_at_debug(token_address: str, log_lines: io.StringIO) -> None:
    async with grpc.aio.insecure_channel(token_address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    [line] = calls(log_lines, "/grpc.health.v1.Health/Check")
    assert line["level"] == "DEBUG"


async def test_a_failed_call_is_logged_with_its_code_reason_and_request_id(
    token: TokenStub, log_lines: io.StringIO
) -> None:
    call = token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=str(uuid.uuid4())))
    error = await support.expect_error(call, grpc.StatusCode.NOT_FOUND)
    [line] = calls(log_lines, "/blumpo.token.v1.TokenService/GetTokenBalance")
    assert line["code"] == "NOT_FOUND"
    assert line["reason"] == support.error_info(error).reason != ""
    assert line["request_id"] == await request_id_of(call)


async def test_the_request_id_is_echoed_in_the_initial_metadata(token: TokenStub, log_lines: io.StringIO) -> None:
    mine = f"req-{uuid.uuid4()}"
    call = token.CreateUser(tpb.CreateUserRequest(email=support.new_email()), metadata=(("x-request-id", mine),))
    await call
    assert await request_id_of(call) == mine

    made_up = token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))
    await made_up
    echoed = await request_id_of(made_up)
    uuid.UUID(echoed)  # one the server made up
    logged = [line["request_id"] for line in calls(log_lines, "/blumpo.token.v1.TokenService/CreateUser")]
    assert logged == [mine, echoed]

    # A refused call answers with its id too, so the caller can quote it.
    refused = token.CreateUser(tpb.CreateUserRequest(email="not an email"), metadata=(("x-request-id", mine),))
    await support.expect_error(refused, grpc.StatusCode.INVALID_ARGUMENT)
    assert await request_id_of(refused) == mine
