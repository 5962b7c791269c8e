"""Live job status: one LISTEN connection per process, fanned out to every watcher.

The migration's trigger sends NOTIFY generation_job with the job id on each change.
The hub keeps one dedicated connection listening and wakes the watchers of that
job. A wake-up only says "look again": watchers re-read the job, so coalesced or
missed notifications lose nothing but intermediate states. While the listening
connection is down every watcher polls, and all are woken when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from blumpo_common import db
from blumpo_common.config import DatabaseConfig
from generation_service import rules
from generation_service.model import Job

log = logging.getLogger(__name__)

CHANNEL = "generation_job"
# How often a watcher re-reads its job without being woken: rarely while the listener is up
# (a notification is only a safety net away), often while it is down.
LISTENING_POLL_SECONDS = 60.0
DOWN_POLL_SECONDS = 1.0
RECONNECT_MAX_SECONDS = 5.0
# Bound on concurrent watchers per process (each holds a small event, no connection).
MAX_WATCHERS = 10_000


class WatcherLimitError(Exception):
    pass


class Hub:
    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        self.watchers: dict[uuid.UUID, set[asyncio.Event]] = {}
        self.count = 0
        self.listening = asyncio.Event()

    def _wake(self, job_id: uuid.UUID | None = None) -> None:
        groups = self.watchers.values() if job_id is None else [self.watchers.get(job_id, set())]
        for events in groups:
            for event in events:
                event.set()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        try:
            job_id = uuid.UUID(str(payload))
        except ValueError:
            return
        self._wake(job_id)

    async def run(self) -> None:
        """Keeps the listening connection up for the life of the process."""
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.config.url,
                    timeout=min(self.config.timeout_ms / 1000, 10.0),
                    server_settings=db.server_settings(self.config),
                )
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listening.set()
                # Changes made while no one listened are caught by waking everyone now.
                self._wake()
                delay = 0.1
                await lost.wait()
                log.warning("job listener connection lost")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: retry with backoff
                log.warning("job listener cannot connect: %s", exc)
            finally:
                self.listening.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    @asynccontextmanager
    async def subscribe(self, job_id: uuid.UUID) -> AsyncIterator[asyncio.Event]:
        if self.count >= MAX_WATCHERS:
            raise WatcherLimitError
        event = asyncio.Event()
        self.watchers.setdefault(job_id, set()).add(event)
        self.count += 1
        try:
            yield event
        finally:
            self.count -= 1
            events = self.watchers[job_id]
            events.discard(event)
            if not events:
                del self.watchers[job_id]

    async def watch(self, job_id: uuid.UUID, read: Callable[[], Awaitable[Job]]) -> AsyncIterator[Job]:
        """The job now, then each time it changes, until it is terminal."""
        async with self.subscribe(job_id) as event:
            # Subscribed before the first read, so no change after it is missed.
            last: tuple[Any, ...] | None = None
            while True:
                event.clear()
                job = await read()
                key = (job.status, job.updated_at)
                if key != last:
                    last = key
                    yield job
                    if rules.is_terminal(job.status):
                        return
                timeout = LISTENING_POLL_SECONDS if self.listening.is_set() else DOWN_POLL_SECONDS
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout)


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()
