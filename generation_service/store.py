"""Every database call of the generation service; the SQL lives in queries.sql.

The store returns records and facts (None for a row that is not there) and decides
nothing: rules.py says what a missing or refused row means for the caller.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from blumpo_common import db
from generation_service import rules
from generation_service.model import (
    Asset,
    Backlog,
    Image,
    Job,
    JobRef,
    JobState,
    NewAsset,
    NewJob,
    Price,
    Variant,
    VariantKind,
)

Q = db.load_queries(Path(__file__).with_name("queries.sql"))
# Rows one maintenance statement changes at most, so no statement holds many locks for long.
MAINTENANCE_BATCH = 1000
LEASE_SWEEP_BATCH = 100
# Times a claim is asked again after losing its owner's last running slot to a racing claim.
CLAIM_ATTEMPTS = 5
_END_OF_TIME = datetime.max
_MAX_UUID = uuid.UUID(int=2**128 - 1)


def _job(row: asyncpg.Record | None) -> Job | None:
    return Job.from_row(row) if row is not None else None


def _request(job: NewJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "user_id": job.user_id,
        "prompt": job.prompt,
        "params": json.dumps(job.params, sort_keys=True),
        "tokens_cost": job.tokens_cost,
        "request_digest": job.request_digest,
    }


def _job_ref(row: asyncpg.Record) -> JobRef | None:
    if row["job_user"] is None:
        return None
    return JobRef(
        row["job_id"], row["job_user"], JobState(row["job_status"]), row["job_lease_id"], row["job_lease_live"]
    )


@dataclass(frozen=True)
class Attached:
    """What an attach found: the job (None when there is none) and the asset it inserted (None if none)."""

    job: JobRef | None
    inserted: Asset | None


@dataclass(frozen=True)
class AddedVariant:
    """What a variant insert found: the asset's job (None when there is no such asset) and the
    variant it inserted (None if none)."""

    job: JobRef | None
    inserted: Variant | None


class Store(db.BaseStore):
    queries = Q

    def __init__(self, pool: asyncpg.Pool, timeout_seconds: float, claim_seconds: float = 10.0) -> None:
        super().__init__(pool, timeout_seconds)
        # How long a claim on a job's charge or refund lasts (ReconcilerSettings.claim_seconds).
        self.claim_seconds = claim_seconds

    # The charge saga. A method that claims returns the job with its claim (job.claims).

    async def record_owner(self, user_id: uuid.UUID, plan: str) -> None:
        await self.execute("record_owner", user_id, plan)

    async def price(self, model: str, width: int, height: int, steps: int) -> Price | None:
        """What params cost now ('' prices the default model); None for a model not on the list."""
        row = await self.fetchrow("price", model, width, height, steps)
        return Price(row["model"], row["tokens_cost"]) if row is not None else None

    async def insert_intent(self, job: NewJob, plan: str | None) -> Job | None:
        """The new CHARGING job, claimed, at its owner's plan's priority (plan None: the last
        known); None when the id is taken."""
        return _job(await self.fetchrow("insert_intent", claim_seconds=self.claim_seconds, plan=plan, **_request(job)))

    async def job_any_status(self, job_id: uuid.UUID) -> Job | None:
        return _job(await self.fetchrow("job_any_status", job_id))

    async def retry_rejected(self, job: NewJob, plan: str | None) -> Job | None:
        """A REJECTED job made a claimed CHARGING intent of this request; None if it is not REJECTED."""
        return _job(await self.fetchrow("retry_rejected", claim_seconds=self.claim_seconds, plan=plan, **_request(job)))

    async def claim(self, job_ids: Sequence[uuid.UUID]) -> list[Job]:
        """Those of the jobs, claimed, that nobody held and that still have a charge or refund to settle."""
        return [Job.from_row(r) for r in await self.fetch("claim", list(job_ids), self.claim_seconds)]

    async def stale_intents(self, limit: int) -> list[uuid.UUID]:
        return [r["id"] for r in await self.fetch("stale_intents", limit)]

    async def owed_refunds(self, limit: int) -> list[uuid.UUID]:
        return [r["id"] for r in await self.fetch("owed_refunds", limit)]

    async def hold_claim(self, job: Job, seconds: float) -> None:
        await self.execute("hold_claim", job.id, job.claims, seconds)

    async def release_claims(self, job_ids: Sequence[uuid.UUID]) -> None:
        await self.execute("release_claims", list(job_ids))

    async def finish_charged(self, job_id: uuid.UUID) -> Job | None:
        return _job(await self.fetchrow("finish_charged", job_id))

    async def reject_intent(self, job: Job, message: str) -> bool:
        """Whether the refusal settled the job: only while job's claim is the current one."""
        return await self.fetchrow("reject_intent", job.id, job.claims, message[:2000]) is not None

    async def charged_before(self, job: Job, held: int, message: str) -> Job | None:
        return _job(
            await self.fetchrow("charged_before", id=job.id, claims=job.claims, held=held, error_message=message[:2000])
        )

    async def defer(self, job_id: uuid.UUID) -> None:
        await self.execute("defer", job_id)

    async def refund_done(self, job_id: uuid.UUID) -> None:
        await self.execute("refund_done", job_id)

    # Jobs.

    async def get_job(self, job_id: uuid.UUID) -> Job | None:
        """A visible job (not one being charged or refused)."""
        return _job(await self.fetchrow("get_job", job_id))

    async def list_jobs(
        self,
        user_id: uuid.UUID,
        statuses: Sequence[JobState],
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[Job]:
        created_at, job_id = after or (_END_OF_TIME, _MAX_UUID)
        rows = await self.fetch(
            "list_jobs",
            user_id=user_id,
            after_created_at=created_at,
            after_id=job_id,
            statuses=list(statuses),
            limit=limit,
        )
        return [Job.from_row(r) for r in rows]

    async def move_job(
        self, job_id: uuid.UUID, target: JobState, error_message: str, lease_id: uuid.UUID | None
    ) -> Job | None:
        """Applies a move of the state machine in one conditional UPDATE; None when it did not apply."""
        row = await self.fetchrow(
            "move_job",
            id=job_id,
            target=target,
            error_message=error_message,
            lease_id=lease_id,
            sources=rules.sources(target),
            owes_refund=rules.owes_refund_on(target),
            delivered_ok=target not in rules.UNDELIVERED,
            claim_seconds=self.claim_seconds,
        )
        return _job(row)

    async def renew_lease(
        self, job_id: uuid.UUID, lease_id: uuid.UUID, lease_seconds: int, progress_percent: int, progress_message: str
    ) -> Job | None:
        """The job with its lease extended; None when lease_id is not its live lease."""
        row = await self.fetchrow(
            "renew_lease",
            id=job_id,
            lease_id=lease_id,
            lease_seconds=float(lease_seconds),
            progress_percent=progress_percent,
            progress_message=progress_message,
        )
        return _job(row)

    async def cancel_job(self, job_id: uuid.UUID, user_id: uuid.UUID) -> Job | None:
        """The job cancelled (waiting) or marked for its worker (RUNNING); None when nothing changed."""
        return _job(await self.fetchrow("cancel_job", id=job_id, user_id=user_id, claim_seconds=self.claim_seconds))

    async def sweep_expired_leases(self) -> list[Job]:
        """Requeues (or fails) up to a batch of RUNNING jobs whose lease ran out."""
        rows = await self.fetch(
            "sweep_expired_leases",
            batch=LEASE_SWEEP_BATCH,
            max_lost_leases=rules.MAX_LOST_LEASES,
            owing=sorted(rules.UNDELIVERED),
            claim_seconds=self.claim_seconds,
        )
        return [Job.from_row(r) for r in rows]

    async def backlog(self) -> Backlog:
        row = await self.fetchrow("backlog")
        assert row is not None  # one row of aggregates
        return Backlog.from_row(row)

    async def claim_next(
        self, worker_id: str, lease_seconds: int, models: Sequence[str], aging_seconds: float
    ) -> Job | None:
        """The next job for a worker of these models (empty: any), RUNNING under a fresh lease;
        None when no job is claimable."""
        for _ in range(CLAIM_ATTEMPTS):
            row = await self.fetchrow(
                "claim_next",
                worker_id=worker_id,
                lease_seconds=float(lease_seconds),
                models=list(models),
                aging_seconds=aging_seconds,
            )
            assert row is not None
            if row["job"] is not None or not row["found"]:
                return _job(row["job"])
        return None

    # Assets.

    async def attach_asset(self, new: NewAsset, lease_id: uuid.UUID | None) -> Attached:
        row = await self.fetchrow(
            "attach_asset",
            id=new.id,
            job_id=new.job_id,
            user_id=new.user_id,
            title=new.title,
            lease_id=lease_id,
            **dataclasses.asdict(new.image),
        )
        assert row is not None
        return Attached(_job_ref(row), Asset.from_row(row["inserted"]) if row["inserted"] is not None else None)

    async def add_variant(
        self, asset_id: uuid.UUID, user_id: uuid.UUID, lease_id: uuid.UUID | None, kind: VariantKind, image: Image
    ) -> AddedVariant:
        row = await self.fetchrow(
            "add_variant",
            id=uuid.uuid4(),
            asset_id=asset_id,
            user_id=user_id,
            lease_id=lease_id,
            kind=kind,
            **dataclasses.asdict(image),
        )
        assert row is not None
        inserted = row["inserted"]
        return AddedVariant(_job_ref(row), Variant.from_row(inserted) if inserted is not None else None)

    async def variant_by_kind(self, asset_id: uuid.UUID, kind: VariantKind) -> Variant | None:
        row = await self.fetchrow("variant_by_kind", asset_id, kind)
        return Variant.from_row(row) if row is not None else None

    async def asset(self, asset_id: uuid.UUID) -> Asset | None:
        """An asset with its variants."""
        row = await self.fetchrow("asset", asset_id)
        return Asset.from_row(row) if row is not None else None

    async def assets_for_user(
        self, user_id: uuid.UUID, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[Asset]:
        created_at, asset_id = after or (_END_OF_TIME, _MAX_UUID)
        return [Asset.from_row(r) for r in await self.fetch("assets_for_user", user_id, created_at, asset_id, limit)]

    # Maintenance: batch after batch, each its own short transaction.

    async def _in_batches(self, name: str, *args: Any) -> int:
        """Runs a maintenance statement until a batch touches fewer than MAINTENANCE_BATCH rows;
        returns the jobs it archived, paused or resumed."""
        total = 0
        while True:
            row = await self.fetchrow(name, *args, MAINTENANCE_BATCH)
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
