"""Races of the charge saga forced in order by holding row locks, against the real services:
whatever the order, a debit is never left behind a job nobody can see."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.generation_support import GenerationStub, TokenStub, balance, job_request, references


async def waiting_on_a_lock(admin: asyncpg.Connection, fragment: str) -> None:
    """Until some backend waits for a row lock in a statement containing fragment."""
    for _ in range(500):
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
            f"%{fragment}%",
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing waits on a lock in {fragment!r}")


async def charged_and_visible(
    generation: GenerationStub, admin: asyncpg.Connection, user_id: str, job_id: str
) -> tuple[int, int, bool]:
    """(debits, refunds, visible) of one job."""
    refs = await references(admin, user_id)
    try:
        await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job_id))
        visible = True
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        visible = False
    return refs[job_id], refs[f"{job_id}:refund"], visible


@pytest.mark.slow
async def test_refusal_racing_a_parallel_retry_strands_no_charge(
    generation: GenerationStub, token: TokenStub, admin: asyncpg.Connection, database_url: str
) -> None:
    """Q is refused (50 tokens, cost 100); 100 tokens arrive; P, a parallel retry of the same
    request, runs out of deadline while Q has not yet recorded its refusal."""
    user_id = await support.user_with_balance(token, 50)
    request = job_request(user_id, cost=100)
    job_id = uuid.UUID(request.job_id)
    account_lock, job_lock = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        # Q's debit waits behind the account, then is refused; its refusal waits behind the job row.
        account_tx = account_lock.transaction()
        await account_tx.start()
        await account_lock.execute("SELECT FROM token.token_account WHERE user_id = $1 FOR UPDATE", uuid.UUID(user_id))
        q = asyncio.ensure_future(generation.CreateGenerationJob(request))
        await waiting_on_a_lock(admin, "append_entry")
        job_tx = job_lock.transaction()
        await job_tx.start()
        await job_lock.execute("SELECT FROM generation.generation_job WHERE id = $1 FOR UPDATE", job_id)
        await account_tx.rollback()
        await waiting_on_a_lock(admin, "REJECTED")
        await token.AppendLedgerEntry(
            tpb.AppendLedgerEntryRequest(
                user_id=user_id, delta=100, reason=tpb.LEDGER_REASON_PURCHASE, reference_id=f"buy-{uuid.uuid4()}"
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as p:
            await generation.CreateGenerationJob(request, timeout=1.0)
        assert p.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        await job_tx.rollback()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await q
        assert support.error_info(refused.value).reason == "INSUFFICIENT_TOKENS"
    finally:
        await account_lock.close()
        await job_lock.close()
    # Once the reconciler has had its turn, a charge is on a visible job or given back.
    await asyncio.sleep(4)
    debits, refunds, visible = await charged_and_visible(generation, admin, user_id, request.job_id)
    assert debits == 0 or visible or refunds == debits, (debits, refunds, visible)
    # The caller's retry charges it once, whatever happened before.
    retried = await generation.CreateGenerationJob(request)
    assert retried.job.status == gpb.JOB_STATUS_QUEUED
    assert await charged_and_visible(generation, admin, user_id, request.job_id) == (1, 0, True)
    assert await balance(token, user_id) == 50
