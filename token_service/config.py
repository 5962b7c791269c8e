"""The token service's settings, from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from blumpo_common.config import (
    MIN_SECRET_LENGTH,
    ConfigError,
    DatabaseConfig,
    PageTokenConfig,
    ServerConfig,
    boolean,
    integer,
    is_development,
    load_database,
    load_page_tokens,
    load_server,
    secret,
)
from blumpo_common.server import Security, load_security

PORT = 50051
# The login role (migration 20261126100001).
ROLE = "token_service"
METRICS_PORT = 9151
# Used only when BLUMPO_ENV=development; its name says what it is in any log or dump.
DEVELOPMENT_OTP_SECRET = "insecure-development-only-otp-secret-never-use-in-production"


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    sender_address: str
    # Empty user: no login (a relay that trusts the network).
    user: str
    password: str = field(repr=False)
    starttls: bool
    timeout_seconds: int


@dataclass(frozen=True)
class OtpLimits:
    """How many login codes may be mailed: per email within one code lifetime (so when it is
    reached, a code mailed to that address still works), per client per hour, and in all per
    minute (what the mail relay is trusted with); and wrong codes per client per hour over
    every email. See docs/security.md."""

    per_email: int = 3
    per_client_per_hour: int = 20
    mails_per_minute: int = 120
    failures_per_client_per_hour: int = 50


@dataclass(frozen=True)
class OtpConfig:
    secret: bytes = field(repr=False)
    ttl_seconds: int
    # None: codes go to the service log (development only).
    smtp: SmtpConfig | None
    # True when the fixed development secret stands in for OTP_SECRET (start-up warns).
    development_secret: bool = False
    limits: OtpLimits = field(default_factory=OtpLimits)


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    server: ServerConfig
    otp: OtpConfig
    page_tokens: PageTokenConfig
    development: bool
    security: Security


def load_smtp(env: Mapping[str, str], development: bool) -> SmtpConfig | None:
    host = env.get("OTP_SMTP_HOST", "").strip()
    if not host:
        if development:
            return None
        raise ConfigError(
            "OTP_SMTP_HOST is not set: outside development login codes must be mailed "
            "(set BLUMPO_ENV=development to write them to the log instead)"
        )
    sender_address = env.get("OTP_SMTP_FROM", "").strip()
    if "@" not in sender_address:
        raise ConfigError(f"OTP_SMTP_FROM must be the sender's email address, got {sender_address!r}")
    user, password = env.get("OTP_SMTP_USER", ""), secret(env, "OTP_SMTP_PASSWORD")
    if bool(user) != bool(password):
        raise ConfigError("OTP_SMTP_USER and OTP_SMTP_PASSWORD must be set together")
    return SmtpConfig(
        host=host,
        port=integer(env, "OTP_SMTP_PORT", 587, 1, 65535),
        sender_address=sender_address,
        user=user,
        password=password,
        starttls=boolean(env, "OTP_SMTP_STARTTLS", True),
        timeout_seconds=integer(env, "OTP_SMTP_TIMEOUT_SECONDS", 10, 1, 60),
    )


def load_otp(env: Mapping[str, str], development: bool) -> OtpConfig:
    otp_secret = secret(env, "OTP_SECRET")
    if not otp_secret:
        if not development:
            raise ConfigError(
                "OTP_SECRET (or OTP_SECRET_FILE) is not set (at least 32 random characters; required outside "
                "development)"
            )
        otp_secret = DEVELOPMENT_OTP_SECRET
    elif len(otp_secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"OTP_SECRET must be at least {MIN_SECRET_LENGTH} characters, got {len(otp_secret)}")
    return OtpConfig(
        secret=otp_secret.encode(),
        ttl_seconds=integer(env, "OTP_TTL_SECONDS", 600, 60, 3600),
        smtp=load_smtp(env, development),
        development_secret=otp_secret == DEVELOPMENT_OTP_SECRET,
        limits=OtpLimits(
            per_email=integer(env, "OTP_MAX_PER_EMAIL", OtpLimits.per_email, 1, 100),
            per_client_per_hour=integer(env, "OTP_MAX_PER_CLIENT_PER_HOUR", OtpLimits.per_client_per_hour, 1, 100_000),
            mails_per_minute=integer(env, "OTP_MAX_MAILS_PER_MINUTE", OtpLimits.mails_per_minute, 1, 1_000_000),
            failures_per_client_per_hour=integer(
                env, "OTP_MAX_FAILURES_PER_CLIENT_PER_HOUR", OtpLimits.failures_per_client_per_hour, 1, 100_000
            ),
        ),
    )


def load(env: Mapping[str, str]) -> Config:
    development = is_development(env)
    return Config(
        database=load_database(env, "TOKEN_DATABASE_URL", ROLE),
        server=load_server(env, "TOKEN", PORT, METRICS_PORT),
        otp=load_otp(env, development),
        page_tokens=load_page_tokens(env, development),
        development=development,
        security=load_security(env),
    )
