"""The generation service's settings, from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blumpo_common.config import (
    ConfigError,
    DatabaseConfig,
    PageTokenConfig,
    ServerConfig,
    address,
    integer,
    is_development,
    load_database,
    load_page_tokens,
    load_server,
)
from blumpo_common.retry import RetryPolicy
from blumpo_common.server import Security, load_security
from generation_service.charging import UNANSWERED_HOLD_SECONDS, ReconcilerSettings
from generation_service.watch import WatchSettings

PORT = 50052
# The login role (migration 20261126100001).
ROLE = "generation_service"
METRICS_PORT = 9152


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    server: ServerConfig
    token_service_target: str
    token_retry: RetryPolicy
    reconciler: ReconcilerSettings
    watch: WatchSettings
    page_tokens: PageTokenConfig
    # Mutual TLS (also of its client to the token service) and the callers' policy.
    security: Security
    # A queued job waiting longer than this is claimed as if one priority level higher.
    aging_seconds: float = 300.0
    # How long an owner's plan, as the token service told it, is used without asking again.
    plan_cache_seconds: float = 60.0
    # ClaimNextJob sweeps expired leases at most this often per process (0: on every claim).
    sweep_interval_seconds: float = 1.0


def load(env: Mapping[str, str]) -> Config:
    token_retry = RetryPolicy(
        attempt_timeout_seconds=integer(env, "TOKEN_CALL_TIMEOUT_MS", 2000, 50, 60_000) / 1000,
        max_attempts=integer(env, "TOKEN_CALL_ATTEMPTS", 4, 1, 10),
        total_timeout_seconds=integer(env, "TOKEN_CALL_BUDGET_MS", 6000, 50, 120_000) / 1000,
    )
    reconciler = ReconcilerSettings(
        claim_seconds=integer(env, "CHARGE_CLAIM_MS", 10_000, 100, 3_600_000) / 1000,
        interval_seconds=integer(env, "RECONCILE_INTERVAL_MS", 2000, 10, 3_600_000) / 1000,
    )
    # A claim that ran out while its holder still waits for the token service would let a
    # second call ask about the same job at the same time.
    if reconciler.claim_seconds <= token_retry.total_timeout_seconds + UNANSWERED_HOLD_SECONDS:
        raise ConfigError(
            f"CHARGE_CLAIM_MS must exceed TOKEN_CALL_BUDGET_MS by more than {UNANSWERED_HOLD_SECONDS * 1000:.0f}"
        )
    default = WatchSettings()
    watch = WatchSettings(
        max_per_caller=integer(env, "WATCH_MAX_PER_CALLER", default.max_per_caller, 1, 1_000_000),
        max_total=integer(env, "WATCH_MAX_TOTAL", default.max_total, 1, 1_000_000),
        idle_seconds=integer(env, "WATCH_IDLE_SECONDS", int(default.idle_seconds), 1, 86_400),
    )
    return Config(
        database=load_database(env, "GENERATION_DATABASE_URL", ROLE),
        server=load_server(env, "GENERATION", PORT, METRICS_PORT),
        token_service_target=address(env, "TOKEN_SERVICE_TARGET", "localhost:50051"),
        token_retry=token_retry,
        reconciler=reconciler,
        watch=watch,
        page_tokens=load_page_tokens(env, is_development(env)),
        security=load_security(env),
        aging_seconds=integer(env, "PRIORITY_AGING_SECONDS", 300, 1, 30 * 86_400),
        plan_cache_seconds=integer(env, "PLAN_CACHE_SECONDS", 60, 0, 3600),
        sweep_interval_seconds=integer(env, "LEASE_SWEEP_INTERVAL_MS", 1000, 0, 60_000) / 1000,
    )
