"""The GenerationService servicer: validates requests, calls the saga or the store, builds responses."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from blumpo.generation.v1 import generation_pb2 as pb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo_common import pagination
from blumpo_common.errors import ServiceError
from blumpo_common.server import Context
from blumpo_common.timestamps import from_proto, to_proto
from blumpo_common.validation import Checker
from generation_service import lifecycle
from generation_service.charging import Charger, request_digest
from generation_service.store import AssetFields, AssetWithVariants, NewJob, Store
from generation_service.watch import Hub, WatcherLimitError

ERROR_DOMAIN = "blumpo.generation"
MAX_PROMPT = 4000
MAX_ERROR_MESSAGE = 2000
MAX_TOKENS_COST = 10**12
MAX_EXTRA_BYTES = 16 * 1024
MAX_IMAGE_SIDE = 16384
MAX_BYTES_SIZE = 10**12
DEFAULT_ARCHIVE_DAYS = 90

STATUSES: dict[int, str] = {
    pb.JOB_STATUS_QUEUED: lifecycle.QUEUED,
    pb.JOB_STATUS_RUNNING: lifecycle.RUNNING,
    pb.JOB_STATUS_SUCCEEDED: lifecycle.SUCCEEDED,
    pb.JOB_STATUS_FAILED: lifecycle.FAILED,
    pb.JOB_STATUS_ARCHIVED: lifecycle.ARCHIVED,
    pb.JOB_STATUS_PAUSED: lifecycle.PAUSED,
}
STATUS_VALUES = {name: value for value, name in STATUSES.items()}
FORMATS: dict[int, str] = {
    pb.IMAGE_FORMAT_WEBP: "WEBP",
    pb.IMAGE_FORMAT_PNG: "PNG",
    pb.IMAGE_FORMAT_JPEG: "JPEG",
    pb.IMAGE_FORMAT_AVIF: "AVIF",
}
FORMAT_VALUES = {name: value for value, name in FORMATS.items()}
MIME_TYPES = {"WEBP": "image/webp", "PNG": "image/png", "JPEG": "image/jpeg", "AVIF": "image/avif"}
KINDS: dict[int, str] = {
    pb.VARIANT_KIND_THUMBNAIL: "THUMBNAIL",
    pb.VARIANT_KIND_WEB: "WEB",
    pb.VARIANT_KIND_PRINT: "PRINT",
}
KIND_VALUES = {name: value for value, name in KINDS.items()}


# Requests to domain values.


def check_params(check: Checker, params: pb.GenerationParams) -> dict[str, Any]:
    check.in_range("params.width", params.width, 64, 4096)
    check.in_range("params.height", params.height, 64, 4096)
    check.in_range("params.steps", params.steps, 1, 200)
    check.text("params.model", params.model, max_len=200, min_len=0)
    extra: dict[str, Any] = {}
    try:
        extra = json_format.MessageToDict(params.extra)
        serialized = json.dumps(extra, allow_nan=False)
    except ValueError:
        check.add("params.extra", "must hold finite numbers only")
    else:
        if len(serialized) > MAX_EXTRA_BYTES:
            check.add("params.extra", f"must serialize to at most {MAX_EXTRA_BYTES} bytes of JSON")
        elif _holds_nul(extra):
            check.add("params.extra", "must not contain NUL characters")
    return {
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "seed": params.seed,
        "model": params.model,
        "extra": extra,
    }


def _holds_nul(value: object) -> bool:
    """Whether a decoded JSON value has a NUL in a key or a string (PostgreSQL jsonb cannot store one)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def check_free_text(check: Checker, field: str, value: str, max_len: int, min_len: int) -> str:
    """Text that may hold line breaks and tabs, but no NUL (PostgreSQL text cannot store it)."""
    check.text(field, value, max_len=max_len, min_len=min_len, printable=False)
    if "\x00" in value:
        check.add(field, "must not contain NUL characters")
    return value


def check_image(
    check: Checker, prefix: str, fmt: int, mime_type: str, storage_key: str, size: int, w: int, h: int
) -> AssetFields:
    format_name = check.choice(prefix + "format", fmt, FORMATS)
    check.text(prefix + "storage_key", storage_key, max_len=1024)
    if not mime_type:
        check.add(prefix + "mime_type", "is required")
    elif format_name is not None and mime_type != MIME_TYPES[format_name]:
        check.add(
            prefix + "mime_type", f"must be {MIME_TYPES[format_name]} for format {format_name}, got {mime_type!r}"
        )
    check.in_range(prefix + "bytes_size", size, 1, MAX_BYTES_SIZE)
    check.in_range(prefix + "width", w, 1, MAX_IMAGE_SIDE)
    check.in_range(prefix + "height", h, 1, MAX_IMAGE_SIDE)
    return AssetFields(storage_key, mime_type, size, w, h, format_name or "")


def check_time(check: Checker, field: str, value: timestamp_pb2.Timestamp) -> datetime | None:
    try:
        return from_proto(value)
    except (ValueError, OverflowError):
        check.add(field, "must be a valid timestamp between years 1 and 9999")
        return None


# Rows to messages.


