"""Start-up and wiring of the generation service."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import asyncpg
import grpc
import uvloop

from blumpo.generation.v1 import generation_pb2, generation_pb2_grpc
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import db, logs, retry, server, workers
from blumpo_common.config import PAGE_TOKEN_SECRET_MADE_UP, DatabaseConfig, load_or_exit
from blumpo_common.pagination import PageTokens
from blumpo_common.retry import RetryPolicy
from generation_service import config as generation_config
from generation_service import errors
from generation_service.api import GenerationApi
from generation_service.charging import Charger, Reconciler, ReconcilerSettings
from generation_service.store import Store
from generation_service.token_client import TokenClient
from generation_service.watch import Hub, WatchSettings

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


@dataclass
class Parts:
    store: Store
    charger: Charger
    reconciler: Reconciler
    hub: Hub
    pages: PageTokens


def parts(
    pool: asyncpg.Pool,
    database: DatabaseConfig,
    token_channel: grpc.aio.Channel,
    policy: RetryPolicy,
    settings: ReconcilerSettings,
    *,
    watch: WatchSettings | None = None,
    pages: PageTokens | None = None,
) -> Parts:
    """The service's parts; without pages, page tokens are signed with a secret made up for them."""
    store = Store(pool, database.timeout_ms / 1000, settings.claim_seconds)
    charger = Charger(store, TokenClient(token_pb2_grpc.TokenServiceStub(token_channel), policy))
    return Parts(
        store,
        charger,
        Reconciler(charger, settings),
        Hub(database, store.get_job, watch or WatchSettings()),
        pages or PageTokens.generated(),
    )


def service(p: Parts) -> server.Service:
    def register(grpc_server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationApi(p.store, p.charger, p.hub, p.pages), grpc_server
        )

    return server.Service(
        name="generation_service",
        full_name=SERVICE_NAME,
        error_domain=errors.DOMAIN,
        register=register,
        background=(p.hub.run, p.hub.poll, p.reconciler.run),
        on_shutdown=(p.hub.close,),
        probe=p.store.queries["health_probe"].sql,
    )


async def run(config: generation_config.Config, *, worker: bool = False) -> None:
    pool = await db.create_pool(config.database)
    async with grpc.aio.insecure_channel(config.token_service_target, options=retry.CHANNEL_OPTIONS) as channel:
        pages = PageTokens(config.page_tokens.secret)
        wired = parts(
            pool,
            config.database,
            channel,
            config.token_retry,
            config.reconciler,
            watch=config.watch,
            pages=pages,
        )
        await server.serve(service(wired), pool, config.server, worker=worker)


def main() -> None:
    config = load_or_exit("generation_service", generation_config.load, os.environ)
    logs.configure("generation_service", config.server.log_level)
    log = logging.getLogger(__name__)
    if config.page_tokens.generated:
        log.warning(PAGE_TOKEN_SECRET_MADE_UP)
    log.info("starting", extra={"token_service": config.token_service_target, "workers": config.server.workers})
    if config.server.workers > 1:
        workers.supervise("generation_service", config.server, worker, config)
    uvloop.run(run(config))


def worker(config: generation_config.Config) -> None:
    """One of config.server.workers processes (blumpo_common/workers.py)."""
    logs.configure("generation_service", config.server.log_level)
    uvloop.run(run(config, worker=True))
