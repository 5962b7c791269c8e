"""Calling another gRPC service: a deadline on every attempt, retries with backoff.

Only UNAVAILABLE and DEADLINE_EXCEEDED are retried: they say the call may not have
reached the service (or its answer was lost), so the same call is tried again. That
is safe only for idempotent calls, which is all this helper is for.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from blumpo_common import db

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Channel options for a client of another service: gRPC's default reconnect backoff grows to
# two minutes, during which calls fail fast; a peer that restarts should be reached in seconds.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


@dataclass(frozen=True)
class RetryPolicy:
    # Deadline of one attempt.
    attempt_timeout_seconds: float = 2.0
    max_attempts: int = 4
    # Bound on all attempts and the waits between them.
    total_timeout_seconds: float = 6.0
    initial_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 1.0


async def call(policy: RetryPolicy, attempt: Callable[[float], Awaitable[T]]) -> T:
    """Runs attempt(timeout_seconds) until it succeeds, fails for good, or the budget is spent.

    The budget is the policy's total, cut to what is left of the deadline of the
    call being served (if any); the last AioRpcError is raised when it runs out.
    """
    started = time.monotonic()
    end = started + policy.total_timeout_seconds
    served = db.call_deadline.get()
    if served is not None:
        end = min(end, served)
    backoff = policy.initial_backoff_seconds
    attempt_no = 0
    while True:
        attempt_no += 1
        remaining = end - time.monotonic()
        try:
            return await attempt(max(0.001, min(policy.attempt_timeout_seconds, remaining)))
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or attempt_no >= policy.max_attempts:
                raise
            # Full jitter: spreads the retries of many callers hit by one outage.
            delay = random.uniform(0, backoff)
            if time.monotonic() + delay >= end:
                raise
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, policy.max_backoff_seconds)
