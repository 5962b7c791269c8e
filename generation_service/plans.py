"""Owners' plans as the token service last told them, kept for PLAN_CACHE_SECONDS.

A plan sets only a job's priority (a scheduling hint) and, through job_owner, its owner's
running cap: a plan changed in the token service reaches new jobs within that time, and a
create whose owner's plan is known saves its call to the token service (docs/generation.md).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

# Users remembered at most per process; past that the oldest entry makes room.
MAX_USERS = 100_000


class PlanCache:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, max_users: int = MAX_USERS) -> None:
        self.seconds = seconds
        self.clock = clock
        self.max_users = max_users
        self._plans: dict[uuid.UUID, tuple[str, float]] = {}

    def get(self, user_id: uuid.UUID) -> str | None:
        """The plan told less than `seconds` ago; None when unknown or older."""
        known = self._plans.get(user_id)
        if known is None:
            return None
        plan, until = known
        if self.clock() >= until:
            del self._plans[user_id]
            return None
        return plan

    def put(self, user_id: uuid.UUID, plan: str) -> None:
        if self.seconds <= 0:
            return
        self._plans.pop(user_id, None)  # to the end of the insertion order: the newest
        self._plans[user_id] = (plan, self.clock() + self.seconds)
        if len(self._plans) > self.max_users:
            del self._plans[next(iter(self._plans))]
