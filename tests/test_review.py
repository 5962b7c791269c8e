"""Review findings: each test here fails on the current code and shows one bug or contract deviation."""

from __future__ import annotations

import asyncio
import json
import unicodedata
import uuid
from datetime import timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from generation_service.charging import request_digest
from tests import support
from tests.generation_support import GenerationStub, TokenStub, balance, job_request


async def test_email_is_unicode_normalized_so_one_mailbox_is_one_user(token: TokenStub) -> None:
    """The same address in NFC and NFD form must not become two users (nor two OTP rate limits)."""
    local = f"jos\u00e9-{uuid.uuid4().hex[:8]}"
    composed = f"{local}@example.com"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    await token.CreateUser(tpb.CreateUserRequest(email=composed))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await token.CreateUser(tpb.CreateUserRequest(email=decomposed))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_refused_create_leaves_the_job_id_free_for_another_request(
    generation: GenerationStub, token: TokenStub
) -> None:
    """A rejected call writes nothing: after INSUFFICIENT_TOKENS the job id names no job, so a
    different request with that id (e.g. a cheaper one) must be judged as new, not ALREADY_EXISTS."""
    user_id = await support.user_with_balance(token, 5)
    job_id = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await generation.CreateGenerationJob(job_request(user_id, job_id=job_id, cost=50))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    job = (await generation.CreateGenerationJob(job_request(user_id, job_id=job_id, cost=3))).job
    assert job.status == gpb.JOB_STATUS_QUEUED
    assert await balance(token, user_id) == 2


async def test_extra_holding_a_literal_backslash_u0000_is_not_a_nul(
    generation: GenerationStub, token: TokenStub
) -> None:
    """params.extra may hold any text without NUL; the six characters `\\u0000` are not a NUL."""
    user_id = await support.user_with_balance(token, 10)
    request = job_request(user_id)
    request.params.extra.update({"pattern": "match \\u0000 literally"})
    job = (await generation.CreateGenerationJob(request)).job
    assert job.params.extra["pattern"] == "match \\u0000 literally"


async def test_refund_of_a_failed_job_is_not_lost_to_the_balance_limit(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    """Entering FAILED refunds the cost exactly once. A credit that lands between the debit and
    the failure and fills the account to the 10^15 cap must not make the refund impossible."""
    cap = 10**15
    user_id = await support.user_with_balance(token, 100)
    fill = cap - 100 - 5
    deltas = [10**12] * (fill // 10**12) + ([fill % 10**12] if fill % 10**12 else [])
    results = (
        await token.AppendLedgerEntries(
            tpb.AppendLedgerEntriesRequest(
                entries=[
                    tpb.AppendLedgerEntryRequest(
                        user_id=user_id, delta=d, reason=tpb.LEDGER_REASON_PURCHASE, reference_id=f"fill-{i}"
                    )
                    for i, d in enumerate(deltas)
                ]
            )
        )
    ).results
    assert all(r.status.code == 0 for r in results)
    assert await balance(token, user_id) == cap - 5
    job = (await generation.CreateGenerationJob(job_request(user_id, cost=5))).job
    await token.AppendLedgerEntry(
        tpb.AppendLedgerEntryRequest(
            user_id=user_id, delta=10, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="top-up"
        )
    )
    assert await balance(token, user_id) == cap
    await generation.UpdateGenerationJobStatus(
        gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=gpb.JOB_STATUS_FAILED, error_message="gpu lost")
    )
    refunds = await admin.fetchval(
        "SELECT count(*) FROM token.token_ledger WHERE user_id = $1 AND reference_id = $2",
        uuid.UUID(user_id),
        f"{job.job_id}:refund",
    )
    assert refunds == 1, "the failed job's cost was never given back"
    # Spend it back down, so the account takes the allowances other tests credit to every account.
    excess = await balance(token, user_id) - 100
    await token.AppendLedgerEntries(
        tpb.AppendLedgerEntriesRequest(
            entries=[
                tpb.AppendLedgerEntryRequest(
                    user_id=user_id,
                    delta=-min(10**12, excess - n),
                    reason=tpb.LEDGER_REASON_ADJUSTMENT,
                    reference_id=f"spend-{n}",
                )
                for n in range(0, excess, 10**12)
            ]
        )
    )
    assert await balance(token, user_id) == 100


async def test_emergency_pause_does_not_skip_a_queued_job_that_is_momentarily_locked(
    generation: GenerationStub, token: TokenStub, database_url: str
) -> None:
    """PauseQueuedJobs is the emergency disable: every QUEUED job created after the cutoff must end
    PAUSED. A job whose row is briefly locked by another call (here FOR SHARE, as a concurrent
    AttachAssetToJob takes it) is silently skipped by SKIP LOCKED, reported as done, and stays runnable."""
    user_id = await support.user_with_balance(token, 10)
    job = (await generation.CreateGenerationJob(job_request(user_id))).job
    cutoff = Timestamp()
    cutoff.FromDatetime(job.created_at.ToDatetime() - timedelta(microseconds=1))
    other = await asyncpg.connect(database_url)
    try:
        locked = other.transaction()
        await locked.start()
        await other.execute("SELECT 1 FROM generation.generation_job WHERE id = $1 FOR SHARE", uuid.UUID(job.job_id))

        async def pause() -> gpb.PauseQueuedJobsResponse:
            return await generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=cutoff))

        pausing = asyncio.create_task(pause())
        await asyncio.sleep(0.5)
        await locked.rollback()
        paused = (await pausing).paused
    finally:
        await other.close()
    after = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job.job_id))).job
    assert (paused, after.status) == (1, gpb.JOB_STATUS_PAUSED)


