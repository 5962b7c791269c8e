"""Database access both services share: the pool, named SQL and call timeouts."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import asyncpg
import asyncpg.exceptions._base
import asyncpg.pool

from blumpo_common import metrics
from blumpo_common.config import DatabaseConfig

# A connection, pooled or not.
Connection: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"

# Monotonic deadline of the gRPC call being served, set by the server interceptor.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)


class PoolTimeoutError(Exception):
    """No pooled connection could be had before the call's deadline (or DB_TIMEOUT)."""


# The connection, or the server behind it, failed: the statement may or may not have run, and
# the connection is of no further use. Errors of the request itself (bad parameters) are not here.
_CONNECTION_FAILURES: tuple[type[BaseException], ...] = (
    PoolTimeoutError,
    asyncpg.PostgresConnectionError,  # class 08, and a connection closed mid-statement
    asyncpg.AdminShutdownError,  # 57P01: pg_terminate_backend, a fast shutdown
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.TooManyConnectionsError,  # 53300
    # A backend that went away mid-message leaves the protocol in a state no statement can run in.
    asyncpg.InternalClientError,
    asyncpg.InterfaceError,
    ConnectionError,
    OSError,
)
_REQUEST_FAULTS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions._base.DataError,  # a parameter the codec cannot encode
    asyncpg.exceptions._base.ClientConfigurationError,
    asyncpg.exceptions._base.UnsupportedClientFeatureError,
    asyncpg.exceptions._base.UnsupportedServerFeatureError,
)


def connection_failed(exc: BaseException) -> bool:
    """Whether exc says the database connection failed (the call may be retried), not the request."""
    return isinstance(exc, _CONNECTION_FAILURES) and not isinstance(exc, _REQUEST_FAULTS)


_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# `:name` parameters; `::type` casts are not parameters.
_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True)
class Query:
    """One statement of a .sql file, with `:name` parameters translated to `$n`."""

    name: str
    sql: str
    # The `:name` parameters in `$n` order; empty for a statement written with `$n`.
    params: tuple[str, ...] = ()

    def args(self, positional: tuple[Any, ...], named: Mapping[str, Any]) -> tuple[Any, ...]:
        if not self.params:
            assert not named, f"{self.name} takes positional parameters"
            return positional
        assert not positional, f"{self.name} takes named parameters"
        missing = set(self.params) ^ set(named)
        assert not missing, f"{self.name}: parameters {sorted(missing)} missing or unknown"
        return tuple(named[p] for p in self.params)


def parse_query(name: str, text: str) -> Query:
    params: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in params:
            params.append(match.group(1))
        return f"${params.index(match.group(1)) + 1}"

    # Comments stay in the file for readers; the server gets the statement alone.
    statement = "\n".join(line for line in text.strip().splitlines() if not line.lstrip().startswith("--"))
    sql = _PARAM.sub(number, statement)
    assert not (params and re.search(r"\$\d", statement)), f"{name} mixes $n and :name parameters"
    return Query(name, sql, tuple(params))