def job_message(row: asyncpg.Record) -> pb.Job:
    params = json.loads(row["params"])
    extra = struct_pb2.Struct()
    extra.update(params.get("extra") or {})
    return pb.Job(
        job_id=str(row["id"]),
        user_id=str(row["user_id"]),
        prompt=row["prompt"],
        params=pb.GenerationParams(
            width=params["width"],
            height=params["height"],
            steps=params["steps"],
            seed=params["seed"],
            model=params["model"],
            extra=extra,
        ),
        tokens_cost=row["tokens_cost"],
        status=STATUS_VALUES[row["status"]],  # type: ignore[arg-type]
        error_message=row["error_message"] or "",
        created_at=to_proto(row["created_at"]),
        started_at=to_proto(row["started_at"]),
        completed_at=to_proto(row["completed_at"]),
        updated_at=to_proto(row["updated_at"]),
        worker_id=row["worker_id"] or "",
        lease_expires_at=to_proto(row["lease_expires_at"]),
    )


def variant_message(row: asyncpg.Record, prefix: str = "") -> pb.AssetVariant:
    return pb.AssetVariant(
        variant_id=str(row[prefix + "id"]),
        asset_id=str(row["asset_id"] if not prefix else row["id"]),
        kind=KIND_VALUES[row[prefix + "kind"]],  # type: ignore[arg-type]
        storage_key=row[prefix + "storage_key"],
        mime_type=row[prefix + "mime_type"],
        bytes_size=row[prefix + "bytes_size"],
        width=row[prefix + "width"],
        height=row[prefix + "height"],
        format=FORMAT_VALUES[row[prefix + "format"]],  # type: ignore[arg-type]
        created_at=to_proto(row[prefix + "created_at"]),
    )


def asset_message(row: asyncpg.Record, variants: list[asyncpg.Record] | None = None) -> pb.Asset:
    return pb.Asset(
        asset_id=str(row["id"]),
        job_id=str(row["job_id"]),
        user_id=str(row["user_id"]),
        title=row["title"],
        storage_key=row["storage_key"],
        mime_type=row["mime_type"],
        bytes_size=row["bytes_size"],
        width=row["width"],
        height=row["height"],
        format=FORMAT_VALUES[row["format"]],  # type: ignore[arg-type]
        created_at=to_proto(row["created_at"]),
        variants=[variant_message(v, "v_") for v in variants or []],
    )


def grouped_message(item: AssetWithVariants) -> pb.Asset:
    return asset_message(item.asset, item.variants)


