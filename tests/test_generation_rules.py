"""The pure parts: the state machine, refunds owed, the retry policy of calls to the token service,
and the owners' plans kept."""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from blumpo_common import retry
from blumpo_common.errors import ServiceError
from generation_service import rules
from generation_service.model import Job, JobState, RefundState
from generation_service.plans import PlanCache
from tests.support import expect_error


def test_state_machine_is_the_contracts() -> None:
    # RUNNING is entered only by a claim.
    assert rules.sources(JobState.RUNNING) == []
    assert rules.sources(JobState.FAILED) == [JobState.QUEUED, JobState.RUNNING]
    assert rules.sources(JobState.CANCELLED) == [JobState.RUNNING]
    assert rules.sources(JobState.ARCHIVED) == [JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED]
    assert rules.sources(JobState.QUEUED) == [JobState.PAUSED]
    # Internal statuses are never a source or a target of a caller's move.
    for source, target in rules.ALLOWED:
        assert {source, target} <= rules.VISIBLE
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.ARCHIVED, JobState.CANCELLED} == rules.TERMINAL
    for current in (JobState.SUCCEEDED, JobState.QUEUED, JobState.RUNNING):
        with pytest.raises(ServiceError) as refused:
            rules.refused_move(uuid.uuid4(), _job(current), JobState.RUNNING, None)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == "INVALID_TRANSITION"
        assert refused.value.metadata["current_status"] == current


def test_a_running_job_moves_only_under_its_live_lease() -> None:
    lease = uuid.uuid4()
    live = _job(JobState.RUNNING, lease_id=lease, lease_expires_at=datetime.now(UTC) + timedelta(minutes=1))
    ran_out = _job(JobState.RUNNING, lease_id=lease, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
    for job, given in ((live, None), (live, uuid.uuid4()), (ran_out, lease)):
        with pytest.raises(ServiceError) as refused:
            rules.refused_move(job.id, job, JobState.SUCCEEDED, given)
        assert refused.value.reason == "LEASE_LOST"
    # The worker's retry of a move that was applied is no change; another worker's is LEASE_LOST.
    done = _job(JobState.SUCCEEDED, lease_id=lease)
    assert rules.refused_move(done.id, done, JobState.SUCCEEDED, lease) is done
    with pytest.raises(ServiceError) as refused:
        rules.refused_move(done.id, done, JobState.SUCCEEDED, uuid.uuid4())
    assert refused.value.reason == "LEASE_LOST"
    with pytest.raises(ServiceError) as refused:
        rules.refused_move(live.id, live, JobState.CANCELLED, lease)
    assert refused.value.reason == "INVALID_TRANSITION", "no cancel was asked for"
    delivered = _job(JobState.RUNNING, lease_id=lease, lease_expires_at=live.lease_expires_at, has_assets=True)
    for target in (JobState.FAILED, JobState.CANCELLED):
        with pytest.raises(ServiceError) as refused:
            rules.refused_move(delivered.id, delivered, target, lease)
        assert refused.value.reason == "JOB_HAS_ASSETS"


def test_failures_and_cancels_owe_a_refund() -> None:
    assert [s for s in JobState if rules.owes_refund_on(s)] == [JobState.FAILED, JobState.CANCELLED]
    assert rules.refund_owed(_job(JobState.FAILED, RefundState.PENDING))
    assert not rules.refund_owed(_job(JobState.FAILED, RefundState.DONE))
    assert not rules.refund_owed(_job(JobState.SUCCEEDED))


def _job(status: JobState, refund: RefundState = RefundState.NONE, **changes: Any) -> Job:
    now = datetime.now(UTC)
    job = Job(
        id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        prompt="p",
        params={},
        tokens_cost=1,
        status=status,
        request_digest=b"",
        error_message=None,
        worker_id=None,
        lease_id=None,
        lease_expires_at=None,
        lost_leases=0,
        priority=0,
        progress_percent=0,
        progress_message="",
        cancel_requested=False,
        has_assets=False,
        refund_state=refund,
        pause_requested=False,
        claims=0,
        claimed_until=None,
        created_at=now,
        started_at=None,
        completed_at=None,
        updated_at=now,
    )
    return dataclasses.replace(job, **changes)


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


def test_plans_are_kept_for_their_time_and_the_oldest_makes_room() -> None:
    now = [0.0]
    plans = PlanCache(60, clock=lambda: now[0], max_users=2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    plans.put(a, "free")
    now[0] = 59.9
    assert plans.get(a) == "free"
    now[0] = 60.0
    assert plans.get(a) is None  # told a minute ago: asked again
    plans.put(a, "pro")
    plans.put(b, "free")
    plans.put(a, "pro")  # told again: the newest
    plans.put(c, "free")
    assert (plans.get(a), plans.get(b), plans.get(c)) == ("pro", None, "free")
    off = PlanCache(0)
    off.put(a, "free")
    assert off.get(a) is None