def load_queries(path: Path) -> Mapping[str, Query]:
    """Reads a .sql file of statements, each under a `-- name: <name>` header."""
    parts = _NAME.split(path.read_text())
    return {name: parse_query(name, sql) for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


R = TypeVar("R")


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Converted:
    """A field from a column (of the field's name unless given), passed through convert."""

    convert: Callable[[Any], Any] = _same
    column: str | None = None


@dataclass(frozen=True)
class Nested:
    """A record built from the same row; None when the column unless_null is NULL."""

    build: Callable[[asyncpg.Record], Any]
    unless_null: str | None = None


@dataclass(frozen=True)
class Many:
    """Records built from the array of rows in the field's column; none when it is absent."""

    build: Callable[[asyncpg.Record], Any]


def record(cls: type[R], row: asyncpg.Record, **special: Converted | Nested | Many) -> R:
    """A dataclass built from the row's columns of the same names; `special` says how the fields
    that need more than a column's value are made (enums, decoded JSON, records of their own)."""
    return reader(cls, **special)(row)


def reader(cls: type[R], **special: Converted | Nested | Many) -> Callable[[asyncpg.Record], R]:
    """record(cls, row, **special) worked out once, as a function of the row: for a record type
    read by the thousand (a batch's answers), made once at import."""
    fields: list[Callable[[asyncpg.Record], Any]] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        fields.append(_field_reader(field.name, special.get(field.name)))

    def read(row: asyncpg.Record) -> R:
        return cls(*[read_field(row) for read_field in fields])

    return read


def _field_reader(name: str, spec: Converted | Nested | Many | None) -> Callable[[asyncpg.Record], Any]:
    if spec is None:
        return lambda row: row[name]
    if isinstance(spec, Converted):
        convert, column = spec.convert, spec.column or name
        if isinstance(spec.convert, type) and issubclass(spec.convert, enum.Enum):
            # A dict's lookup, not the enum's call (ten times slower); a value that is no
            # member still fails, with KeyError.
            convert = {member.value: member for member in spec.convert}.__getitem__
        return lambda row: convert(row[column])
    if isinstance(spec, Nested):
        build, unless_null = spec.build, spec.unless_null
        if unless_null is None:
            return build
        return lambda row: None if row[unless_null] is None else build(row)
    many = spec.build
    return lambda row: tuple(many(r) for r in row.get(name) or ())


async def _reset(conn: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool: only an open transaction ended.
    The services keep no session state (see create_pool), so asyncpg's default reset (RESET ALL,
    UNLISTEN *, ...) would cost a round trip per statement for nothing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(config: DatabaseConfig) -> asyncpg.Pool:
    """A pool that connects lazily, so the server can start while the database is down. No
    startup parameter and no session state: the login role carries the search_path, so a
    transaction pooler may hand each transaction to any server connection."""
    pool = await asyncpg.create_pool(
        config.url,
        min_size=0,
        max_size=config.pool_size,
        statement_cache_size=config.statement_cache_size,
        timeout=min(config.timeout_ms / 1000, 10.0),
        command_timeout=config.timeout_ms / 1000,
        reset=_reset,
    )
    assert pool is not None
    metrics.watch_pool(pool)
    return pool


def timeout(default_seconds: float) -> float:
    """What is left of the caller's deadline, capped by the configured timeout."""
    deadline = call_deadline.get()
    if deadline is None:
        return default_seconds
    return max(0.001, min(default_seconds, deadline - time.monotonic()))


class BaseStore:
    """What each service's store shares: its pool, its named statements and their timeout.

    Every statement runs through fetch/fetchrow/fetchval/execute: on the pool, or on a
    caller's transaction when given `conn=`, with what is left of the call's deadline.
    """

    # The service's statements (its queries.sql), set by each subclass.
    queries: Mapping[str, Query]

    def __init__(self, pool: asyncpg.Pool, timeout_seconds: float) -> None:
        self.pool = pool
        self.timeout_seconds = timeout_seconds

    def timeout(self) -> float:
        """The timeout for one statement of the call being served."""
        return timeout(self.timeout_seconds)

    def _prepare(self, name: str, args: tuple[Any, ...], named: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
        query = self.queries[name]
        return query.sql, query.args(args, named)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection, waited for no longer than the call's deadline (or DB_TIMEOUT).

        A connection that failed is closed rather than given back: the next call gets a sound
        one, and no reset is tried on a protocol the lost backend left midway."""
        metrics.POOL_WAITING.count += 1
        try:
            conn = await self.pool.acquire(timeout=self.timeout())
        except TimeoutError:
            raise PoolTimeoutError("no database connection became free in time") from None
        finally:
            metrics.POOL_WAITING.count -= 1
        try:
            yield conn
        except BaseException as exc:
            if connection_failed(exc):
                # InterfaceError: asyncpg saw the loss first and has given the connection back.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
            raise
        finally:
            await self._release(conn)

    async def _release(self, conn: Connection) -> None:
        try:
            await self.pool.release(conn)  # type: ignore[arg-type]
        except Exception as exc:
            # The backend went away after the statement: asyncpg closed the connection when its
            # reset failed, and the statement's own outcome (done, or its error) is the answer.
            if not connection_failed(exc):
                raise

    @asynccontextmanager
    async def _on(self, conn: Connection | None) -> AsyncIterator[Connection]:
        """The caller's connection when given, else one of the pool's for one statement."""
        if conn is not None:
            yield conn
        else:
            async with self.connection() as own:
                yield own

    async def fetch(self, name: str, *args: Any, conn: Connection | None = None, **named: Any) -> list[asyncpg.Record]:
        sql, values = self._prepare(name, args, named)
        async with self._on(conn) as on:
            return await on.fetch(sql, *values, timeout=self.timeout())

    async def fetchrow(
        self, name: str, *args: Any, conn: Connection | None = None, **named: Any
    ) -> asyncpg.Record | None:
        sql, values = self._prepare(name, args, named)
        async with self._on(conn) as on:
            return await on.fetchrow(sql, *values, timeout=self.timeout())

    async def fetchval(self, name: str, *args: Any, conn: Connection | None = None, **named: Any) -> Any:
        sql, values = self._prepare(name, args, named)
        async with self._on(conn) as on:
            return await on.fetchval(sql, *values, timeout=self.timeout())

    async def execute(self, name: str, *args: Any, conn: Connection | None = None, **named: Any) -> str:
        sql, values = self._prepare(name, args, named)
        async with self._on(conn) as on:
            return await on.execute(sql, *values, timeout=self.timeout())

    @asynccontextmanager
    async def transaction(self, **options: Any) -> AsyncIterator[Connection]:
        """A pooled connection in a transaction: committed on exit, rolled back on an exception."""
        async with self.connection() as conn, conn.transaction(**options):
            yield conn
