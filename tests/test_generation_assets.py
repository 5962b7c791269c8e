"""Assets and variants: ownership, job status, idempotency, listing and its index."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import grpc

from blumpo.generation.v1 import generation_pb2 as gpb
from generation_service.store import Q
from tests import support
from tests.generation_support import GenerationStub, TokenStub, asset_input, create_job, finish, running_job

VARIANTS = [
    (gpb.VARIANT_KIND_THUMBNAIL, gpb.IMAGE_FORMAT_WEBP, "image/webp", 256),
    (gpb.VARIANT_KIND_WEB, gpb.IMAGE_FORMAT_JPEG, "image/jpeg", 1024),
    (gpb.VARIANT_KIND_PRINT, gpb.IMAGE_FORMAT_PNG, "image/png", 4096),
]


def variant_request(
    job: gpb.Job, asset_id: str, kind: int, fmt: int, mime: str, side: int
) -> gpb.AddAssetVariantRequest:
    """A variant the worker holding job adds (as the job's user, under its lease)."""
    return gpb.AddAssetVariantRequest(
        asset_id=asset_id,
        user_id=job.user_id,
        lease_id=job.lease_id,
        kind=kind,  # type: ignore[arg-type]
        storage_key=f"variants/{asset_id}/{kind}",
        mime_type=mime,
        bytes_size=side * 10,
        width=side,
        height=side,
        format=fmt,  # type: ignore[arg-type]
    )


async def _attach(generation: GenerationStub, job: gpb.Job, asset: gpb.AssetInput, user_id: str = "") -> gpb.Asset:
    request = gpb.AttachAssetToJobRequest(
        job_id=job.job_id, user_id=user_id or job.user_id, asset=asset, lease_id=job.lease_id
    )
    return (await generation.AttachAssetToJob(request)).asset


async def test_attach_asset_and_three_variants(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await running_job(generation, user_id)
    given = asset_input()
    asset = await _attach(generation, job, given)
    assert (asset.asset_id, asset.job_id, asset.user_id) == (given.asset_id, job.job_id, user_id)
    assert (asset.title, asset.storage_key, asset.mime_type, asset.format) == (
        given.title,
        given.storage_key,
        given.mime_type,
        given.format,
    )
    assert await _attach(generation, job, given) == asset, "the same asset again is the same asset"
    variants = [(await generation.AddAssetVariant(variant_request(job, asset.asset_id, *v))).variant for v in VARIANTS]
    assert [v.kind for v in variants] == [v[0] for v in VARIANTS]
    again = (await generation.AddAssetVariant(variant_request(job, asset.asset_id, *VARIANTS[0]))).variant
    assert again == variants[0]
    fetched = (await generation.GetAsset(gpb.GetAssetRequest(asset_id=asset.asset_id))).asset
    assert list(fetched.variants) == variants  # THUMBNAIL, WEB, PRINT
    fetched.ClearField("variants")
    assert fetched == asset


async def test_attach_rules(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    other_user = await support.user_with_balance(token, 10)
    queued = await create_job(generation, user_id)
    running = await running_job(generation, user_id)

    await support.expect_error(
        _attach(generation, running, asset_input(), user_id=other_user),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOB_NOT_OWNED",
    )
    await support.expect_error(
        _attach(generation, queued, asset_input()), grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_ACCEPTING_ASSETS"
    )
    missing = gpb.Job(job_id=str(uuid.uuid4()), user_id=user_id)
    await support.expect_error(_attach(generation, missing, asset_input()), grpc.StatusCode.NOT_FOUND)

    given = asset_input()
    await _attach(generation, running, given)
    changed = gpb.AssetInput()
    changed.CopyFrom(given)
    changed.title = "another title"
    await support.expect_error(_attach(generation, running, changed), grpc.StatusCode.ALREADY_EXISTS, "ASSET_ID_REUSED")
    error = await support.expect_error(
        _attach(generation, running, asset_input(mime="image/png")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert support.bad_fields(error) == ["asset.mime_type"]

    # SUCCEEDED still accepts assets; FAILED does not.
    await finish(generation, running, gpb.JOB_STATUS_SUCCEEDED)
    await _attach(generation, running, asset_input())
    failed = await running_job(generation, user_id)
    await finish(generation, failed, gpb.JOB_STATUS_FAILED)
    await support.expect_error(
        _attach(generation, failed, asset_input()), grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_ACCEPTING_ASSETS"
    )


async def test_variant_rules(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await running_job(generation, user_id)
    asset = await _attach(generation, job, asset_input())
    await generation.AddAssetVariant(variant_request(job, asset.asset_id, *VARIANTS[1]))
    different = variant_request(job, asset.asset_id, *VARIANTS[1])
    different.bytes_size += 1
    await support.expect_error(
        generation.AddAssetVariant(different), grpc.StatusCode.ALREADY_EXISTS, "VARIANT_KIND_TAKEN"
    )
    await support.expect_error(
        generation.AddAssetVariant(variant_request(job, str(uuid.uuid4()), *VARIANTS[0])),
        grpc.StatusCode.NOT_FOUND,
        "ASSET_NOT_FOUND",
    )
    await support.expect_error(
        generation.GetAsset(gpb.GetAssetRequest(asset_id=str(uuid.uuid4()))), grpc.StatusCode.NOT_FOUND
    )


async def test_assets_for_user_newest_first_in_pages(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await running_job(generation, user_id)
    assets = [await _attach(generation, job, asset_input()) for _ in range(5)]
    await generation.AddAssetVariant(variant_request(job, assets[0].asset_id, *VARIANTS[0]))
    await generation.AddAssetVariant(variant_request(job, assets[0].asset_id, *VARIANTS[2]))
    seen: list[gpb.Asset] = []
    page_token = ""
    for _ in range(10):
        page = await generation.GetAssetsForUser(
            gpb.GetAssetsForUserRequest(user_id=user_id, page_size=2, page_token=page_token)
        )
        seen += page.assets
        page_token = page.next_page_token
        if not page_token:
            break
    assert [a.asset_id for a in seen] == [a.asset_id for a in reversed(assets)]
    assert [len(a.variants) for a in seen] == [0, 0, 0, 0, 2]
    default = await generation.GetAssetsForUser(gpb.GetAssetsForUserRequest(user_id=user_id))
    assert len(default.assets) == 5 and default.next_page_token == ""
    nobody = await generation.GetAssetsForUser(gpb.GetAssetsForUserRequest(user_id=str(uuid.uuid4())))
    assert list(nobody.assets) == []
    await support.expect_error(
        generation.GetAssetsForUser(gpb.GetAssetsForUserRequest(user_id=user_id, page_token="x")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_assets_for_user_uses_the_user_time_index(admin: asyncpg.Connection) -> None:
    job_id = uuid.uuid4()
    await admin.execute(
        "INSERT INTO generation.generation_job (id, user_id, prompt, params, tokens_cost, status, request_digest)"
        " VALUES ($1, gen_random_uuid(), 'bulk', '{}'::jsonb, 1, 'ARCHIVED', '\\x00'::bytea)",
        job_id,
    )
    await admin.execute(
        """
        INSERT INTO generation.asset_image (id, job_id, user_id, title, storage_key, mime_type, bytes_size,
                                            width, height, format, created_at)
        SELECT gen_random_uuid(), $1, gen_random_uuid(), 't', 'k', 'image/png', 1, 1, 1, 'PNG',
               now() - make_interval(secs => n)
        FROM generate_series(1, 5000) AS n
        """,
        job_id,
    )
    await admin.execute("ANALYZE generation.asset_image")
    async with admin.transaction():
        await admin.execute("SET LOCAL search_path = generation")
        rows = await admin.fetch(
            "EXPLAIN " + Q["assets_for_user"].sql, uuid.uuid4(), datetime.max, uuid.UUID(int=2**128 - 1), 21
        )
    plan = "\n".join(r[0] for r in rows)
    assert "idx_asset_image_user_time" in plan, plan
