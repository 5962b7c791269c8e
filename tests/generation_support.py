"""Helpers for the generation service's tests: requests, ledger checks, queue draining."""

from __future__ import annotations

import uuid
from collections import Counter

import asyncpg

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from tests.support import GenerationStub, TokenStub

__all__ = ["GenerationStub", "TokenStub"]


def job_request(
    user_id: str, job_id: str | None = None, cost: int = 1, prompt: str = "a lighthouse at dusk"
) -> gpb.CreateGenerationJobRequest:
    return gpb.CreateGenerationJobRequest(
        user_id=user_id,
        job_id=job_id or str(uuid.uuid4()),
        prompt=prompt,
        params=gpb.GenerationParams(width=1024, height=768, steps=30, seed=42, model="sdxl"),
        tokens_cost=cost,
    )


def asset_input(
    asset_id: str | None = None, fmt: int = gpb.IMAGE_FORMAT_WEBP, mime: str = "image/webp"
) -> gpb.AssetInput:
    return gpb.AssetInput(
        asset_id=asset_id or str(uuid.uuid4()),
        title="Lighthouse",
        storage_key=f"users/u/jobs/j/{uuid.uuid4()}.webp",
        mime_type=mime,
        bytes_size=524288,
        width=1024,
        height=768,
        format=fmt,  # type: ignore[arg-type]
    )


async def create_job(generation: GenerationStub, user_id: str, cost: int = 1) -> gpb.Job:
    return (await generation.CreateGenerationJob(job_request(user_id, cost=cost))).job


async def running_job(generation: GenerationStub, user_id: str, cost: int = 1) -> gpb.Job:
    job = await create_job(generation, user_id, cost)
    request = gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=gpb.JOB_STATUS_RUNNING)
    return (await generation.UpdateGenerationJobStatus(request)).job


async def balance(token: TokenStub, user_id: str) -> int:
    return (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance


async def references(admin: asyncpg.Connection, user_id: str) -> Counter[str]:
    """How many ledger entries each generation reference of a user has."""
    rows = await admin.fetch(
        "SELECT reference_id FROM token.token_ledger WHERE user_id = $1 AND reason LIKE 'GENERATION%'",
        uuid.UUID(user_id),
    )
    return Counter(r["reference_id"] for r in rows)


async def no_mismatches(token: TokenStub, user_id: str = "") -> None:
    checked = await token.CheckBalances(tpb.CheckBalancesRequest(user_id=user_id))
    assert checked.accounts_checked >= 1
    assert list(checked.mismatches) == []


async def drain_queue(generation: GenerationStub, limit: int = 10_000) -> int:
    """Claims every QUEUED job the module's earlier tests left, for a test that needs an empty queue."""
    for drained in range(limit):
        claim = await generation.ClaimNextJob(gpb.ClaimNextJobRequest(worker_id="drain", lease_seconds=3600))
        if not claim.HasField("job"):
            return drained
    raise AssertionError("the queue did not drain")


async def ledger_matches_jobs(admin: asyncpg.Connection, token: TokenStub, users: list[str]) -> None:
    """Each job of the users has exactly the debit and refund its state calls for, every generation
    entry has its job, and each balance agrees with the ledger."""
    jobs = await admin.fetch(
        "SELECT id::text AS id, status, tokens_cost FROM generation.generation_job WHERE user_id = ANY($1::uuid[])",
        [uuid.UUID(u) for u in users],
    )
    entries = await admin.fetch(
        "SELECT reference_id, delta, reason FROM token.token_ledger"
        " WHERE user_id = ANY($1::uuid[]) AND reason LIKE 'GENERATION%'",
        [uuid.UUID(u) for u in users],
    )
    by_ref: dict[str, list[asyncpg.Record]] = {}
    for entry in entries:
        by_ref.setdefault(entry["reference_id"], []).append(entry)
    job_ids = {j["id"] for j in jobs}
    for job in jobs:
        debits = by_ref.get(job["id"], [])
        refunds = by_ref.get(f"{job['id']}:refund", [])
        if job["status"] == "REJECTED":
            assert (debits, refunds) == ([], []), job
        elif job["status"] == "FAILED":
            assert [d["delta"] for d in debits] == [-job["tokens_cost"]], job
            assert [r["delta"] for r in refunds] == [job["tokens_cost"]], job
        else:
            assert job["status"] in ("QUEUED", "RUNNING", "SUCCEEDED"), job
            assert [d["delta"] for d in debits] == [-job["tokens_cost"]], job
            assert refunds == [], job
    for reference in by_ref:
        assert reference.removesuffix(":refund") in job_ids, f"ledger entry {reference} has no job"
    for user_id in users:
        await no_mismatches(token, user_id)
