"""Start-up and wiring of the token service."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import grpc

from blumpo.token.v1 import token_pb2, token_pb2_grpc
from blumpo_common import db, logs, server
from blumpo_common.config import ConfigError
from token_service import config as token_config
from token_service.api import ERROR_DOMAIN, TokenApi
from token_service.store import Store

SERVICE_NAME = token_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name


def service(store: Store) -> server.Service:
    def register(grpc_server: grpc.aio.Server) -> None:
        token_pb2_grpc.add_TokenServiceServicer_to_server(TokenApi(store), grpc_server)

    return server.Service(full_name=SERVICE_NAME, error_domain=ERROR_DOMAIN, register=register)


async def run(config: token_config.Config) -> None:
    pool = await db.create_pool(config.database)
    store = Store(pool, config.database.timeout_ms / 1000)
    await server.serve(service(store), pool, config.server)


def main() -> None:
    try:
        config = token_config.load(os.environ)
    except ConfigError as exc:
        print(f"token_service: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure("token_service", config.server.log_level)
    logging.getLogger(__name__).info("starting")
    asyncio.run(run(config))
