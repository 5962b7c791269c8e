"""The GenerationService servicer: validates requests, calls the saga or the store, builds responses."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from blumpo.generation.v1 import generation_pb2 as pb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo_common import authz
from blumpo_common.callers import caller_of
from blumpo_common.enums import ProtoEnum
from blumpo_common.pagination import PageTokens, uuid_tiebreak
from blumpo_common.server import Context
from blumpo_common.timestamps import from_proto, to_proto
from blumpo_common.validation import Checker
from generation_service import errors, rules
from generation_service.charging import Charger, request_digest
from generation_service.model import (
    Asset,
    Image,
    ImageFormat,
    Job,
    JobState,
    NewAsset,
    NewJob,
    Price,
    Variant,
    VariantKind,
)
from generation_service.store import LEASE_SWEEP_BATCH, Store
from generation_service.watch import Hub, NoSuchJobError, WatcherLimitError

MAX_PROMPT = 4000
MAX_ERROR_MESSAGE = 2000
MAX_PROGRESS_MESSAGE = 500
MAX_MODELS = 100
MAX_TOKENS_COST = 10**12
MAX_EXTRA_BYTES = 16 * 1024
MAX_IMAGE_SIDE = 16384
MAX_BYTES_SIZE = 10**12
DEFAULT_ARCHIVE_DAYS = 90

STATES = ProtoEnum(pb.JobStatus, JobState)
FORMATS = ProtoEnum(pb.ImageFormat, ImageFormat)
KINDS = ProtoEnum(pb.VariantKind, VariantKind)


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


def check_image(check: Checker, prefix: str, image: pb.AssetInput | pb.AddAssetVariantRequest) -> Image:
    """The image fields an asset and a variant request share, under the field prefix."""
    image_format = check.choice(prefix + "format", image.format, FORMATS.by_number)
    check.text(prefix + "storage_key", image.storage_key, max_len=1024)
    if not image.mime_type:
        check.add(prefix + "mime_type", "is required")
    elif image_format is not None and image.mime_type != image_format.mime_type:
        check.add(
            prefix + "mime_type",
            f"must be {image_format.mime_type} for format {image_format}, got {image.mime_type!r}",
        )
    check.in_range(prefix + "bytes_size", image.bytes_size, 1, MAX_BYTES_SIZE)
    check.in_range(prefix + "width", image.width, 1, MAX_IMAGE_SIDE)
    check.in_range(prefix + "height", image.height, 1, MAX_IMAGE_SIDE)
    return Image(
        storage_key=image.storage_key,
        mime_type=image.mime_type,
        bytes_size=image.bytes_size,
        width=image.width,
        height=image.height,
        format=image_format or ImageFormat.WEBP,  # only when invalid: the call fails at done()
    )


def check_lease(check: Checker, value: str) -> uuid.UUID | None:
    """An optional lease id: None when not given."""
    return check.uuid("lease_id", value) if value else None


def check_time(check: Checker, field: str, value: timestamp_pb2.Timestamp) -> datetime | None:
    try:
        return from_proto(value)
    except (ValueError, OverflowError):
        check.add(field, "must be a valid timestamp between years 1 and 9999")
        return None


# Records to messages.


def job_message(job: Job) -> pb.Job:
    params = job.params
    extra = struct_pb2.Struct()
    extra.update(params.get("extra") or {})
    return pb.Job(
        job_id=str(job.id),
        user_id=str(job.user_id),
        prompt=job.prompt,
        params=pb.GenerationParams(
            width=params["width"],
            height=params["height"],
            steps=params["steps"],
            seed=params["seed"],
            model=params["model"],
            extra=extra,
        ),
        tokens_cost=job.tokens_cost,
        status=STATES.to_proto(job.status),
        error_message=job.error_message or "",
        created_at=to_proto(job.created_at),
        started_at=to_proto(job.started_at),
        completed_at=to_proto(job.completed_at),
        updated_at=to_proto(job.updated_at),
        worker_id=job.worker_id or "",
        lease_expires_at=to_proto(job.lease_expires_at),
        lease_id=str(job.lease_id) if job.lease_id is not None else "",
        priority=job.priority,
        progress_percent=job.progress_percent,
        progress_message=job.progress_message,
        cancel_requested=job.cancel_requested,
    )


def image_fields(image: Image) -> dict[str, Any]:
    """The fields an Asset and an AssetVariant message share."""
    return {**dataclasses.asdict(image), "format": FORMATS.to_proto(image.format)}


def variant_message(variant: Variant) -> pb.AssetVariant:
    return pb.AssetVariant(
        variant_id=str(variant.id),
        asset_id=str(variant.asset_id),
        kind=KINDS.to_proto(variant.kind),
        created_at=to_proto(variant.created_at),
        **image_fields(variant.image),
    )


def asset_message(asset: Asset) -> pb.Asset:
    return pb.Asset(
        asset_id=str(asset.id),
        job_id=str(asset.job_id),
        user_id=str(asset.user_id),
        title=asset.title,
        created_at=to_proto(asset.created_at),
        variants=[variant_message(v) for v in asset.variants],
        **image_fields(asset.image),
    )


class GenerationApi(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self,
        store: Store,
        charger: Charger,
        hub: Hub,
        pages: PageTokens,
        aging_seconds: float = 300.0,
        sweep_interval_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.charger = charger
        self.hub = hub
        self.pages = pages
        # A queued job waiting longer than this is claimed as if one priority level higher.
        self.aging_seconds = aging_seconds
        self.sweep_interval_seconds = sweep_interval_seconds
        self._next_sweep = 0.0  # time.monotonic() from which a claim sweeps again

    async def _price(self, params: dict[str, Any]) -> Price:
        price = await self.store.price(params["model"], params["width"], params["height"], params["steps"])
        if price is None:
            raise errors.unknown_model(params["model"])
        return price

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
        # 0: not given, the caller takes the current price.
        check.in_range("tokens_cost", request.tokens_cost, 0, MAX_TOKENS_COST)
        check.done()
        # The request as sent, so a retry is the same request whatever the price list says by then.
        digest = request_digest(user_id, prompt, params, request.tokens_cost)
        price = await self._price(params)
        if request.tokens_cost and request.tokens_cost != price.tokens_cost:
            # A retry of a request made before the change (its job may still be being charged)
            # goes on at its recorded cost; only a request with no job of its own is refused.
            existing = await self.store.job_any_status(job_id)
            if existing is None or existing.request_digest != digest or existing.status is JobState.REJECTED:
                raise errors.price_changed(price.tokens_cost, request.tokens_cost)
            job: NewJob = existing  # the request as recorded, at its cost
        else:
            job = NewJob(
                id=job_id,
                user_id=user_id,
                prompt=prompt,
                params={**params, "model": price.model},
                tokens_cost=price.tokens_cost,
                request_digest=digest,
            )
        return pb.CreateGenerationJobResponse(job=job_message(await self.charger.create(job)))

    async def QuoteGenerationJob(
        self, request: pb.QuoteGenerationJobRequest, context: Context
    ) -> pb.QuoteGenerationJobResponse:
        check = Checker()
        if not request.HasField("params"):
            check.add("params", "is required (width, height and steps at least)")
        params = check_params(check, request.params)
        check.done()
        return pb.QuoteGenerationJobResponse(tokens_cost=(await self._price(params)).tokens_cost)

    async def GetGenerationJob(
        self, request: pb.GetGenerationJobRequest, context: Context
    ) -> pb.GetGenerationJobResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        check.done()
        return pb.GetGenerationJobResponse(job=job_message(await self._visible_job(job_id)))

    async def ListGenerationJobs(
        self, request: pb.ListGenerationJobsRequest, context: Context
    ) -> pb.ListGenerationJobsResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        chosen = {check.choice("statuses", s, STATES.by_number) for s in request.statuses}
        statuses = sorted(s for s in chosen if s is not None)
        page_size = check.page_size("page_size", request.page_size, default=50)
        check.done()
        scope = f"jobs:{user_id}:{','.join(statuses)}"
        after = self.pages.decode(scope, request.page_token, uuid_tiebreak)
        found = await self.store.list_jobs(user_id, statuses or sorted(rules.VISIBLE), after, page_size + 1)
        jobs, token = self.pages.page(scope, found, page_size, job_message, lambda j: (j.created_at, str(j.id)))
        return pb.ListGenerationJobsResponse(jobs=jobs, next_page_token=token)

    async def UpdateGenerationJobStatus(
        self, request: pb.UpdateGenerationJobStatusRequest, context: Context
    ) -> pb.UpdateGenerationJobStatusResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        target = check.choice("status", request.status, STATES.by_number)
        check_free_text(check, "error_message", request.error_message, MAX_ERROR_MESSAGE, 0)
        check.text("worker_id", request.worker_id, max_len=200, min_len=0)
        lease_id = check_lease(check, request.lease_id)
        check.done()
        assert target is not None
        job = await self.store.move_job(job_id, target, request.error_message, lease_id)
        if job is None:
            # Read after the refused UPDATE, so a move that won a race is seen.
            job = rules.refused_move(job_id, await self.store.get_job(job_id), target, lease_id)
        else:
            # Best effort now; if the token service is away the reconciler pays it later.
            await self.charger.refund(job)
        return pb.UpdateGenerationJobStatusResponse(job=job_message(job))

    async def ClaimNextJob(self, request: pb.ClaimNextJobRequest, context: Context) -> pb.ClaimNextJobResponse:
        check = Checker()
        worker_id = check.text("worker_id", request.worker_id, max_len=200)
        check.in_range("lease_seconds", request.lease_seconds, 1, 3600)
        if len(request.models) > MAX_MODELS:
            check.add("models", f"must name at most {MAX_MODELS} models")
        models = sorted({check.text("models", m, max_len=200) for m in request.models})
        check.done()
        swept = await self._sweep_when_due()
        job = await self.store.claim_next(worker_id, request.lease_seconds, models, self.aging_seconds)
        if job is None and not swept:
            # An empty queue may hide a lease that ran out since the last sweep: sweep, ask again.
            await self._sweep()
            job = await self.store.claim_next(worker_id, request.lease_seconds, models, self.aging_seconds)
        return pb.ClaimNextJobResponse(job=job_message(job) if job is not None else None)

    async def RenewJobLease(self, request: pb.RenewJobLeaseRequest, context: Context) -> pb.RenewJobLeaseResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        check.text("worker_id", request.worker_id, max_len=200, min_len=0)
        lease_id = check.uuid("lease_id", request.lease_id)
        check.in_range("lease_seconds", request.lease_seconds, 1, 3600)
        check.in_range("progress_percent", request.progress_percent, 0, 100)
        message = check_free_text(check, "progress_message", request.progress_message, MAX_PROGRESS_MESSAGE, 0)
        check.done()
        job = await self.store.renew_lease(job_id, lease_id, request.lease_seconds, request.progress_percent, message)
        if job is None:
            rules.refused_renewal(job_id, await self.store.get_job(job_id))
        assert job is not None
        return pb.RenewJobLeaseResponse(job=job_message(job), cancel_requested=job.cancel_requested)

    async def CancelGenerationJob(
        self, request: pb.CancelGenerationJobRequest, context: Context
    ) -> pb.CancelGenerationJobResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        user_id = check.uuid("user_id", request.user_id)
        check.done()
        job = await self.store.cancel_job(job_id, user_id)
        if job is None:
            job = rules.refused_cancel(job_id, user_id, await self.store.get_job(job_id))
        else:
            # Best effort now; if the token service is away the reconciler pays it later.
            await self.charger.refund(job)
        return pb.CancelGenerationJobResponse(job=job_message(job))

    async def WatchGenerationJob(
        self, request: pb.WatchGenerationJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchGenerationJobResponse]:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        check.done()
        try:
            async for job in self.hub.watch(job_id, caller_of(context)):
                yield pb.WatchGenerationJobResponse(job=job_message(job))
        except WatcherLimitError as exc:
            raise errors.too_many_watchers(exc.limit, exc.allowed) from None
        except NoSuchJobError:
            raise errors.job_not_found(job_id) from None

    async def AttachAssetToJob(
        self, request: pb.AttachAssetToJobRequest, context: Context
    ) -> pb.AttachAssetToJobResponse:
        check = Checker()
        job_id = check.uuid("job_id", request.job_id)
        user_id = check.uuid("user_id", request.user_id)
        if not request.HasField("asset"):
            check.add("asset", "is required")
        new = NewAsset(
            id=check.uuid("asset.asset_id", request.asset.asset_id),
            job_id=job_id,
            user_id=user_id,
            title=check.text("asset.title", request.asset.title, max_len=200, min_len=0),
            image=check_image(check, "asset.", request.asset),
        )
        lease_id = check_lease(check, request.lease_id)
        check.done()
        attached = await self.store.attach_asset(new, lease_id)
        rules.check_attach(new, attached.job, lease_id)
        if attached.inserted is not None:
            return pb.AttachAssetToJobResponse(asset=asset_message(attached.inserted))
        stored = await self.store.asset(new.id)
        assert stored is not None  # the insert conflicted on it, and assets are never deleted
        return pb.AttachAssetToJobResponse(asset=asset_message(rules.check_same_asset(stored, new)))

    async def AddAssetVariant(self, request: pb.AddAssetVariantRequest, context: Context) -> pb.AddAssetVariantResponse:
        check = Checker()
        asset_id = check.uuid("asset_id", request.asset_id)
        user_id = check.uuid("user_id", request.user_id)
        lease_id = check_lease(check, request.lease_id)
        kind = check.choice("kind", request.kind, KINDS.by_number)
        image = check_image(check, "", request)
        check.done()
        assert kind is not None
        added = await self.store.add_variant(asset_id, user_id, lease_id, kind, image)
        rules.check_variant(asset_id, user_id, added.job, lease_id)
        variant = added.inserted
        if variant is None:
            stored = await self.store.variant_by_kind(asset_id, kind)
            assert stored is not None  # the insert conflicted on it, and variants are never deleted
            variant = rules.check_same_variant(stored, image)
        return pb.AddAssetVariantResponse(variant=variant_message(variant))

    async def GetAsset(self, request: pb.GetAssetRequest, context: Context) -> pb.GetAssetResponse:
        check = Checker()
        asset_id = check.uuid("asset_id", request.asset_id)
        check.done()
        asset = await self.store.asset(asset_id)
        if asset is None:
            raise errors.asset_not_found(asset_id)
        return pb.GetAssetResponse(asset=asset_message(asset))

    async def GetAssetsForUser(
        self, request: pb.GetAssetsForUserRequest, context: Context
    ) -> pb.GetAssetsForUserResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        page_size = check.page_size("page_size", request.page_size, default=20)
        check.done()
        scope = f"assets:{user_id}"
        after = self.pages.decode(scope, request.page_token, uuid_tiebreak)
        found = await self.store.assets_for_user(user_id, after, page_size + 1)
        assets, token = self.pages.page(scope, found, page_size, asset_message, lambda a: (a.created_at, str(a.id)))
        return pb.GetAssetsForUserResponse(assets=assets, next_page_token=token)

    async def ArchiveCompletedJobs(
        self, request: pb.ArchiveCompletedJobsRequest, context: Context
    ) -> pb.ArchiveCompletedJobsResponse:
        check = Checker()
        days = request.older_than_days or DEFAULT_ARCHIVE_DAYS
        check.in_range("older_than_days", days, 1, 36500)
        check.done()
        archived = await self.store.archive_completed(days)
        authz.audit("completed jobs archived", older_than_days=days, archived=archived)
        return pb.ArchiveCompletedJobsResponse(archived=archived)

    async def PauseQueuedJobs(self, request: pb.PauseQueuedJobsRequest, context: Context) -> pb.PauseQueuedJobsResponse:
        check = Checker()
        if not request.HasField("created_after"):
            check.add("created_after", "is required (pausing every queued job must be asked for explicitly)")
        created_after = check_time(check, "created_after", request.created_after)
        check.done()
        assert created_after is not None
        paused = await self.store.pause_queued(created_after)
        authz.audit("queued jobs paused", created_after=str(created_after), paused=paused)
        return pb.PauseQueuedJobsResponse(paused=paused)

    async def ResumePausedJobs(
        self, request: pb.ResumePausedJobsRequest, context: Context
    ) -> pb.ResumePausedJobsResponse:
        check = Checker()
        after = check_time(check, "created_after", request.created_after) if request.HasField("created_after") else None
        check.done()
        resumed = await self.store.resume_paused(after)
        authz.audit("paused jobs resumed", created_after=str(after), resumed=resumed)
        return pb.ResumePausedJobsResponse(resumed=resumed)

    async def _sweep_when_due(self) -> bool:
        """Expired leases back to the queue (or ended, refunded) before a claim, at most once per
        sweep interval in this process (and at once again after a full batch): a lease that ran out
        is swept by the first claim after the interval, by a claim that finds the queue empty, and
        by the reconciler's pass, not by every claim. True when it swept."""
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + self.sweep_interval_seconds  # before the await: one claim sweeps
        await self._sweep()
        return True

    async def _sweep(self) -> None:
        swept = await self.store.sweep_expired_leases()
        if len(swept) >= LEASE_SWEEP_BATCH:
            self._next_sweep = 0.0  # more may be waiting: the next claim sweeps again
        for job in swept:
            await self.charger.refund(job)

    async def _visible_job(self, job_id: uuid.UUID) -> Job:
        job = await self.store.get_job(job_id)
        if job is None:
            raise errors.job_not_found(job_id)
        return job
