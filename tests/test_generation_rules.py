"""The pure parts: the state machine table and the retry policy of calls to the token service."""

from __future__ import annotations

import time

import grpc
import pytest

from blumpo_common import retry
from generation_service import lifecycle
from tests.support import expect_error


def test_state_machine_is_the_contracts() -> None:
    assert lifecycle.sources(lifecycle.RUNNING) == [lifecycle.QUEUED]
    assert lifecycle.sources(lifecycle.FAILED) == [lifecycle.QUEUED, lifecycle.RUNNING]
    assert lifecycle.sources(lifecycle.ARCHIVED) == [lifecycle.FAILED, lifecycle.SUCCEEDED]
    assert lifecycle.sources(lifecycle.QUEUED) == [lifecycle.PAUSED]
    # Internal statuses are never a source or a target of a caller's move.
    assert {status for move in lifecycle.ALLOWED for status in move} <= set(lifecycle.VISIBLE)
    assert {lifecycle.SUCCEEDED, lifecycle.FAILED, lifecycle.ARCHIVED} == lifecycle.TERMINAL
    error = lifecycle.invalid_transition("j", lifecycle.SUCCEEDED, lifecycle.RUNNING)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "INVALID_TRANSITION"


def _error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name, debug_error_string=""
    )


class Flaky:
    """Fails with the given codes, then answers."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.timeouts: list[float] = []

    async def __call__(self, timeout: float) -> str:
        self.timeouts.append(timeout)
        if self.codes:
            raise _error(self.codes.pop(0))
        return "ok"


POLICY = retry.RetryPolicy(
    attempt_timeout_seconds=0.5, max_attempts=4, total_timeout_seconds=2.0, initial_backoff_seconds=0.01
)


async def test_retries_unavailable_and_deadline_exceeded() -> None:
    attempt = Flaky(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert await retry.call(POLICY, attempt) == "ok"
    assert len(attempt.timeouts) == 3
    assert all(0 < t <= 0.5 for t in attempt.timeouts)


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED],
)
async def test_other_codes_are_not_retried(code: grpc.StatusCode) -> None:
    attempt = Flaky(code)
    await expect_error(retry.call(POLICY, attempt), code)
    assert len(attempt.timeouts) == 1


async def test_attempts_and_time_are_bounded() -> None:
    attempt = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(grpc.aio.AioRpcError):
        await retry.call(POLICY, attempt)
    assert len(attempt.timeouts) == POLICY.max_attempts
    slow = retry.RetryPolicy(
        attempt_timeout_seconds=5, max_attempts=100, total_timeout_seconds=0.3, initial_backoff_seconds=0.2
    )
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError):
        await retry.call(slow, Flaky(*[grpc.StatusCode.UNAVAILABLE] * 100))
    assert time.monotonic() - started < 0.5