async def test_emergency_pause_catches_a_job_whose_charge_was_in_flight(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection
) -> None:
    """A create whose charge is in flight when PauseQueuedJobs runs (here: an intent its caller
    abandoned, finished later by the reconciler) becomes QUEUED after the pause and escapes it."""
    user_id = await support.user_with_balance(token, 10)
    request = job_request(user_id, cost=2)
    params = {"width": 1024, "height": 768, "steps": 30, "seed": 42, "model": "sdxl", "extra": {}}
    digest = request_digest(uuid.UUID(user_id), request.prompt, params, 2)
    created = await admin.fetchval(
        "INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest,"
        " updated_at) VALUES ($1, $2, $3, $4::jsonb, 2, 'CHARGING', $5, now() - interval '1 minute')"
        " RETURNING created_at",
        uuid.UUID(request.job_id),
        uuid.UUID(user_id),
        request.prompt,
        json.dumps(params),
        digest,
    )
    cutoff = Timestamp()
    cutoff.FromDatetime(created - timedelta(microseconds=1))
    await generation.PauseQueuedJobs(gpb.PauseQueuedJobsRequest(created_after=cutoff))
    for _ in range(50):  # the reconciler settles the intent within a few of its passes
        status = await admin.fetchval(
            "SELECT status FROM generation.generation_job WHERE id = $1", uuid.UUID(request.job_id)
        )
        if status != "CHARGING":
            break
        await asyncio.sleep(0.2)
    job = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=request.job_id))).job
    assert job.status == gpb.JOB_STATUS_PAUSED, "a job created after the cutoff became QUEUED after the pause"


async def test_monthly_refill_refuses_a_period_in_the_future(token: TokenStub, admin: asyncpg.Connection) -> None:
    """Each period is credited once; a period years ahead is not a month to credit now, else a caller
    can pay every account up to 95,000 future allowances today (one call per month up to 9999-12)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="9999-12"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert support.bad_fields(raised.value) == ["period"]
    written = await admin.fetchval("SELECT count(*) FROM token.token_ledger WHERE reference_id = 'refill:9999-12'")
    assert written == 0
