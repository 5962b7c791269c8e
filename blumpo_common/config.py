"""Settings read from the environment; a missing or malformed one stops start-up."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

T = TypeVar("T")

DEVELOPMENT = "development"
MIN_SECRET_LENGTH = 32
GENERATED_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


def load_or_exit(service: str, load: Callable[[Mapping[str, str]], T], env: Mapping[str, str]) -> T:
    """The service's settings; on a bad one, a single line naming it and exit status 2."""
    try:
        return load(env)
    except ConfigError as exc:
        exit_on(service, exc)


def exit_on(service: str, error: ConfigError) -> NoReturn:
    print(f"{service}: configuration error: {error}", file=sys.stderr)
    sys.exit(2)


DEVELOPMENT = "development"
# What sits between the services and PostgreSQL (DB_POOLER). Behind a transaction pooler a
# statement prepared on one server connection is gone on the next: no statement cache then.
POOLERS = ("none", "session", "transaction")


@dataclass(frozen=True)
class DatabaseConfig:
    # The service's own login (its role; search_path is set on the role, not by the session).
    url: str = field(repr=False)
    pool_size: int
    timeout_ms: int
    pooler: str = "none"
    # A direct connection of its own for LISTEN, which a transaction pooler cannot carry;
    # empty: url.
    listen_url: str = field(default="", repr=False)

    @property
    def statement_cache_size(self) -> int:
        """asyncpg's default (100) unless a transaction pooler would lose the statements."""
        return 0 if self.pooler == "transaction" else 100


# Calls one server runs at once (MAX_CONCURRENT_CALLS): five per pooled connection at the
# default pool size, so a queue for the pool stays a few statements long.
DEFAULT_MAX_CONCURRENT_CALLS = 100


@dataclass(frozen=True)
class ServerConfig:
    listen_addr: str
    metrics_addr: str
    log_level: str
    shutdown_grace_seconds: float
    max_concurrent_calls: int
    # The settings the addresses came from, to name them when one cannot be used.
    listen_setting: str
    metrics_setting: str
    # Server processes sharing the listening port (WORKERS, default: the CPUs); see workers.py.
    workers: int = 1


def development(env: Mapping[str, str]) -> bool:
    return env.get("BLUMPO_ENV", "").strip().lower() == DEVELOPMENT


def checked_url(url: str, name: str) -> str:
    """url, if it names a PostgreSQL database; the error names the setting, never the password."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or not parts.path.strip("/"):
        raise ConfigError(
            f"{name} must look like postgresql://user@host:port/dbname, got scheme "
            f"{parts.scheme!r} and database {parts.path.strip('/')!r}"
        )
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigError(f"{name} has a malformed port in {parts.netloc.rpartition('@')[2]!r}") from None
    return url


def database_url(env: Mapping[str, str]) -> str:
    url = env.get("DATABASE_URL") or env.get("POSTGRES_URL") or ""
    if not url:
        raise ConfigError("DATABASE_URL (or POSTGRES_URL) is not set")
    return checked_url(url, "DATABASE_URL")


def login_url(url: str, role: str) -> str:
    """url with role as its user: same password, host, port, database and options."""
    parts = urlsplit(url)
    password = f":{parts.password}" if parts.password is not None else ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}{password}@{host}"))


def service_database_url(env: Mapping[str, str], setting: str, role: str) -> str:
    """The service's own login: `setting` (TOKEN_DATABASE_URL, ...); in development, when that
    is unset, DATABASE_URL (the migrations' login) with the service's role as its user."""
    own = env.get(setting, "")
    if own:
        return checked_url(own, setting)
    if development(env):
        return login_url(database_url(env), role)
    raise ConfigError(
        f"{setting} is not set: outside development each service logs in as its own role ({role}), "
        "never as the migrations' DATABASE_URL"
    )


def secret(env: Mapping[str, str], name: str) -> str:
    """A secret from `name`, or from the file `<name>_FILE` names (one trailing newline dropped),
    so it need not sit in the environment; "" when neither is set. Errors never quote it."""
    value, path = env.get(name, ""), env.get(f"{name}_FILE", "").strip()
    if value and path:
        raise ConfigError(f"{name} and {name}_FILE are both set: set one")
    if not path:
        return value
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}_FILE {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    return text.removesuffix("\n").removesuffix("\r")


def integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def address(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "") or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be host:port, got {value!r}")
    return value


def load_database(env: Mapping[str, str], setting: str, role: str) -> DatabaseConfig:
    """The service's database settings; `setting` names its own URL (TOKEN_DATABASE_URL, ...)."""
    pooler = env.get("DB_POOLER", "").strip().lower() or "none"
    if pooler not in POOLERS:
        raise ConfigError(f"DB_POOLER must be one of {', '.join(POOLERS)}, got {pooler!r}")
    url = service_database_url(env, setting, role)
    listen_url = env.get("DATABASE_LISTEN_URL", "")
    return DatabaseConfig(
        url=url,
        pool_size=integer(env, "DB_POOL_SIZE", 20, 1, 500),
        timeout_ms=integer(env, "DB_TIMEOUT", 30000, 100, 3_600_000),
        pooler=pooler,
        listen_url=checked_url(listen_url, "DATABASE_LISTEN_URL") if listen_url else url,
    )


def load_server(env: Mapping[str, str], prefix: str, port: int, metrics_port: int) -> ServerConfig:
    level = env.get("LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    listen_setting, metrics_setting = f"{prefix}_LISTEN_ADDR", f"{prefix}_METRICS_ADDR"
    return ServerConfig(
        listen_addr=address(env, listen_setting, f"0.0.0.0:{port}"),
        metrics_addr=address(env, metrics_setting, f"0.0.0.0:{metrics_port}"),
        log_level=level,
        shutdown_grace_seconds=integer(env, "SHUTDOWN_GRACE_SECONDS", 10, 0, 300),
        max_concurrent_calls=integer(env, "MAX_CONCURRENT_CALLS", DEFAULT_MAX_CONCURRENT_CALLS, 1, 100_000),
        listen_setting=listen_setting,
        metrics_setting=metrics_setting,
        workers=integer(env, "WORKERS", os.cpu_count() or 1, 1, 256),
    )


def is_development(env: Mapping[str, str]) -> bool:
    """BLUMPO_ENV=development: development stand-ins (secrets, the log sender) are allowed."""
    return env.get("BLUMPO_ENV", "").strip().lower() == DEVELOPMENT


@dataclass(frozen=True)
class PageTokenConfig:
    secret: bytes = field(repr=False)
    # True when PAGE_TOKEN_SECRET was not set (development only) and this process made one up:
    # its page tokens do not survive a restart and no other replica accepts them.
    generated: bool = False


# Logged at start-up when load_page_tokens made the secret up.
PAGE_TOKEN_SECRET_MADE_UP = (
    "PAGE_TOKEN_SECRET is not set: page tokens are signed with a secret made up at start-up, so they "
    "do not survive a restart and no other replica accepts them (BLUMPO_ENV=development only)"
)


def load_page_tokens(env: Mapping[str, str], development: bool) -> PageTokenConfig:
    secret = env.get("PAGE_TOKEN_SECRET", "")
    if not secret:
        if not development:
            raise ConfigError(
                "PAGE_TOKEN_SECRET is not set (at least 32 random characters, the same for every replica "
                "of the service; required outside development)"
            )
        return PageTokenConfig(secrets.token_bytes(GENERATED_SECRET_BYTES), generated=True)
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"PAGE_TOKEN_SECRET must be at least {MIN_SECRET_LENGTH} characters, got {len(secret)}")
    return PageTokenConfig(secret.encode())
