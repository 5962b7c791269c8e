"""Group commit: concurrent single appends share one call of the ledger.

Each caller (the entries name it) has at most one batch in flight in this process. Appends
that arrive while it is out wait in the process and leave together, in arrival order, as the
next batch when it returns: one statement, one transaction and one WAL flush for many callers.
An append that finds its caller idle leaves at the end of the event loop's turn in which it
arrived, with whatever else arrived in that turn: nothing waits for company.

A batch is judged entry by entry exactly as the same appends one after another would be, so
each caller gets the outcome the serial order gives it, whatever else shares its batch. Appends
to one account keep their arrival order (an account is in one batch at a time). The batch
functions lock their accounts in user_id order, so the batches of several processes wait for
each other's rows rather than deadlock. The price of one batch at a time: while a batch waits
for a row another transaction holds (a refill batch, another process's batch), the caller's
other appends in this process wait with it.

A batch that fails (the connection lost, the statement timed out) fails every caller in it and
writes nothing: each may send its append again with the same reference. It runs until the
latest deadline among its callers.
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

# The most appends one batch carries; the rest go in the next.
MAX_GROUP = 1000

# An account, for one caller (the entries it writes name it).
Key = tuple[uuid.UUID, str]


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
        # The accounts with an append in flight or ready to go.
        self.queues: dict[Key, _Queue] = {}
        # By caller: the accounts' groups ready to go in its next batch.
        self.ready: dict[str, list[tuple[Key, list[_Waiting]]]] = {}
        # The callers with a batch in flight or about to leave.
        self.busy: set[str] = set()
        # The batches in flight (the loop keeps only weak references to tasks).
        self.flushes: set[asyncio.Task[None]] = set()

    async def append(self, request: EntryRequest, created_by: str) -> ledger.Outcome:
        """The request's outcome, as ledger.append would give it alone."""
        key = (request.user_id, created_by)
        waiting = _Waiting(request, asyncio.get_running_loop().create_future(), db.call_deadline.get())
        queue = self.queues.get(key)
        if queue is not None:
            queue.waiting.append(waiting)
        else:
            self.queues[key] = _Queue()
            self._ready(key, [waiting])
        return await waiting.outcome

    def _ready(self, key: Key, group: list[_Waiting]) -> None:
        """Puts the account's group into its caller's next batch, which leaves at the end of this
        turn of the loop unless one is in flight (then when that one returns)."""
        caller = key[1]
        self.ready.setdefault(caller, []).append((key, group))
        if caller not in self.busy:
            self.busy.add(caller)
            asyncio.get_running_loop().call_soon(self._send, caller)

    def _send(self, caller: str) -> None:
        """Sends the caller's ready groups, at most MAX_GROUP appends (the rest go next)."""
        groups = self.ready.pop(caller)
        batch = [groups.pop(0)]
        size = len(batch[0][1])
        while groups and size + len(groups[0][1]) <= MAX_GROUP:
            batch.append(groups.pop(0))
            size += len(batch[-1][1])
        if groups:
            self.ready[caller] = groups
        waiting = [w for _, group in batch for w in group]
        # A task of its own: the callers wait on their futures, not on the batch.
        task = asyncio.get_running_loop().create_task(self._flush(caller, batch), context=_context(waiting))
        self.flushes.add(task)
        task.add_done_callback(self.flushes.discard)

    async def _flush(self, caller: str, batch: list[tuple[Key, list[_Waiting]]]) -> None:
        group = [w for _, waiting in batch for w in waiting if not w.outcome.done()]  # not cancelled meanwhile
        try:
            outcomes = await ledger.append(self.store, [w.request for w in group], caller) if group else []
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
            for key, _ in batch:
                self._next(key)
            if caller in self.ready:
                asyncio.get_running_loop().call_soon(self._send, caller)
            else:
                self.busy.discard(caller)

    def _next(self, key: Key) -> None:
        """Makes ready what queued for key while it was in flight, or marks key idle."""
        queue = self.queues[key]
        group = [w for w in queue.waiting[:MAX_GROUP] if not w.outcome.done()]  # not cancelled meanwhile
        del queue.waiting[:MAX_GROUP]
        if group or queue.waiting:
            self.ready.setdefault(key[1], []).append((key, group))
        else:
            del self.queues[key]


def _context(group: list[_Waiting]) -> contextvars.Context:
    """The batch runs until the latest deadline of its callers (none if one has none): a caller
    whose deadline passes first is answered DEADLINE_EXCEEDED by gRPC, the others are not cut."""
    deadlines = [w.deadline for w in group]
    latest = None if not deadlines or None in deadlines else max(d for d in deadlines if d is not None)
    context = contextvars.copy_context()
    context.run(db.call_deadline.set, latest)
    return context
