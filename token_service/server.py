"""Start-up and wiring of the token service."""

from __future__ import annotations

import logging
import os

import grpc
import uvloop

from blumpo.token.v1 import token_pb2, token_pb2_grpc
from blumpo_common import db, server, workers
from blumpo_common.config import PAGE_TOKEN_SECRET_MADE_UP, load_or_exit
from blumpo_common.pagination import PageTokens
from token_service import config as token_config
from token_service import otp, otp_sender
from token_service.api import ERROR_DOMAIN, TokenApi
from token_service.store import Store

SERVICE_NAME = token_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name
DEFAULT_OTP_TTL_SECONDS = 600

log = logging.getLogger(__name__)


def development_logins(store: Store) -> otp.OtpLogins:
    """OTP login as BLUMPO_ENV=development has it: fixed secret, codes in the log."""
    return otp.OtpLogins(
        store,
        otp_sender.LogSender(),
        otp.SystemClock(),
        token_config.DEVELOPMENT_OTP_SECRET.encode(),
        DEFAULT_OTP_TTL_SECONDS,
    )


def service(store: Store, logins: otp.OtpLogins | None = None, pages: PageTokens | None = None) -> server.Service:
    """The service to serve; without logins, OTP login runs with the development settings, and
    without pages, page tokens are signed with a secret made up for this server."""
    api = TokenApi(store, logins or development_logins(store), pages or PageTokens.generated())

    def register(grpc_server: grpc.aio.Server) -> None:
        token_pb2_grpc.add_TokenServiceServicer_to_server(api, grpc_server)

    return server.Service(
        name="token_service",
        full_name=SERVICE_NAME,
        error_domain=ERROR_DOMAIN,
        register=register,
        probe=store.queries["health_probe"].sql,
    )


async def run(config: token_config.Config, *, worker: bool = False) -> None:
    pool = await db.create_pool(config.database)
    store = Store(pool, config.database.timeout_ms / 1000)
    logins = otp.OtpLogins(
        store,
        otp_sender.from_config(config.otp),
        otp.SystemClock(),
        config.otp.secret,
        config.otp.ttl_seconds,
        config.otp.limits,
    )
    await server.serve(
        service(store, logins, PageTokens(config.page_tokens.secret)),
        pool,
        config.server,
        config.security,
        worker=worker,
    )


def main() -> None:
    config = load_or_exit("token_service", token_config.load, os.environ)
    server.configure_process("token_service", config.server.log_level)
    if config.otp.development_secret:
        log.warning("OTP_SECRET is not set: using the fixed development secret (BLUMPO_ENV=development only)")
    if config.page_tokens.generated:
        log.warning(PAGE_TOKEN_SECRET_MADE_UP)
    if config.otp.smtp is None:
        log.warning("login codes are written to this log (development sender); set OTP_SMTP_HOST to mail them")
    log.info(
        "starting",
        extra={
            "development": config.development,
            "otp_ttl_seconds": config.otp.ttl_seconds,
            "workers": config.server.workers,
        },
    )
    if config.server.workers > 1:
        # The workers get this config, page-token secret included, so each accepts the others' tokens;
        # each loads the certificates itself, and again on the SIGHUP passed on to it.
        workers.supervise("token_service", config.server, worker, config, reload=config.security.tls is not None)
    uvloop.run(run(config))


def worker(config: token_config.Config) -> None:
    """One of config.server.workers processes (workers.py)."""
    server.configure_process("token_service", config.server.log_level)
    uvloop.run(run(config, worker=True))
