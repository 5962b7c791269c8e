"""Group commit: concurrent single appends to one account share one call of the ledger.

Appends to one account are serialized by its row lock anyway, so under load each waits for
the one before it to commit. Here, while an append to an account is in flight, the appends
that arrive for that account (from the same caller) queue in this process; when it returns,
the whole queue goes to the ledger as one batch, in arrival order, in one transaction, and
each caller gets its own outcome. A batch is judged entry by entry exactly as the same
appends one after another would be, so the outcomes are those of the serial order.

An account with no append in flight is not delayed: its append runs at once, alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from dataclasses import dataclass, field

from blumpo_common import db
from token_service import ledger
from token_service.model import EntryRequest
from token_service.store import Store

# The most appends one batch carries; the rest wait for the next.
MAX_GROUP = 1000


@dataclass
class _Waiting:
    request: EntryRequest
    outcome: asyncio.Future[ledger.Outcome]
    # The caller's deadline (monotonic), None for none.
    deadline: float | None


@dataclass
class _Queue:
    """An account (for one caller) with an append in flight, and the appends waiting for it."""

    waiting: list[_Waiting] = field(default_factory=list)


class GroupCommit:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.queues: dict[tuple[uuid.UUID, str], _Queue] = {}
        # The batches in flight (the loop keeps only weak references to tasks).
        self.flushes: set[asyncio.Task[None]] = set()

    async def append(self, request: EntryRequest, created_by: str) -> ledger.Outcome:
        """The request's outcome, as ledger.append would give it alone."""
        key = (request.user_id, created_by)
        queue = self.queues.get(key)
        if queue is not None:
            waiting = _Waiting(request, asyncio.get_running_loop().create_future(), db.call_deadline.get())
            queue.waiting.append(waiting)
            return await waiting.outcome
        self.queues[key] = _Queue()
        try:
            [outcome] = await ledger.append(self.store, [request], created_by)
        finally:
            self._next(key)
        return outcome

    def _next(self, key: tuple[uuid.UUID, str]) -> None:
        """Sends what queued for key while it was in flight, or marks key idle."""
        queue = self.queues[key]
        group = [w for w in queue.waiting[:MAX_GROUP] if not w.outcome.done()]  # not cancelled meanwhile
        del queue.waiting[:MAX_GROUP]
        if not group and not queue.waiting:
            del self.queues[key]
            return
        # A task of its own: the caller that triggered it returns now, with its own outcome.
        task = asyncio.get_running_loop().create_task(self._flush(key, group), context=_context(group))
        self.flushes.add(task)
        task.add_done_callback(self.flushes.discard)

    async def _flush(self, key: tuple[uuid.UUID, str], group: list[_Waiting]) -> None:
        try:
            outcomes = await ledger.append(self.store, [w.request for w in group], key[1]) if group else []
        except BaseException as exc:
            # One statement, one transaction: each caller gets its error, as it would alone.
            for waiting in group:
                if not waiting.outcome.done():
                    if isinstance(exc, asyncio.CancelledError):
                        waiting.outcome.cancel()
                    else:
                        waiting.outcome.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for waiting, outcome in zip(group, outcomes, strict=True):
                if not waiting.outcome.done():
                    waiting.outcome.set_result(outcome)
        finally:
            self._next(key)


def _context(group: list[_Waiting]) -> contextvars.Context:
    """The batch runs until the latest deadline of its callers (none if one has none): a caller
    whose deadline passes first is answered DEADLINE_EXCEEDED by gRPC, the others are not cut."""
    deadlines = [w.deadline for w in group]
    latest = None if not deadlines or None in deadlines else max(d for d in deadlines if d is not None)
    context = contextvars.copy_context()
    context.run(db.call_deadline.set, latest)
    return context
