"""Health is truthful: NOT_SERVING while the database answers but what the service needs of
its schema is missing (as after `make rollback`), SERVING again once it is back."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The probe runs every 2 s; a loaded machine may take several rounds.
WAIT_SECONDS = 30.0


async def wait_for_status(address: str, wanted: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
            if status == wanted:
                return
            assert loop.time() < deadline, f"health stayed {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            await asyncio.sleep(0.2)


async def check_health_follows_the_schema(
    address: str, admin: asyncpg.Connection, take_away: str, give_back: str
) -> None:
    await wait_for_status(address, SERVING)
    await admin.execute(take_away)
    try:
        await wait_for_status(address, NOT_SERVING)
    finally:
        await admin.execute(give_back)
    await wait_for_status(address, SERVING)


@pytest.mark.parametrize(
    ("take_away", "give_back"),
    [
        (
            "ALTER FUNCTION token.create_user(text, text, bigint, text) RENAME TO create_user_gone",
            "ALTER FUNCTION token.create_user_gone(text, text, bigint, text) RENAME TO create_user",
        ),
        (
            "ALTER FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint, text) RENAME TO gone",
            "ALTER FUNCTION token.gone(uuid[], bigint[], text[], text[], bigint, text) RENAME TO append_entries",
        ),
        ("ALTER SCHEMA token RENAME TO token_gone", "ALTER SCHEMA token_gone RENAME TO token"),
    ],
)
async def test_token_health_is_not_serving_while_its_schema_is_missing(
    token_address: str, admin: asyncpg.Connection, take_away: str, give_back: str
) -> None:
    await check_health_follows_the_schema(token_address, admin, take_away, give_back)


@pytest.mark.parametrize(
    ("take_away", "give_back"),
    [
        (
            "ALTER TABLE generation.generation_job RENAME COLUMN has_assets TO has_assets_gone",
            "ALTER TABLE generation.generation_job RENAME COLUMN has_assets_gone TO has_assets",
        ),
        (
            "ALTER TABLE generation.asset_image_variant RENAME TO gone",
            "ALTER TABLE generation.gone RENAME TO asset_image_variant",
        ),
    ],
)
async def test_generation_health_is_not_serving_while_its_schema_is_missing(
    generation_address: str, admin: asyncpg.Connection, take_away: str, give_back: str
) -> None:
    await check_health_follows_the_schema(generation_address, admin, take_away, give_back)
