"""Start-up and wiring of the generation service."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import uvloop

from blumpo.generation.v1 import generation_pb2, generation_pb2_grpc
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import db, metrics, retry, server, tls, tracing, workers
from blumpo_common.config import PAGE_TOKEN_SECRET_MADE_UP, DatabaseConfig, load_or_exit
from blumpo_common.pagination import PageTokens
from blumpo_common.retry import RetryPolicy
from generation_service import config as generation_config
from generation_service import errors
from generation_service.api import GenerationApi
from generation_service.charging import Charger, Reconciler, ReconcilerSettings
from generation_service.gauges import BacklogCollector
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
    aging_seconds: float
    sweep_interval_seconds: float


def parts(
    pool: asyncpg.Pool,
    database: DatabaseConfig,
    token_channel: grpc.aio.Channel,
    policy: RetryPolicy,
    settings: ReconcilerSettings,
    *,
    watch: WatchSettings | None = None,
    pages: PageTokens | None = None,
    aging_seconds: float = 300.0,
    plan_cache_seconds: float = 60.0,
    sweep_interval_seconds: float = 1.0,
) -> Parts:
    """The service's parts; without pages, page tokens are signed with a secret made up for them."""
    store = Store(pool, database.timeout_ms / 1000, settings.claim_seconds)
    charger = Charger(store, TokenClient(token_pb2_grpc.TokenServiceStub(token_channel), policy), plan_cache_seconds)
    return Parts(
        store,
        charger,
        Reconciler(charger, settings),
        Hub(database, store.get_job, watch or WatchSettings()),
        pages or PageTokens.generated(),
        aging_seconds,
        sweep_interval_seconds,
    )


def service(p: Parts, on_reload: Sequence[Callable[[], object]] = ()) -> server.Service:
    def register(grpc_server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationApi(p.store, p.charger, p.hub, p.pages, p.aging_seconds, p.sweep_interval_seconds), grpc_server
        )

    return server.Service(
        name="generation_service",
        full_name=SERVICE_NAME,
        error_domain=errors.DOMAIN,
        register=register,
        background=(p.hub.run, p.hub.poll, p.reconciler.run),
        on_shutdown=(p.hub.close,),
        on_reload=on_reload,
        probe=p.store.queries["health_probe"].sql,
    )


def token_channel_interceptors() -> list[Any]:
    """The calls to the token service are traced (when tracing is on) and counted."""
    return [*tracing.client_interceptors(), metrics.ClientInterceptor()]


def token_channel(config: generation_config.Config) -> tls.RotatingChannel:
    """The channel to the token service: mutual TLS with the process's certificate when set, read
    again on reload (calls in flight finish on the old channel within the call budget)."""
    target, options, settings = config.token_service_target, retry.CHANNEL_OPTIONS, config.security.tls
    interceptors = token_channel_interceptors()

    def open_channel() -> grpc.aio.Channel:
        if settings is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        credentials = tls.channel_credentials(settings)
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)

    return tls.RotatingChannel(open_channel, drain_seconds=config.token_retry.total_timeout_seconds + 1)


async def run(config: generation_config.Config, *, worker: bool = False) -> None:
    pool = await db.create_pool(config.database)
    channel = token_channel(config)
    try:
        pages = PageTokens(config.page_tokens.secret)
        wired = parts(
            pool,
            config.database,
            channel.channel(),
            config.token_retry,
            config.reconciler,
            watch=config.watch,
            pages=pages,
            aging_seconds=config.aging_seconds,
            plan_cache_seconds=config.plan_cache_seconds,
            sweep_interval_seconds=config.sweep_interval_seconds,
        )
        metrics.register_scraped(BacklogCollector(wired.store, asyncio.get_running_loop()), metrics.ONE_FOR_ALL)
        await server.serve(
            service(wired, on_reload=(channel.reload,)), pool, config.server, config.security, worker=worker
        )
    finally:
        await channel.close()


def main() -> None:
    config = load_or_exit("generation_service", generation_config.load, os.environ)
    server.configure_process("generation_service", config.server.log_level)
    log = logging.getLogger(__name__)
    if config.page_tokens.generated:
        log.warning(PAGE_TOKEN_SECRET_MADE_UP)
    log.info("starting", extra={"token_service": config.token_service_target, "workers": config.server.workers})
    if config.server.workers > 1:
        # Each worker loads the certificates itself, and again on the SIGHUP passed on to it.
        workers.supervise("generation_service", config.server, worker, config, reload=config.security.tls is not None)
    uvloop.run(run(config))


def worker(config: generation_config.Config) -> None:
    """One of config.server.workers processes (blumpo_common/workers.py)."""
    server.configure_process("generation_service", config.server.log_level)
    uvloop.run(run(config, worker=True))
