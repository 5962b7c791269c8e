"""Live job status: one LISTEN connection per process, one read per change for all watchers.

The migration's trigger sends NOTIFY generation_job with the job id on each change. The hub
keeps one dedicated connection listening and marks that job's feed stale. A mark only says
"look again": the first watcher to look starts one read of the job and every other watcher
of that job awaits the same read, so a change costs one read however many streams follow
the job. Coalesced or missed notifications lose nothing but intermediate states, and the
hub also marks every feed stale on a timer: often while the listening connection is down,
rarely while it is up.

A stream ends after a terminal state, after `idle_seconds` without a change (a PAUSED job
would otherwise hold it forever; the client reconnects), and as soon as shutdown starts,
each with the last state it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import prometheus_client

from blumpo_common.config import DatabaseConfig
from generation_service import rules
from generation_service.model import Job

log = logging.getLogger(__name__)

CHANNEL = "generation_job"
# How often every feed is marked stale without a notification: rarely while the listener is
# up (a notification is only a safety net away), often while it is down.
LISTENING_POLL_SECONDS = 60.0
DOWN_POLL_SECONDS = 1.0
RECONNECT_MAX_SECONDS = 5.0

# Summed over the live worker processes, when there are several (workers.py).
STREAMS = prometheus_client.Gauge(
    "generation_watch_streams", "Open WatchGenerationJob streams.", multiprocess_mode="livesum"
)
READS = prometheus_client.Counter(
    "generation_watch_reads_total", "Reads of a watched job, each shared by all watchers of that job."
)

# The store's read of a visible job (None when there is none).
ReadJob = Callable[[uuid.UUID], Coroutine[Any, Any, Job | None]]


@dataclass(frozen=True)
class WatchSettings:
    # Open streams one caller may hold, and all callers together (each holds no connection).
    max_per_caller: int = 100
    max_total: int = 10_000
    # A stream with no change for this long ends; the client reconnects if it still cares.
    idle_seconds: float = 300.0


class WatcherLimitError(Exception):
    def __init__(self, limit: str, allowed: int) -> None:
        super().__init__(f"{limit} limit of {allowed} watchers")
        # "caller" or "process": whose limit was reached.
        self.limit = limit
        self.allowed = allowed


class NoSuchJobError(Exception):
    pass


class _Feed:
    """The watchers of one job and the one read of it they share."""

    def __init__(self, job_id: uuid.UUID, read: ReadJob) -> None:
        self.job_id = job_id
        self.read = read
        self.watchers = 0
        # Set, then replaced, on each wake-up: a watcher waits on the one it held when it looked.
        self.woken = asyncio.Event()
        self._current: asyncio.Task[Job | None] | None = None

    def wake(self, stale: bool) -> None:
        """Makes the watchers look again; stale when the job may have changed since the last read."""
        if stale:
            self._current = None
        self.woken.set()
        self.woken = asyncio.Event()

    def current(self) -> asyncio.Task[Job | None]:
        """The job as read since the last stale mark: the first watcher to ask starts the read, all await it."""
        if self._current is None or (self._current.done() and not _succeeded(self._current)):
            READS.inc()
            # A context of its own: no one watcher's deadline or request id governs the shared read.
            self._current = asyncio.get_running_loop().create_task(
                self.read(self.job_id), context=contextvars.Context()
            )
            self._current.add_done_callback(_succeeded)
        return self._current


class Hub:
    def __init__(self, config: DatabaseConfig, read: ReadJob, settings: WatchSettings) -> None:
        self.config = config
        self.read = read
        self.settings = settings
        self.feeds: dict[uuid.UUID, _Feed] = {}
        self.per_caller: Counter[str] = Counter()
        self.count = 0
        self.listening = asyncio.Event()
        self.closing = False

    def close(self) -> None:
        """Ends every stream with the state it was last sent (shutdown started)."""
        self.closing = True
        for feed in self.feeds.values():
            feed.wake(stale=False)

    def _wake(self, job_id: uuid.UUID | None = None) -> None:
        feeds = list(self.feeds.values()) if job_id is None else [self.feeds[job_id]] if job_id in self.feeds else []
        for feed in feeds:
            feed.wake(stale=True)

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
                # A session of its own, straight to PostgreSQL: LISTEN outlives any transaction.
                conn = await asyncpg.connect(
                    self.config.listen_url or self.config.url, timeout=min(self.config.timeout_ms / 1000, 10.0)
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

    async def poll(self) -> None:
        """Marks every feed stale now and then: each second while the listener is down."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(DOWN_POLL_SECONDS)
            if not self.listening.is_set() or loop.time() - last >= LISTENING_POLL_SECONDS:
                last = loop.time()
                self._wake()

    @contextlib.contextmanager
    def _subscribe(self, job_id: uuid.UUID, caller: str) -> Iterator[_Feed]:
        if self.count >= self.settings.max_total:
            raise WatcherLimitError("process", self.settings.max_total)
        if self.per_caller[caller] >= self.settings.max_per_caller:
            raise WatcherLimitError("caller", self.settings.max_per_caller)
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = _Feed(job_id, self.read)
        feed.watchers += 1
        self.per_caller[caller] += 1
        self.count += 1
        STREAMS.inc()
        try:
            yield feed
        finally:
            STREAMS.dec()
            self.count -= 1
            self.per_caller[caller] -= 1
            if not self.per_caller[caller]:
                del self.per_caller[caller]
            feed.watchers -= 1
            if not feed.watchers:
                del self.feeds[job_id]

    async def watch(self, job_id: uuid.UUID, caller: str) -> AsyncIterator[Job]:
        """The job now, then each time it changes, until it is terminal, idle or the hub closes.

        WatcherLimitError when the caller or the process holds as many streams as allowed;
        NoSuchJobError when the job is not (or no longer) visible."""
        loop = asyncio.get_running_loop()
        with self._subscribe(job_id, caller) as feed:
            # Subscribed before the first read, so no change after it is missed.
            sent: tuple[Any, ...] | None = None
            idle_at = loop.time() + self.settings.idle_seconds
            while True:
                woken = feed.woken
                # Shielded: a watcher that leaves must not cancel the read the others await.
                job = await asyncio.shield(feed.current())
                if job is None:
                    raise NoSuchJobError
                if (job.status, job.updated_at) != sent:
                    sent = (job.status, job.updated_at)
                    idle_at = loop.time() + self.settings.idle_seconds
                    yield job
                    if rules.is_terminal(job.status):
                        return
                if self.closing:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), max(idle_at - loop.time(), 0.0))
                if not woken.is_set():
                    return  # idle: nothing changed for idle_seconds


def _succeeded(task: asyncio.Task[Any]) -> bool:
    """Whether a finished read gave a value (asking also marks its failure as seen)."""
    return not task.cancelled() and task.exception() is None


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()
