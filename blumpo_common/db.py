"""Database access both services share: the pool, named SQL and call timeouts."""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool

from blumpo_common.config import DatabaseConfig

# A connection, pooled or not.
Connection: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"

# Monotonic deadline of the gRPC call being served, set by the server interceptor.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(path: Path) -> Mapping[str, str]:
    """Reads a .sql file of statements, each under a `-- name: <name>` header."""
    parts = _NAME.split(path.read_text())
    return {name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


def server_settings(config: DatabaseConfig) -> dict[str, str]:
    """Every connection's schema and role: the service sees its own schema with its own rights."""
    settings = {"search_path": config.search_path}
    if config.role:
        settings["role"] = config.role
    return settings


async def create_pool(config: DatabaseConfig) -> asyncpg.Pool:
    """A pool that connects lazily, so the server can start while the database is down."""
    pool = await asyncpg.create_pool(
        config.url,
        min_size=0,
        max_size=config.pool_size,
        server_settings=server_settings(config),
        timeout=min(config.timeout_ms / 1000, 10.0),
        command_timeout=config.timeout_ms / 1000,
    )
    assert pool is not None
    return pool


def timeout(default_seconds: float) -> float:
    """What is left of the caller's deadline, capped by the configured timeout."""
    deadline = call_deadline.get()
    if deadline is None:
        return default_seconds
    return max(0.001, min(default_seconds, deadline - time.monotonic()))


class BaseStore:
    """What each service's store shares: its pool and the timeout of each statement."""

    def __init__(self, pool: asyncpg.Pool, timeout_seconds: float) -> None:
        self.pool = pool
        self.timeout_seconds = timeout_seconds

    def timeout(self) -> float:
        """The timeout for one statement of the call being served."""
        return timeout(self.timeout_seconds)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection in a transaction: committed on exit, rolled back on an exception."""
        async with self.pool.acquire(timeout=self.timeout()) as conn, conn.transaction():
            yield conn
