"""The seed script: what it makes through the token service, and that a rerun changes nothing."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from scripts import seed

UNREACHABLE = "127.0.0.1:9"


async def ledger_of(admin: asyncpg.Connection, email: str) -> list[tuple[str, int]]:
    rows = await admin.fetch(
        "SELECT l.reference_id, l.delta FROM token.token_ledger l JOIN token.app_user u ON u.id = l.user_id "
        "WHERE u.email = $1 ORDER BY l.seq",
        email,
    )
    return [(r["reference_id"], r["delta"]) for r in rows]


async def test_seed_twice_makes_the_same_users_and_tokens_once(token_address: str, admin: asyncpg.Connection) -> None:
    first = await seed.seed(token_address, UNREACHABLE, connect_timeout=0.2)
    ledger = await ledger_of(admin, seed.TEST_EMAIL)
    assert ledger == [("signup", 100), ("seed:welcome-tokens", 500), ("seed:purchase-0001", 250)]
    assert any("plan pro, balance 850" in line for line in first.lines)
    assert "generation service not reachable" in first.lines[-1]

    second = await seed.seed(token_address, UNREACHABLE, connect_timeout=0.2)
    assert await ledger_of(admin, seed.TEST_EMAIL) == ledger
    assert [line.replace("(found)", "(created)") for line in second.lines] == first.lines
    plans = await admin.fetch(
        "SELECT u.email, a.plan_code FROM token.app_user u JOIN token.token_account a ON a.user_id = u.id "
        "WHERE u.email = ANY($1) ORDER BY 1",
        [seed.TEST_EMAIL, seed.FREE_EMAIL],
    )
    assert [(r["email"], r["plan_code"]) for r in plans] == [(seed.FREE_EMAIL, "free"), (seed.TEST_EMAIL, "pro")]


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Just the contract rules the seed relies on, in memory: the generation service
    is built on another branch, and this checks the seed's calls against its stubs."""

    ALLOWED = frozenset(
        {
            (gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_RUNNING),
            (gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_PAUSED),
            (gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED),
            (gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_FAILED),
        }
    )

    def __init__(self) -> None:
        self.jobs: dict[str, gpb.Job] = {}
        self.assets: dict[str, gpb.AssetInput] = {}
        self.variants: dict[tuple[str, int], gpb.AddAssetVariantRequest] = {}
        self.changes = 0

    async def CreateGenerationJob(self, request: Any, context: Any) -> gpb.CreateGenerationJobResponse:
        job = self.jobs.setdefault(
            request.job_id,
            gpb.Job(job_id=request.job_id, user_id=request.user_id, status=gpb.JOB_STATUS_QUEUED),
        )
        return gpb.CreateGenerationJobResponse(job=job)

    async def UpdateGenerationJobStatus(self, request: Any, context: Any) -> gpb.UpdateGenerationJobStatusResponse:
        job = self.jobs[request.job_id]
        if job.status != request.status:
            if (job.status, request.status) not in self.ALLOWED:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")
            job.status = request.status
            self.changes += 1
        return gpb.UpdateGenerationJobStatusResponse(job=job)

    async def AttachAssetToJob(self, request: Any, context: Any) -> gpb.AttachAssetToJobResponse:
        job = self.jobs[request.job_id]
        if job.status not in (gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "job not running")
        if self.assets.setdefault(request.asset.asset_id, request.asset) != request.asset:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "other asset")
        return gpb.AttachAssetToJobResponse(asset=gpb.Asset(asset_id=request.asset.asset_id, job_id=job.job_id))

    async def AddAssetVariant(self, request: Any, context: Any) -> gpb.AddAssetVariantResponse:
        if self.variants.setdefault((request.asset_id, request.kind), request) != request:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "other variant")
        return gpb.AddAssetVariantResponse(variant=gpb.AssetVariant(asset_id=request.asset_id, kind=request.kind))


async def test_seed_makes_jobs_in_several_states_with_assets_once(token_address: str) -> None:
    fake = FakeGeneration()  # type: ignore[abstract]  # implements only what the seed calls
    grpc_server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        await seed.seed(token_address, f"127.0.0.1:{port}")
        statuses = {job_id: job.status for job_id, job in fake.jobs.items()}
        assert statuses == {seed.seed_id(f"job:{job.name}"): job.target for job in seed.JOBS}
        assert len(fake.assets) == 2 and len(fake.variants) == 5
        changes = fake.changes
        await seed.seed(token_address, f"127.0.0.1:{port}")
        assert fake.changes == changes
        assert {job_id: job.status for job_id, job in fake.jobs.items()} == statuses
    finally:
        await grpc_server.stop(0)
