"""The generation service's records and states: what a job, an asset and a variant are.

Each record is built once from a database row (`from_row`) at the store boundary;
everything above the store reads attributes, never row keys. The states here are
the only Python spelling of them: the proto enums are mapped from their descriptors
(api.py) and a test compares both with the migration's CHECK constraints.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from blumpo_common.db import Converted, Many, Nested, record


class JobState(enum.StrEnum):
    # Internal: a job being charged, and one whose charge was refused. Never visible.
    CHARGING = "CHARGING"
    REJECTED = "REJECTED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ARCHIVED = "ARCHIVED"
    PAUSED = "PAUSED"
    CANCELLED = "CANCELLED"


class RefundState(enum.StrEnum):
    NONE = "NONE"
    # Owed: the job failed or was cancelled, and its cost has not been given back yet.
    PENDING = "PENDING"
    DONE = "DONE"


class ImageFormat(enum.StrEnum):
    WEBP = "WEBP"
    PNG = "PNG"
    JPEG = "JPEG"
    AVIF = "AVIF"

    @property
    def mime_type(self) -> str:
        return f"image/{self.lower()}"


class VariantKind(enum.StrEnum):
    # Declared smallest first: variants are listed in this order.
    THUMBNAIL = "THUMBNAIL"
    WEB = "WEB"
    PRINT = "PRINT"


@dataclass(frozen=True)
class NewJob:
    """A create request, validated: what the charge saga records and charges."""

    id: uuid.UUID
    user_id: uuid.UUID
    prompt: str
    params: Mapping[str, Any]
    tokens_cost: int
    request_digest: bytes


@dataclass(frozen=True)
class Job(NewJob):
    """A job as stored: its request and where it stands."""

    status: JobState
    error_message: str | None
    worker_id: str | None
    # The fencing token of the current (or, once finished, the last) lease.
    lease_id: uuid.UUID | None
    lease_expires_at: datetime | None
    lost_leases: int
    priority: int
    progress_percent: int
    progress_message: str
    cancel_requested: bool
    # An asset is attached: the job can no longer fail or be cancelled.
    has_assets: bool
    refund_state: RefundState
    pause_requested: bool
    # The current claim on the job's charge or refund (charging.py) and until when it holds.
    claims: int
    claimed_until: datetime | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Job:
        return record(
            cls,
            row,
            params=Converted(json.loads),
            status=Converted(JobState),
            request_digest=Converted(bytes),
            refund_state=Converted(RefundState),
        )


@dataclass(frozen=True)
class Image:
    """The stored fields of one image file: an asset's original or one of its variants."""

    storage_key: str
    mime_type: str
    bytes_size: int
    width: int
    height: int
    format: ImageFormat

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Image:
        return record(cls, row, format=Converted(ImageFormat))


@dataclass(frozen=True)
class Variant:
    id: uuid.UUID
    asset_id: uuid.UUID
    kind: VariantKind
    image: Image
    created_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Variant:
        return record(cls, row, kind=Converted(VariantKind), image=Nested(Image.from_row))


@dataclass(frozen=True)
class NewAsset:
    """An asset a worker attaches to its job."""

    id: uuid.UUID
    job_id: uuid.UUID
    user_id: uuid.UUID
    title: str
    image: Image


@dataclass(frozen=True)
class Asset:
    id: uuid.UUID
    job_id: uuid.UUID
    user_id: uuid.UUID
    title: str
    image: Image
    created_at: datetime
    # Smallest kind first; empty where the query does not read them.
    variants: tuple[Variant, ...] = ()

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Asset:
        """From an asset_image row, with its variants when the row has a `variants` array of rows."""
        return record(cls, row, image=Nested(Image.from_row), variants=Many(Variant.from_row))

    def same_request(self, new: NewAsset) -> bool:
        """Whether this stored asset is what `new` asks for (a retry, not a reuse of the id)."""
        return (self.id, self.job_id, self.user_id, self.title, self.image) == (
            new.id,
            new.job_id,
            new.user_id,
            new.title,
            new.image,
        )


@dataclass(frozen=True)
class JobRef:
    """A job's owner, state and lease, as an insert that depends on them found it."""

    id: uuid.UUID
    user_id: uuid.UUID
    status: JobState
    lease_id: uuid.UUID | None
    # Whether the lease was still running when the statement looked.
    lease_live: bool


@dataclass(frozen=True)
class Price:
    """What a job of some params costs now, by the price list (model is the one priced)."""

    model: str
    tokens_cost: int


@dataclass(frozen=True)
class Backlog:
    """What is in flight, as the metrics report it: live jobs by state and the reconciler's work."""

    charging: int
    queued: int
    running: int
    paused: int
    refunds_owed: int
    leases_expired: int
    # None when there is none.
    oldest_intent_seconds: float | None
    oldest_refund_seconds: float | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Backlog:
        return record(cls, row)
