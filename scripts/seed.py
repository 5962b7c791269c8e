"""Development data, made through the services' own RPCs; safe to run again.

`make seed` (python -m scripts.seed) talks to the token service at TOKEN_SERVICE_ADDR and
the generation service at GENERATION_SERVICE_ADDR; unset, to where TOKEN_LISTEN_ADDR and
GENERATION_LISTEN_ADDR put them (default 127.0.0.1:50051 and 127.0.0.1:50052), as `make run`
serves them (`make seed` starts a pair for the while when they are not running).

Everything is keyed: fixed emails, ledger references and uuid5 job/asset ids, so a
second run finds what the first made (replays, same-request answers, ALREADY_EXISTS)
and changes nothing.

The jobs are of the model blumpo-diffusion-v1, priced by the service's price list, each
at the price the seed expects (PRICE_CHANGED if the list says otherwise). The seed is the
worker of the jobs it moves past QUEUED: it claims each (a claim of that model only), under
a lease of an hour. The RUNNING job is left so; when its lease runs out the service's sweep
puts it back in the queue, as it would for a worker that died.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
from google.protobuf import struct_pb2

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common.config import ConfigError
from scripts import services

TokenStub: TypeAlias = "token_pb2_grpc.TokenServiceAsyncStub"
GenerationStub: TypeAlias = "generation_pb2_grpc.GenerationServiceAsyncStub"

NAMESPACE = uuid.UUID("7b0f3c2e-5d1a-4c8e-9f6b-2a4d8e1c3b5f")
CALL_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 2.0
TEST_EMAIL = "test@blumpo.dev"
FREE_EMAIL = "free@blumpo.dev"
Status: TypeAlias = "gpb.JobStatus.ValueType"


def seed_id(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, name))


@dataclass(frozen=True)
class Grant:
    delta: int
    reason: tpb.LedgerReason.ValueType
    reference_id: str


@dataclass(frozen=True)
class SeedUser:
    email: str
    plan: str
    grants: tuple[Grant, ...] = ()


@dataclass(frozen=True)
class Variant:
    kind: gpb.VariantKind.ValueType
    width: int
    height: int
    bytes_size: int


MODEL = "blumpo-diffusion-v1"
LEASE_SECONDS = 3600
WORKER = "seed-worker"


@dataclass(frozen=True)
class SeedJob:
    name: str
    prompt: str
    target: Status
    # The price the seed expects for the job's steps (1024 x 1024 pixels, MODEL).
    tokens_cost: int = 10
    steps: int = 30
    # An asset (with these variants) is attached while the job runs.
    variants: tuple[Variant, ...] | None = None
    error_message: str = ""


USERS = (
    SeedUser(
        TEST_EMAIL,
        "pro",
        (
            Grant(500, tpb.LEDGER_REASON_ADJUSTMENT, "seed:welcome-tokens"),
            Grant(250, tpb.LEDGER_REASON_PURCHASE, "seed:purchase-0001"),
        ),
    ),
    SeedUser(FREE_EMAIL, "free"),
)

THUMB = Variant(gpb.VARIANT_KIND_THUMBNAIL, 256, 256, 18_432)
WEB = Variant(gpb.VARIANT_KIND_WEB, 1024, 1024, 262_144)
PRINT = Variant(gpb.VARIANT_KIND_PRINT, 4096, 4096, 4_194_304)

JOBS = (
    SeedJob(
        "lighthouse", "A lighthouse on a cliff at dawn, watercolour", gpb.JOB_STATUS_SUCCEEDED, 10, 30, (THUMB, WEB)
    ),
    SeedJob("fox", "A red fox in fresh snow, studio photo", gpb.JOB_STATUS_SUCCEEDED, 20, 68, (THUMB, WEB, PRINT)),
    SeedJob("city", "A neon city street in the rain, cinematic", gpb.JOB_STATUS_RUNNING, 10),
    SeedJob("garden", "A Japanese garden in autumn, isometric", gpb.JOB_STATUS_QUEUED, 10),
    SeedJob("robot", "A tin robot reading a book, pixel art", gpb.JOB_STATUS_PAUSED, 10),
    SeedJob(
        "storm",
        "A thunderstorm over wheat fields",
        gpb.JOB_STATUS_FAILED,
        10,
        30,
        error_message="seed: model timed out",
    ),
)

# The moves from QUEUED to each status the seed uses, along the allowed transitions
# (RUNNING: the seed's worker claims the job).
PATHS: dict[Status, list[Status]] = {
    gpb.JOB_STATUS_QUEUED: [],
    gpb.JOB_STATUS_RUNNING: [gpb.JOB_STATUS_RUNNING],
    gpb.JOB_STATUS_SUCCEEDED: [gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED],
    gpb.JOB_STATUS_FAILED: [gpb.JOB_STATUS_FAILED],
    gpb.JOB_STATUS_PAUSED: [gpb.JOB_STATUS_PAUSED],
}


@dataclass
class Summary:
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


async def reachable(channel: grpc.aio.Channel, timeout: float = CONNECT_TIMEOUT_SECONDS) -> bool:
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except (TimeoutError, grpc.aio.AioRpcError):
        return False
    return True


async def ensure_user(token: TokenStub, user: SeedUser, out: Summary) -> tpb.User:
    try:
        created = await token.CreateUser(
            tpb.CreateUserRequest(email=user.email, plan=user.plan), timeout=CALL_TIMEOUT_SECONDS
        )
        found, verb = created.user, "created"
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        lookup = await token.GetUser(tpb.GetUserRequest(email=user.email), timeout=CALL_TIMEOUT_SECONDS)
        found, verb = lookup.user, "found"
    if found.account.plan != user.plan:
        await token.ChangePlan(
            tpb.ChangePlanRequest(user_id=found.user_id, plan=user.plan), timeout=CALL_TIMEOUT_SECONDS
        )
    for grant in user.grants:
        await token.AppendLedgerEntry(
            tpb.AppendLedgerEntryRequest(
                user_id=found.user_id, delta=grant.delta, reason=grant.reason, reference_id=grant.reference_id
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    fresh = await token.GetUser(tpb.GetUserRequest(user_id=found.user_id), timeout=CALL_TIMEOUT_SECONDS)
    out.say(
        f"user {user.email} ({verb}): id {fresh.user.user_id}, plan {fresh.user.account.plan}, "
        f"balance {fresh.user.account.balance}"
    )
    return fresh.user


async def ensure_job(generation: GenerationStub, user_id: str, job: SeedJob, out: Summary) -> None:
    job_id = seed_id(f"job:{job.name}")
    params = gpb.GenerationParams(width=1024, height=1024, steps=job.steps, seed=42, model=MODEL)
    params.extra.CopyFrom(struct_pb2.Struct(fields={"style": struct_pb2.Value(string_value="seed")}))
    created = await generation.CreateGenerationJob(
        gpb.CreateGenerationJobRequest(
            user_id=user_id, job_id=job_id, prompt=job.prompt, params=params, tokens_cost=job.tokens_cost
        ),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    status = created.job.status
    path = PATHS[job.target]
    # Only the moves still ahead of the job's current status, so a rerun moves nothing.
    ahead = path[path.index(status) + 1 :] if status in path else (path if status == gpb.JOB_STATUS_QUEUED else [])
    lease_id = created.job.lease_id
    for step in ahead:
        if step == gpb.JOB_STATUS_RUNNING:
            lease_id = await claim(generation, job_id)
            continue
        if step == gpb.JOB_STATUS_SUCCEEDED and job.variants is not None:
            await attach_asset(generation, user_id, job_id, job, lease_id, out)
        await generation.UpdateGenerationJobStatus(
            gpb.UpdateGenerationJobStatusRequest(
                job_id=job_id,
                status=step,
                error_message=job.error_message if step == gpb.JOB_STATUS_FAILED else "",
                worker_id=WORKER,
                lease_id=lease_id,
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    if not ahead and status == gpb.JOB_STATUS_SUCCEEDED and job.variants is not None:
        await attach_asset(generation, user_id, job_id, job, "", out)  # same data again: the same asset
    out.say(f"job {job.name}: id {job_id}, {gpb.JobStatus.Name(job.target)}")


async def claim(generation: GenerationStub, job_id: str) -> str:
    """Claims the seed's job as its worker; its lease id. The seed's model has no other jobs in
    the queue unless someone else made some: then this stops (the job claimed instead goes back
    to the queue when its lease runs out)."""
    claimed = await generation.ClaimNextJob(
        gpb.ClaimNextJobRequest(worker_id=WORKER, lease_seconds=LEASE_SECONDS, models=[MODEL]),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    if claimed.job.job_id != job_id:
        raise QueueTaken(
            f"the queue of {MODEL} holds other jobs than the seed's (claimed {claimed.job.job_id or 'none'})"
        )
    return claimed.job.lease_id


async def attach_asset(
    generation: GenerationStub, user_id: str, job_id: str, job: SeedJob, lease_id: str, out: Summary
) -> None:
    asset_id = seed_id(f"asset:{job.name}")
    base = f"users/{user_id}/jobs/{job_id}"
    await generation.AttachAssetToJob(
        gpb.AttachAssetToJobRequest(
            job_id=job_id,
            user_id=user_id,
            lease_id=lease_id,
            asset=gpb.AssetInput(
                asset_id=asset_id,
                title=job.prompt.split(",")[0],
                storage_key=f"{base}/original.webp",
                mime_type="image/webp",
                bytes_size=1_048_576,
                width=1024,
                height=1024,
                format=gpb.IMAGE_FORMAT_WEBP,
            ),
        ),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    for variant in job.variants or ():
        kind = gpb.VariantKind.Name(variant.kind).removeprefix("VARIANT_KIND_").lower()
        try:
            await generation.AddAssetVariant(
                gpb.AddAssetVariantRequest(
                    asset_id=asset_id,
                    user_id=user_id,
                    lease_id=lease_id,
                    kind=variant.kind,
                    storage_key=f"{base}/{kind}.webp",
                    mime_type="image/webp",
                    bytes_size=variant.bytes_size,
                    width=variant.width,
                    height=variant.height,
                    format=gpb.IMAGE_FORMAT_WEBP,
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    out.say(f"  asset {asset_id} with {len(job.variants or ())} variants")


async def seed(token_address: str, generation_address: str) -> Summary:
    out = Summary()
    async with (
        grpc.aio.insecure_channel(token_address) as token_channel,
        grpc.aio.insecure_channel(generation_address) as generation_channel,
    ):
        for address, channel in [(token_address, token_channel), (generation_address, generation_channel)]:
            if not await reachable(channel):
                raise Unreachable(f"no service answers at {address}: start both with `make run`")
        token = token_pb2_grpc.TokenServiceStub(token_channel)
        users = [await ensure_user(token, user, out) for user in USERS]
        generation = generation_pb2_grpc.GenerationServiceStub(generation_channel)
        for job in JOBS:
            await ensure_job(generation, users[0].user_id, job, out)
    return out


class Unreachable(Exception):
    pass


class QueueTaken(Exception):
    pass


async def main() -> int:
    try:
        listening = services.configured(os.environ)
    except ConfigError as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 2
    token_address = os.environ.get("TOKEN_SERVICE_ADDR") or services.dialable(listening.token)
    generation_address = os.environ.get("GENERATION_SERVICE_ADDR") or services.dialable(listening.generation)
    try:
        await seed(token_address, generation_address)
    except (Unreachable, QueueTaken) as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as error:
        print(f"seed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
