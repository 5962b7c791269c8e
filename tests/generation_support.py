"""Helpers for the generation service's tests: requests, ledger checks, queue draining."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter

import asyncpg

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from tests.support import GenerationStub, TokenStub

__all__ = ["GenerationStub", "TokenStub"]

# The tests' price list and plans, added to their databases: model flat-N costs N tokens
# whatever the size; each lane-N costs a token per megapixel-step, and running_job gives each
# job a lane of its own, so that a claim of that lane takes that very job. Plans run as many
# jobs at once as the tests start (the cap's own tests use a plan of their own).
MAX_FLAT_PRICE = 1000
LANES = 20_000
TEST_PRICES_SQL = f"""
INSERT INTO generation.model_price (model, base_tokens, tokens_per_megapixel_step)
SELECT 'flat-' || n, n, 0 FROM generate_series(1, {MAX_FLAT_PRICE}) AS n;
INSERT INTO generation.model_price (model, base_tokens, tokens_per_megapixel_step)
SELECT 'lane-' || n, 0, 1 FROM generate_series(1, {LANES}) AS n;
UPDATE generation.plan_limit SET max_running_jobs = 100000;
"""
_lanes = itertools.count(1)


async def add_test_prices(url: str) -> None:
    """The tests' price list and plans, on a database migrated outside the shared template."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(TEST_PRICES_SQL)
    finally:
        await conn.close()


def flat_model(cost: int) -> str:
    """A model of the tests' price list that costs exactly cost tokens."""
    assert 1 <= cost <= MAX_FLAT_PRICE, cost
    return f"flat-{cost}"


def params_costing(cost: int) -> gpb.GenerationParams:
    return gpb.GenerationParams(width=1024, height=768, steps=30, seed=42, model=flat_model(cost))


def job_request(
    user_id: str, job_id: str | None = None, cost: int = 1, prompt: str = "a lighthouse at dusk"
) -> gpb.CreateGenerationJobRequest:
    """A create request for a job that costs cost tokens, naming its price as the caller expects it."""
    return gpb.CreateGenerationJobRequest(
        user_id=user_id,
        job_id=job_id or str(uuid.uuid4()),
        prompt=prompt,
        params=params_costing(cost),
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


async def claim(
    generation: GenerationStub, worker_id: str = "worker", models: tuple[str, ...] = (), lease_seconds: int = 300
) -> gpb.Job | None:
    """The job a worker claims next, with its lease; None when there is none for it."""
    reply = await generation.ClaimNextJob(
        gpb.ClaimNextJobRequest(worker_id=worker_id, lease_seconds=lease_seconds, models=models)
    )
    return reply.job if reply.HasField("job") else None


def lane_request(user_id: str, cost: int = 1) -> gpb.CreateGenerationJobRequest:
    """A create request for a job alone in the queue of a model of its own (a lane), so that a
    claim of that model takes this very job. A lane costs a token per megapixel-step."""
    request = job_request(user_id, cost=cost)
    request.params.CopyFrom(
        gpb.GenerationParams(width=1000, height=1000, steps=cost, seed=42, model=f"lane-{next(_lanes)}")
    )
    return request


async def lane_job(generation: GenerationStub, user_id: str, cost: int = 1) -> gpb.Job:
    """A new QUEUED job of the user in a lane of its own."""
    return (await generation.CreateGenerationJob(lane_request(user_id, cost))).job


async def claim_this(
    generation: GenerationStub, job: gpb.Job, worker_id: str = "worker", lease_seconds: int = 300
) -> gpb.Job:
    """Claims a lane job: RUNNING, with its lease."""
    claimed = await claim(generation, worker_id, (job.params.model,), lease_seconds)
    assert claimed is not None and claimed.job_id == job.job_id, (job, claimed)
    return claimed


async def running_job(
    generation: GenerationStub, user_id: str, cost: int = 1, worker_id: str = "worker", lease_seconds: int = 300
) -> gpb.Job:
    """A new job of the user, claimed by a worker: RUNNING, with its lease."""
    return await claim_this(generation, await lane_job(generation, user_id, cost), worker_id, lease_seconds)


async def finish(generation: GenerationStub, job: gpb.Job, status: int, error_message: str = "") -> gpb.Job:
    """Moves a job its worker holds (job.lease_id) to status."""
    request = gpb.UpdateGenerationJobStatusRequest(
        job_id=job.job_id,
        status=status,  # type: ignore[arg-type]
        error_message=error_message,
        worker_id=job.worker_id,
        lease_id=job.lease_id,
    )
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


# How long owed refunds may take to be paid: a call's own refund that the token service did
# not confirm in time (a loaded machine) is paid by the reconciler's next pass.
SETTLE_SECONDS = 15.0


async def refunds_paid(admin: asyncpg.Connection, users: list[str]) -> None:
    """Waits (a bounded while) until no refund of the users' jobs is owed any more."""
    ids = [uuid.UUID(u) for u in users]
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    owed = "SELECT count(*) FROM generation.generation_job WHERE user_id = ANY($1::uuid[]) AND refund_state = 'PENDING'"
    while await admin.fetchval(owed, ids):
        if asyncio.get_running_loop().time() > deadline:
            return  # the caller's checks name the job whose refund is missing
        await asyncio.sleep(0.2)


async def ledger_matches_jobs(admin: asyncpg.Connection, token: TokenStub, users: list[str]) -> None:
    """Once the users' owed refunds are paid: each job of the users has exactly the debit and
    refund its state calls for, every generation entry has its job, and each balance agrees
    with the ledger."""
    await refunds_paid(admin, users)
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
        elif job["status"] in ("FAILED", "CANCELLED"):
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
