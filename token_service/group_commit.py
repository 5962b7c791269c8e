"""Group commit: concurrent single appends share one call of the ledger.

Each caller (the entries name it) sends one batch at a time in this process. Appends that
arrive while its batch is out wait in the process and leave together, in arrival order, as the
next batch when it returns: one statement, one transaction and one WAL flush for many callers.
An append that finds its caller idle leaves at the end of the event loop's turn in which it
arrived, with whatever else arrived in that turn: nothing waits for company.

A batch is judged entry by entry exactly as the same appends one after another would be, so
each caller gets the outcome the serial order gives it, whatever else shares its batch. Appends
to one account keep their arrival order (an account is in one batch at a time; its next
appends wait for that batch). The batch functions lock their accounts in user_id order, so
batches wait for each other's rows rather than deadlock. A batch that waits for a row another
transaction holds (a refill batch, another process's batch, a session) holds up all its callers,
those of unlocked accounts too, and its accounts' next appends, until the lock is released or
the statement times out. The caller's other accounts wait for it STALL_SECONDS at most, then
leave in a batch beside it (at most MAX_BATCHES_IN_FLIGHT out at once: past that, they wait).
A batch that is merely slow also lets the next leave after STALL_SECONDS.

A batch that fails (the connection lost, the statement timed out) fails every caller in it:
each may send its append again with the same reference, which applies it once whether or not
the failed batch was written (a timeout can come after the commit). It runs until the latest
deadline among its callers.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import uuid
from dataclasses import dataclass, field

from blumpo_common import db
from token_service import ledger
from token_service.model import EntryRequest
from token_service.store import Store

# The most appends one batch carries; the rest go in the next.
MAX_GROUP = 1000
# A caller's next batch leaves when its batch in flight returns, or when that one has been out
# this long (it may be waiting for a row another transaction holds): one batch at a time keeps
# batches big, and a batch held up by a lock holds up nothing else for longer than this.
STALL_SECONDS = 0.05
# The most batches a caller has in flight in a process, those held up included: well below the
# pool's connections (DB_POOL_SIZE, 20), which the few callers and every read share.
MAX_BATCHES_IN_FLIGHT = 4

# An account, for one caller (the entries it writes name it).
Key = tuple[uuid.UUID, str]


@dataclass
class _Waiting:
    request: EntryRequest
    outcome: asyncio.Future[ledger.Outcome]
    # The caller's deadline (monotonic), None for none.
    deadline: float | None
    # The caller's context (its request id, its trace).
    context: contextvars.Context


@dataclass
class _Batch:
    caller: str
    groups: list[tuple[Key, list[_Waiting]]]
    # Not cancelled meanwhile: those sent to the ledger.
    waiting: list[_Waiting]
    # Out for less than STALL_SECONDS: the caller's next batch waits for it.
    fresh: bool = True
    stall: asyncio.TimerHandle | None = None


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
        # By caller: its batches in flight or about to leave; the callers with a fresh one of them.
        self.sending: dict[str, int] = {}
        self.fresh: set[str] = set()
        # The batches in flight (the loop keeps only weak references to tasks).
        self.flushes: set[asyncio.Task[None]] = set()
        # A batch of several calls runs in a context of its own, not in its first caller's (whose
        # request id and trace would otherwise be every batch's after it); a batch of one call
        # runs in that call's, so its statement is in the call's trace.
        self._context = contextvars.copy_context()

    async def append(self, request: EntryRequest, created_by: str) -> ledger.Outcome:
        """The request's outcome, as ledger.append would give it alone."""
        key = (request.user_id, created_by)
        waiting = _Waiting(
            request, asyncio.get_running_loop().create_future(), db.call_deadline.get(), contextvars.copy_context()
        )
        queue = self.queues.get(key)
        if queue is not None:
            queue.waiting.append(waiting)
        else:
            self.queues[key] = _Queue()
            self.ready.setdefault(created_by, []).append((key, [waiting]))
            self._send_when_free(created_by)
        return await waiting.outcome

    def _send_when_free(self, caller: str) -> None:
        """A batch of the caller's ready groups leaves at the end of this turn of the loop,
        unless a fresh batch of the caller is out (then when it returns or goes stale)."""
        sending = self.sending.get(caller, 0)
        if caller in self.ready and caller not in self.fresh and sending < MAX_BATCHES_IN_FLIGHT:
            self.sending[caller] = sending + 1
            self.fresh.add(caller)
            asyncio.get_running_loop().call_soon(self._send, caller, context=self._context)

    def _send(self, caller: str) -> None:
        """Sends the caller's ready groups, at most MAX_GROUP appends (the rest go next)."""
        groups = self.ready.pop(caller)
        taken = [groups.pop(0)]
        size = len(taken[0][1])
        while groups and size + len(groups[0][1]) <= MAX_GROUP:
            taken.append(groups.pop(0))
            size += len(taken[-1][1])
        if groups:
            self.ready[caller] = groups
        waiting = [w for _, group in taken for w in group if not w.outcome.done()]  # not cancelled meanwhile
        batch = _Batch(caller, taken, waiting)
        loop = asyncio.get_running_loop()
        batch.stall = loop.call_later(STALL_SECONDS, self._stale, batch, context=self._context)
        # A task of its own: the callers wait on their futures, not on the batch.
        task = loop.create_task(self._flush(batch), context=self._deadline_context(waiting))
        self.flushes.add(task)
        task.add_done_callback(functools.partial(self._flushed, batch))

    async def _flush(self, batch: _Batch) -> None:
        group = batch.waiting
        try:
            outcomes = await ledger.append(self.store, [w.request for w in group], batch.caller) if group else []
        except Exception as exc:
            # One statement, one transaction: each caller gets its error, as it would alone.
            for waiting in group:
                if not waiting.outcome.done():
                    waiting.outcome.set_exception(exc)
        else:
            for waiting, outcome in zip(group, outcomes, strict=True):
                if not waiting.outcome.done():
                    waiting.outcome.set_result(outcome)

    def _stale(self, batch: _Batch) -> None:
        """The batch has been out STALL_SECONDS: the caller's next one need not wait for it."""
        self._not_fresh(batch)
        self._send_when_free(batch.caller)

    def _not_fresh(self, batch: _Batch) -> None:
        if batch.fresh:
            batch.fresh = False
            self.fresh.discard(batch.caller)

    def _flushed(self, batch: _Batch, task: asyncio.Task[None]) -> None:
        """The batch is back (or cancelled, shutting down, even before it started: its callers are
        cancelled too); its accounts' next appends and the caller's next batch may leave."""
        self.flushes.discard(task)
        for waiting in batch.waiting:
            if not waiting.outcome.done():
                waiting.outcome.cancel()
        for key, _ in batch.groups:
            self._next(key)
        assert batch.stall is not None
        batch.stall.cancel()
        self.sending[batch.caller] -= 1
        if not self.sending[batch.caller]:
            del self.sending[batch.caller]
        self._not_fresh(batch)
        self._send_when_free(batch.caller)

    def _next(self, key: Key) -> None:
        """Makes ready what queued for key while it was in flight, or marks key idle."""
        queue = self.queues[key]
        group = [w for w in queue.waiting[:MAX_GROUP] if not w.outcome.done()]  # not cancelled meanwhile
        del queue.waiting[:MAX_GROUP]
        if group or queue.waiting:
            self.ready.setdefault(key[1], []).append((key, group))
        else:
            del self.queues[key]

    def _deadline_context(self, group: list[_Waiting]) -> contextvars.Context:
        """The batch runs until the latest deadline of its callers (none if one has none): a
        caller whose deadline passes first is answered DEADLINE_EXCEEDED by gRPC, the others are
        not cut."""
        deadlines = [w.deadline for w in group]
        latest = None if not deadlines or None in deadlines else max(d for d in deadlines if d is not None)
        context = (group[0].context if len(group) == 1 else self._context).copy()
        context.run(db.call_deadline.set, latest)
        return context
