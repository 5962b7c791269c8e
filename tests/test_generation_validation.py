"""Bad input for every request field: INVALID_ARGUMENT naming the field, and nothing written."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from blumpo.generation.v1 import generation_pb2 as gpb
from tests import support
from tests.generation_support import GenerationStub, TokenStub, asset_input, job_request

USER = str(uuid.uuid4())
JOB = str(uuid.uuid4())
BAD_IDS = ["", "not-a-uuid", str(uuid.uuid4()).upper()]


def _create(**change: Any) -> gpb.CreateGenerationJobRequest:
    request = job_request(USER, job_id=JOB)
    for name, value in change.items():
        if name.startswith("params."):
            setattr(request.params, name.removeprefix("params."), value)
        else:
            setattr(request, name, value)
    return request


def _attach(**change: Any) -> gpb.AttachAssetToJobRequest:
    request = gpb.AttachAssetToJobRequest(job_id=JOB, user_id=USER, asset=asset_input())
    for name, value in change.items():
        if name.startswith("asset."):
            setattr(request.asset, name.removeprefix("asset."), value)
        else:
            setattr(request, name, value)
    return request


def _variant(**change: Any) -> gpb.AddAssetVariantRequest:
    request = gpb.AddAssetVariantRequest(
        asset_id=str(uuid.uuid4()),
        user_id=USER,
        kind=gpb.VARIANT_KIND_WEB,
        storage_key="k",
        mime_type="image/png",
        bytes_size=1,
        width=1,
        height=1,
        format=gpb.IMAGE_FORMAT_PNG,
    )
    for name, value in change.items():
        setattr(request, name, value)
    return request


def _renew(**change: Any) -> gpb.RenewJobLeaseRequest:
    request = gpb.RenewJobLeaseRequest(job_id=JOB, worker_id="w", lease_id=str(uuid.uuid4()), lease_seconds=30)
    for name, value in change.items():
        setattr(request, name, value)
    return request


def _extra(value: float | str) -> gpb.CreateGenerationJobRequest:
    request = _create()
    request.params.extra.update({"key": value})
    return request


def _far_future() -> Timestamp:
    return Timestamp(seconds=400_000_000_000)


# (method, request, the field the error must name)
CASES: list[tuple[str, Callable[[], Any], str]] = [
    *[("CreateGenerationJob", lambda v=v: _create(user_id=v), "user_id") for v in BAD_IDS],
    *[("CreateGenerationJob", lambda v=v: _create(job_id=v), "job_id") for v in BAD_IDS],
    ("CreateGenerationJob", lambda: _create(prompt=""), "prompt"),
    ("CreateGenerationJob", lambda: _create(prompt="x" * 4001), "prompt"),
    ("CreateGenerationJob", lambda: _create(prompt="nul\x00byte"), "prompt"),
    ("CreateGenerationJob", lambda: _extra(float("nan")), "params.extra"),
    ("CreateGenerationJob", lambda: _extra("nul\x00byte"), "params.extra"),
    ("CreateGenerationJob", lambda: _extra("x" * 20_000), "params.extra"),
    ("CreateGenerationJob", lambda: _create(**{"params.width": 63}), "params.width"),
    ("CreateGenerationJob", lambda: _create(**{"params.width": 4097}), "params.width"),
    ("CreateGenerationJob", lambda: _create(**{"params.height": 0}), "params.height"),
    ("CreateGenerationJob", lambda: _create(**{"params.steps": 0}), "params.steps"),
    ("CreateGenerationJob", lambda: _create(**{"params.steps": 201}), "params.steps"),
    ("CreateGenerationJob", lambda: _create(**{"params.model": "m" * 201}), "params.model"),
    ("CreateGenerationJob", lambda: _create(tokens_cost=-5), "tokens_cost"),
    ("CreateGenerationJob", lambda: _create(**{"params.model": "no-such-model"}), "params.model"),
    ("QuoteGenerationJob", lambda: gpb.QuoteGenerationJobRequest(), "params"),
    (
        "QuoteGenerationJob",
        lambda: gpb.QuoteGenerationJobRequest(params=gpb.GenerationParams(width=64, height=64, steps=0)),
        "params.steps",
    ),
    (
        "QuoteGenerationJob",
        lambda: gpb.QuoteGenerationJobRequest(params=gpb.GenerationParams(width=64, height=64, steps=1, model="nope")),
        "params.model",
    ),
    *[("RenewJobLease", lambda v=v: _renew(job_id=v), "job_id") for v in BAD_IDS],
    *[("RenewJobLease", lambda v=v: _renew(lease_id=v), "lease_id") for v in BAD_IDS],
    ("RenewJobLease", lambda: _renew(lease_seconds=0), "lease_seconds"),
    ("RenewJobLease", lambda: _renew(progress_percent=101), "progress_percent"),
    ("RenewJobLease", lambda: _renew(progress_percent=-1), "progress_percent"),
    ("RenewJobLease", lambda: _renew(progress_message="m" * 501), "progress_message"),
    ("RenewJobLease", lambda: _renew(progress_message="a\x00"), "progress_message"),
    *[
        ("CancelGenerationJob", lambda v=v: gpb.CancelGenerationJobRequest(job_id=v, user_id=USER), "job_id")
        for v in BAD_IDS
    ],
    *[
        ("CancelGenerationJob", lambda v=v: gpb.CancelGenerationJobRequest(job_id=JOB, user_id=v), "user_id")
        for v in BAD_IDS
    ],
    (
        "UpdateGenerationJobStatus",
        lambda: gpb.UpdateGenerationJobStatusRequest(job_id=JOB, status=gpb.JOB_STATUS_FAILED, lease_id="x"),
        "lease_id",
    ),
    ("ClaimNextJob", lambda: gpb.ClaimNextJobRequest(worker_id="w", lease_seconds=10, models=[""]), "models"),
    ("ClaimNextJob", lambda: gpb.ClaimNextJobRequest(worker_id="w", lease_seconds=10, models=["m"] * 101), "models"),
    ("AttachAssetToJob", lambda: _attach(lease_id="x"), "lease_id"),
    *[("AddAssetVariant", lambda v=v: _variant(user_id=v), "user_id") for v in BAD_IDS],
    ("AddAssetVariant", lambda: _variant(lease_id="nope"), "lease_id"),
    *[("GetGenerationJob", lambda v=v: gpb.GetGenerationJobRequest(job_id=v), "job_id") for v in BAD_IDS],
    ("ListGenerationJobs", lambda: gpb.ListGenerationJobsRequest(user_id="x"), "user_id"),
    ("ListGenerationJobs", lambda: gpb.ListGenerationJobsRequest(user_id=USER, page_size=501), "page_size"),
    ("ListGenerationJobs", lambda: gpb.ListGenerationJobsRequest(user_id=USER, page_size=-1), "page_size"),
    (
        "ListGenerationJobs",
        lambda: gpb.ListGenerationJobsRequest(user_id=USER, statuses=[gpb.JOB_STATUS_UNSPECIFIED]),
        "statuses",
    ),
    ("ListGenerationJobs", lambda: gpb.ListGenerationJobsRequest(user_id=USER, page_token="zz"), "page_token"),
    (
        "UpdateGenerationJobStatus",
        lambda: gpb.UpdateGenerationJobStatusRequest(job_id="x", status=gpb.JOB_STATUS_RUNNING),
        "job_id",
    ),
    ("UpdateGenerationJobStatus", lambda: gpb.UpdateGenerationJobStatusRequest(job_id=JOB), "status"),
    (
        "UpdateGenerationJobStatus",
        lambda: gpb.UpdateGenerationJobStatusRequest(
            job_id=JOB, status=gpb.JOB_STATUS_FAILED, error_message="e" * 2001
        ),
        "error_message",
    ),
    (
        "UpdateGenerationJobStatus",
        lambda: gpb.UpdateGenerationJobStatusRequest(job_id=JOB, status=gpb.JOB_STATUS_FAILED, error_message="a\x00"),
        "error_message",
    ),
    ("ClaimNextJob", lambda: gpb.ClaimNextJobRequest(worker_id="", lease_seconds=10), "worker_id"),
    ("ClaimNextJob", lambda: gpb.ClaimNextJobRequest(worker_id="w" * 201, lease_seconds=10), "worker_id"),
    ("ClaimNextJob", lambda: gpb.ClaimNextJobRequest(worker_id="bad\nid", lease_seconds=10), "worker_id"),
    ("ClaimNextJob", lambda: gpb.ClaimNextJobRequest(worker_id="w", lease_seconds=0), "lease_seconds"),
    ("ClaimNextJob", lambda: gpb.ClaimNextJobRequest(worker_id="w", lease_seconds=3601), "lease_seconds"),
    *[("AttachAssetToJob", lambda v=v: _attach(job_id=v), "job_id") for v in BAD_IDS],
    *[("AttachAssetToJob", lambda v=v: _attach(user_id=v), "user_id") for v in BAD_IDS],
    ("AttachAssetToJob", lambda: gpb.AttachAssetToJobRequest(job_id=JOB, user_id=USER), "asset"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.asset_id": "x"}), "asset.asset_id"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.title": "t" * 201}), "asset.title"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.storage_key": ""}), "asset.storage_key"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.storage_key": "k" * 1025}), "asset.storage_key"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.mime_type": ""}), "asset.mime_type"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.mime_type": "image/jpeg"}), "asset.mime_type"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.bytes_size": 0}), "asset.bytes_size"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.width": 0}), "asset.width"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.height": 16385}), "asset.height"),
    ("AttachAssetToJob", lambda: _attach(**{"asset.format": 0}), "asset.format"),
    *[("AddAssetVariant", lambda v=v: _variant(asset_id=v), "asset_id") for v in BAD_IDS],
    ("AddAssetVariant", lambda: _variant(kind=0), "kind"),
    ("AddAssetVariant", lambda: _variant(storage_key=""), "storage_key"),
    ("AddAssetVariant", lambda: _variant(mime_type="image/webp"), "mime_type"),
    ("AddAssetVariant", lambda: _variant(bytes_size=-1), "bytes_size"),
    ("AddAssetVariant", lambda: _variant(width=-1), "width"),
    ("AddAssetVariant", lambda: _variant(height=0), "height"),
    ("AddAssetVariant", lambda: _variant(format=0), "format"),
    *[("GetAsset", lambda v=v: gpb.GetAssetRequest(asset_id=v), "asset_id") for v in BAD_IDS],
    ("GetAssetsForUser", lambda: gpb.GetAssetsForUserRequest(user_id=""), "user_id"),
    ("GetAssetsForUser", lambda: gpb.GetAssetsForUserRequest(user_id=USER, page_size=501), "page_size"),
    ("GetAssetsForUser", lambda: gpb.GetAssetsForUserRequest(user_id=USER, page_token="zz"), "page_token"),
    ("ArchiveCompletedJobs", lambda: gpb.ArchiveCompletedJobsRequest(older_than_days=-1), "older_than_days"),
    ("ArchiveCompletedJobs", lambda: gpb.ArchiveCompletedJobsRequest(older_than_days=36501), "older_than_days"),
    ("PauseQueuedJobs", lambda: gpb.PauseQueuedJobsRequest(), "created_after"),
    ("PauseQueuedJobs", lambda: gpb.PauseQueuedJobsRequest(created_after=_far_future()), "created_after"),
    ("ResumePausedJobs", lambda: gpb.ResumePausedJobsRequest(created_after=_far_future()), "created_after"),
]


@pytest.mark.parametrize(("method", "make", "field"), CASES, ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(CASES)])
async def test_bad_field_is_invalid_argument_and_writes_nothing(
    generation: GenerationStub, admin: asyncpg.Connection, method: str, make: Callable[[], Any], field: str
) -> None:
    before = await support.row_counts(admin, "generation")
    error = await support.expect_error(
        getattr(generation, method)(make()), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    assert support.error_info(error).domain == "blumpo.generation"
    assert field in support.bad_fields(error)
    assert await support.row_counts(admin, "generation") == before


async def test_every_bad_field_is_named_at_once(generation: GenerationStub) -> None:
    request = gpb.CreateGenerationJobRequest(user_id="x", job_id="y", tokens_cost=-1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generation.CreateGenerationJob(request)
    assert set(support.bad_fields(caught.value)) >= {
        "user_id",
        "job_id",
        "prompt",
        "params",
        "params.width",
        "params.height",
        "params.steps",
        "tokens_cost",
    }


async def test_extra_holding_a_literal_backslash_u0000_is_not_a_nul(
    generation: GenerationStub, token: TokenStub
) -> None:
    """params.extra may hold any text without NUL; the six characters `\\u0000` are not a NUL."""
    user_id = await support.user_with_balance(token, 10)
    request = job_request(user_id)
    request.params.extra.update({"pattern": "match \\u0000 literally"})
    job = (await generation.CreateGenerationJob(request)).job
    assert job.params.extra["pattern"] == "match \\u0000 literally"
