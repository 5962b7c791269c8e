"""Every database call of the generation service; the SQL lives in queries.sql.

Database failures with a meaning (a unique key taken, a row missing) become
ServiceErrors here; the rest is mapped by the shared interceptor.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from blumpo_common import db
from blumpo_common.errors import ServiceError, not_found
from generation_service import lifecycle

Q = db.load_queries(Path(__file__).with_name("queries.sql"))
# Rows one maintenance statement changes at most, so no statement holds many locks for long.
MAINTENANCE_BATCH = 1000
LEASE_SWEEP_BATCH = 100
_END_OF_TIME = datetime.max
_MAX_UUID = uuid.UUID(int=2**128 - 1)


@dataclass(frozen=True)
class NewJob:
    id: uuid.UUID
    user_id: uuid.UUID
    prompt: str
    params: dict[str, Any]
    tokens_cost: int
    request_digest: bytes


def _request_fields(job: NewJob) -> tuple[Any, ...]:
    return (
        job.id,
        job.user_id,
        job.prompt,
        json.dumps(job.params, sort_keys=True),
        job.tokens_cost,
        job.request_digest,
    )


@dataclass(frozen=True)
class AssetFields:
    """The stored fields of an image (an asset or a variant)."""

    storage_key: str
    mime_type: str
    bytes_size: int
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class AssetWithVariants:
    asset: asyncpg.Record
    variants: list[asyncpg.Record]


class Store(db.BaseStore):
    async def _row(self, name: str, *args: Any, conn: db.Connection | None = None) -> asyncpg.Record | None:
        executor = conn if conn is not None else self.pool
        return await executor.fetchrow(Q[name], *args, timeout=self.timeout())

    # The charge saga.

    async def insert_intent(self, job: NewJob) -> asyncpg.Record | None:
        """The new CHARGING job, or None when the id is taken."""
        return await self._row("insert_intent", *_request_fields(job))

    async def job_any_status(self, job_id: uuid.UUID) -> asyncpg.Record | None:
        return await self._row("job_any_status", job_id)

    async def retry_rejected(self, job: NewJob) -> asyncpg.Record | None:
        """A REJECTED job made a CHARGING intent of this request; None if it is no longer REJECTED."""
        return await self._row("retry_rejected", *_request_fields(job))

    async def finish_charged(self, job_id: uuid.UUID, conn: db.Connection | None = None) -> asyncpg.Record | None:
        return await self._row("finish_charged", job_id, conn=conn)

    async def reject_intent(
        self, job_id: uuid.UUID, message: str, conn: db.Connection | None = None
    ) -> asyncpg.Record | None:
        return await self._row("reject_intent", job_id, message[:2000], conn=conn)

    async def stale_intents(self, conn: db.Connection, older_than_seconds: float, limit: int) -> list[asyncpg.Record]:
        """The oldest CHARGING jobs left alone that long, locked in conn's transaction; others skip them."""
        return await conn.fetch(Q["stale_intents"], older_than_seconds, limit, timeout=self.timeout())

    async def owed_refunds(self, conn: db.Connection, older_than_seconds: float, limit: int) -> list[asyncpg.Record]:
        return await conn.fetch(Q["owed_refunds"], older_than_seconds, limit, timeout=self.timeout())

    async def defer(self, job_id: uuid.UUID, conn: db.Connection) -> None:
        await conn.execute(Q["defer"], job_id, timeout=self.timeout())

    async def refund_done(self, job_id: uuid.UUID, conn: db.Connection | None = None) -> None:
        executor = conn if conn is not None else self.pool
        await executor.execute(Q["refund_done"], job_id, timeout=self.timeout())

    # Jobs.

    async def get_job(self, job_id: uuid.UUID) -> asyncpg.Record:
        row = await self._row("get_job", job_id)
        if row is None:
            raise not_found("job", str(job_id))
        return row

    async def list_jobs(
        self,
        user_id: uuid.UUID,
        statuses: Sequence[str],
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        created_at, job_id = after or (_END_OF_TIME, _MAX_UUID)
        return await self.pool.fetch(
            Q["list_jobs"], user_id, created_at, job_id, list(statuses), limit, timeout=self.timeout()
        )

    async def move_job(self, job_id: uuid.UUID, target: str, error_message: str) -> tuple[asyncpg.Record, bool]:
        """Applies a move of the state machine; returns the job and whether it changed.

        A job already in the target status is returned unchanged; any other
        refused move is INVALID_TRANSITION.
        """
        row = await self._row("move_job", job_id, target, error_message, lifecycle.sources(target))
        if row is not None:
            return row, True
        # Read after the refused UPDATE, so a move that won a race is seen.
        current = await self.get_job(job_id)
        if current["status"] == target:
            return current, False
        raise lifecycle.invalid_transition(str(job_id), current["status"], target)

    async def sweep_expired_leases(self) -> list[asyncpg.Record]:
        """Requeues (or fails) up to a batch of RUNNING jobs whose lease ran out."""
        return await self.pool.fetch(
            Q["sweep_expired_leases"], LEASE_SWEEP_BATCH, lifecycle.MAX_LOST_LEASES, timeout=self.timeout()
        )

    async def claim_next(self, worker_id: str, lease_seconds: int) -> asyncpg.Record | None:
        return await self._row("claim_next", worker_id, float(lease_seconds))

    # Assets.

    async def attach_asset(
        self, asset_id: uuid.UUID, job_id: uuid.UUID, user_id: uuid.UUID, title: str, fields: AssetFields
    ) -> asyncpg.Record:
        row = await self._row(
            "attach_asset",
            asset_id,
            job_id,
            user_id,
            title,
            fields.storage_key,
            fields.mime_type,
            fields.bytes_size,
            fields.width,
            fields.height,
            fields.format,
        )
        assert row is not None
        if row["job_user"] is None:
            raise not_found("job", str(job_id))
        if row["job_user"] != user_id:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "JOB_NOT_OWNED",
                f"job {job_id} does not belong to user {user_id}",
                {"job_id": str(job_id), "user_id": str(user_id)},
            )
        if row["job_status"] not in (lifecycle.RUNNING, lifecycle.SUCCEEDED):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "JOB_NOT_ACCEPTING_ASSETS",
                f"job {job_id} is {row['job_status']}; assets attach only to RUNNING or SUCCEEDED jobs",
                {"job_id": str(job_id), "status": row["job_status"]},
            )
        if row["id"] is not None:
            return row
        existing = await self._row("asset_row", asset_id)
        assert existing is not None  # the insert conflicted on it, and assets are never deleted
        wanted = {"job_id": job_id, "user_id": user_id, "title": title, **fields.__dict__}
        if any(existing[name] != value for name, value in wanted.items()):
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "ASSET_ID_REUSED",
                f"asset {asset_id} exists with other data; use a new asset_id for another image",
                {"asset_id": str(asset_id)},
            )
        return existing

    async def add_variant(self, asset_id: uuid.UUID, kind: str, fields: AssetFields) -> asyncpg.Record:
        row = await self._row(
            "add_variant",
            uuid.uuid4(),
            asset_id,
            kind,
            fields.storage_key,
            fields.mime_type,
            fields.bytes_size,
            fields.width,
            fields.height,
            fields.format,
        )
        assert row is not None
        if not row["asset_found"]:
            raise not_found("asset", str(asset_id))
        if row["id"] is not None:
            return row
        existing = await self._row("variant_by_kind", asset_id, kind)
        assert existing is not None
        if any(existing[name] != value for name, value in fields.__dict__.items()):
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "VARIANT_KIND_TAKEN",
                f"asset {asset_id} already has a {kind} variant with other data",
                {"asset_id": str(asset_id), "kind": kind, "variant_id": str(existing["id"])},
            )
        return existing

    async def asset(self, asset_id: uuid.UUID) -> AssetWithVariants:
        rows = await self.pool.fetch(Q["asset_with_variants"], asset_id, timeout=self.timeout())
        if not rows:
            raise not_found("asset", str(asset_id))
        return _group(rows)[0]

    async def assets_for_user(
        self, user_id: uuid.UUID, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[AssetWithVariants]:
        created_at, asset_id = after or (_END_OF_TIME, _MAX_UUID)
        rows = await self.pool.fetch(Q["assets_for_user"], user_id, created_at, asset_id, limit, timeout=self.timeout())
        return _group(rows)

    # Maintenance: batch after batch, each its own short transaction.

    async def _in_batches(self, name: str, *args: Any) -> int:
        """Runs a maintenance statement until a batch touches fewer than MAINTENANCE_BATCH rows;
        returns the jobs it archived, paused or resumed."""
        total = 0
        while True:
            row = await self.pool.fetchrow(Q[name], *args, MAINTENANCE_BATCH, timeout=self.timeout())
            assert row is not None
            total += int(row["done"])
            if row["touched"] < MAINTENANCE_BATCH:
                return total

    async def archive_completed(self, older_than_days: int) -> int:
        return await self._in_batches("archive_completed_batch", older_than_days)

    async def pause_queued(self, created_after: datetime) -> int:
        return await self._in_batches("pause_queued_batch", created_after)

    async def resume_paused(self, created_after: datetime | None) -> int:
        return await self._in_batches("resume_paused_batch", created_after)


def _group(rows: Sequence[asyncpg.Record]) -> list[AssetWithVariants]:
    """Folds asset rows joined with their variants (one row per variant) into assets."""
    grouped: list[AssetWithVariants] = []
    for row in rows:
        if not grouped or grouped[-1].asset["id"] != row["id"]:
            grouped.append(AssetWithVariants(row, []))
        if row["v_id"] is not None:
            grouped[-1].variants.append(row)
    return grouped