class GenerationApi(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, store: Store, charger: Charger, hub: Hub) -> None:
        self.store = store
        self.charger = charger
        self.hub = hub

    async def CreateGenerationJob(
        self, request: pb.CreateGenerationJobRequest, context: Context
    ) -> pb.CreateGenerationJobResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        job_id = check.uuid("job_id", request.job_id)
        prompt = check_free_text(check, "prompt", request.prompt, MAX_PROMPT, 1)
        if not request.HasField("params"):
            check.add("params", "is required (width, height and steps at least)")
        params = check_params(check, request.params)
        check.in_range("tokens_cost", request.tokens_cost, 1, MAX_TOKENS_COST)
        check.done()
        job = NewJob(
            id=job_id,
            user_id=user_id,
            prompt=prompt,
            params=params,
            tokens_cost=request.tokens_cost,
            request_digest=request_digest(user_id, prompt, params, request.tokens_cost),
        )
        return pb.CreateGenerationJobResponse(job=job_message(await self.charger.create(job)))

    async def GetGenerationJob(
        self, request: pb.GetGenerationJobRequest, context: Context
    ) -> pb.GetGenerationJobResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        check.done()
        return pb.GetGenerationJobResponse(job=job_message(await self.store.get_job(job_id)))

    async def ListGenerationJobs(
        self, request: pb.ListGenerationJobsRequest, context: Context
    ) -> pb.ListGenerationJobsResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        statuses = sorted({check.choice("statuses", s, STATUSES) or "" for s in request.statuses})
        page_size = check.page_size("page_size", request.page_size, default=50)
        check.done()
        wanted = statuses or sorted(lifecycle.VISIBLE)
        scope = f"jobs:{user_id}:{','.join(statuses)}"
        after = pagination.decode_after(scope, request.page_token, uuid.UUID)
        rows = await self.store.list_jobs(user_id, wanted, after, page_size + 1)
        jobs = [job_message(r) for r in rows[:page_size]]
        size = pagination.fitting(jobs)
        keys = [(r["created_at"], str(r["id"])) for r in rows]
        return pb.ListGenerationJobsResponse(
            jobs=jobs[:size], next_page_token=pagination.next_page_token(scope, keys, size)
        )

    async def UpdateGenerationJobStatus(
        self, request: pb.UpdateGenerationJobStatusRequest, context: Context
    ) -> pb.UpdateGenerationJobStatusResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        target = check.choice("status", request.status, STATUSES)
        check_free_text(check, "error_message", request.error_message, MAX_ERROR_MESSAGE, 0)
        check.done()
        assert target is not None
        row, changed = await self.store.move_job(job_id, target, request.error_message)
        if changed and row["refund_state"] == "PENDING":
            # Best effort now; if the token service is away the reconciler pays it later.
            await self.charger.refund(row)
        return pb.UpdateGenerationJobStatusResponse(job=job_message(row))

    async def ClaimNextJob(self, request: pb.ClaimNextJobRequest, context: Context) -> pb.ClaimNextJobResponse:
        check = Checker()
        worker_id = check.text("worker_id", request.worker_id, max_len=200)
        check.in_range("lease_seconds", request.lease_seconds, 1, 3600)
        check.done()
        for swept in await self.store.sweep_expired_leases():
            if swept["refund_state"] == "PENDING":
                await self.charger.refund(swept)
        row = await self.store.claim_next(worker_id, request.lease_seconds)
        return pb.ClaimNextJobResponse(job=job_message(row) if row is not None else None)

    async def WatchGenerationJob(
        self, request: pb.WatchGenerationJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchGenerationJobResponse]:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        check.done()
        await self.store.get_job(job_id)  # NOT_FOUND before the stream starts

        async def read() -> asyncpg.Record:
            return await self.store.get_job(job_id)

        try:
            async for row in self.hub.watch(job_id, read):
                yield pb.WatchGenerationJobResponse(job=job_message(row))
        except WatcherLimitError:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS", "too many watched jobs; retry later"
            ) from None

    async def AttachAssetToJob(
        self, request: pb.AttachAssetToJobRequest, context: Context
    ) -> pb.AttachAssetToJobResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        user_id = check.uuid("user_id", request.user_id)
        asset = request.asset
        if not request.HasField("asset"):
            check.add("asset", "is required")
        asset_id = check.uuid("asset.asset_id", asset.asset_id)
        title = check.text("asset.title", asset.title, max_len=200, min_len=0)
        fields = check_image(
            check,
            "asset.",
            asset.format,
            asset.mime_type,
            asset.storage_key,
            asset.bytes_size,
            asset.width,
            asset.height,
        )
        check.done()
        row = await self.store.attach_asset(asset_id, job_id, user_id, title, fields)
        return pb.AttachAssetToJobResponse(asset=asset_message(row))

    async def AddAssetVariant(self, request: pb.AddAssetVariantRequest, context: Context) -> pb.AddAssetVariantResponse:
        check = Checker()
        asset_id = check.uuid("asset_id", request.asset_id)
        kind = check.choice("kind", request.kind, KINDS)
        fields = check_image(
            check,
            "",
            request.format,
            request.mime_type,
            request.storage_key,
            request.bytes_size,
            request.width,
            request.height,
        )
        check.done()
        assert kind is not None
        return pb.AddAssetVariantResponse(variant=variant_message(await self.store.add_variant(asset_id, kind, fields)))

    async def GetAsset(self, request: pb.GetAssetRequest, context: Context) -> pb.GetAssetResponse:
        check = Checker()
        asset_id = check.uuid("asset_id", request.asset_id)
        check.done()
        return pb.GetAssetResponse(asset=grouped_message(await self.store.asset(asset_id)))

    async def GetAssetsForUser(
        self, request: pb.GetAssetsForUserRequest, context: Context
    ) -> pb.GetAssetsForUserResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        page_size = check.page_size("page_size", request.page_size, default=20)
        check.done()
        scope = f"assets:{user_id}"
        after = pagination.decode_after(scope, request.page_token, uuid.UUID)
        items = await self.store.assets_for_user(user_id, after, page_size + 1)
        assets = [grouped_message(i) for i in items[:page_size]]
        size = pagination.fitting(assets)
        keys = [(i.asset["created_at"], str(i.asset["id"])) for i in items]
        return pb.GetAssetsForUserResponse(
            assets=assets[:size], next_page_token=pagination.next_page_token(scope, keys, size)
        )

    async def ArchiveCompletedJobs(
        self, request: pb.ArchiveCompletedJobsRequest, context: Context
    ) -> pb.ArchiveCompletedJobsResponse:
        check = Checker()
        days = request.older_than_days or DEFAULT_ARCHIVE_DAYS
        check.in_range("older_than_days", days, 1, 36500)
        check.done()
        return pb.ArchiveCompletedJobsResponse(archived=await self.store.archive_completed(days))

    async def PauseQueuedJobs(self, request: pb.PauseQueuedJobsRequest, context: Context) -> pb.PauseQueuedJobsResponse:
        check = Checker()
        if not request.HasField("created_after"):
            check.add("created_after", "is required (pausing every queued job must be asked for explicitly)")
        created_after = check_time(check, "created_after", request.created_after)
        check.done()
        assert created_after is not None
        return pb.PauseQueuedJobsResponse(paused=await self.store.pause_queued(created_after))

    async def ResumePausedJobs(
        self, request: pb.ResumePausedJobsRequest, context: Context
    ) -> pb.ResumePausedJobsResponse:
        check = Checker()
        after = check_time(check, "created_after", request.created_after) if request.HasField("created_after") else None
        check.done()
        return pb.ResumePausedJobsResponse(resumed=await self.store.resume_paused(after))
