"""The generation service's rules: which moves a job may make, who may touch it, when a refund is owed.

Pure decisions, no I/O. The store applies a move in one conditional UPDATE whose
allowed source states come from here, so two racing moves cannot both win; here
too is what a refused statement meant, told apart from the facts it returned.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from generation_service import errors
from generation_service.model import Asset, Image, Job, JobRef, JobState, NewAsset, RefundState, Variant
from generation_service.token_client import Outcome

VISIBLE = frozenset(
    {
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.ARCHIVED,
        JobState.PAUSED,
        JobState.CANCELLED,
    }
)
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.ARCHIVED, JobState.CANCELLED})
ACCEPTING_ASSETS = frozenset({JobState.RUNNING, JobState.SUCCEEDED})
# States a job with an attached asset can no longer enter: its image was delivered, so it is paid.
UNDELIVERED = frozenset({JobState.FAILED, JobState.CANCELLED})

# (from, to) moves UpdateGenerationJobStatus may make. RUNNING is entered only by ClaimNextJob,
# and a RUNNING job is moved only under its live lease (and to CANCELLED only when its user asked:
# CancelGenerationJob cancels the others).
ALLOWED: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (JobState.QUEUED, JobState.PAUSED),
        (JobState.PAUSED, JobState.QUEUED),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.FAILED),
        (JobState.RUNNING, JobState.CANCELLED),
        (JobState.QUEUED, JobState.FAILED),
        (JobState.SUCCEEDED, JobState.ARCHIVED),
        (JobState.FAILED, JobState.ARCHIVED),
        (JobState.CANCELLED, JobState.ARCHIVED),
    }
)

# A RUNNING job whose lease ran out this many times is failed (and refunded).
MAX_LOST_LEASES = 3


def sources(target: JobState) -> list[JobState]:
    """The states from which a job may move to target."""
    return sorted(source for source, to in ALLOWED if to == target)


def owes_refund_on(target: JobState) -> bool:
    """Whether entering target makes the job's cost owed back (a failed or cancelled job was not delivered)."""
    return target in UNDELIVERED


def charge_owed(job: Job) -> bool:
    """Whether the job is an intent whose debit is still to be settled."""
    return job.status is JobState.CHARGING


def refund_owed(job: Job) -> bool:
    return job.refund_state is RefundState.PENDING


def debit_held_by_earlier_request(outcome: Outcome) -> int | None:
    """The tokens an earlier request of the same job id was charged, when the token service
    refused this debit because the reference already holds that one (another amount)."""
    earlier = outcome.metadata
    if outcome.reason != "IDEMPOTENCY_KEY_REUSED" or earlier.get("reason") != "GENERATION":
        return None
    delta = int(earlier.get("delta", "0"))
    return -delta if delta < 0 else None


def is_terminal(status: JobState) -> bool:
    return status in TERMINAL


def lease_held(job: Job | JobRef, lease_id: uuid.UUID | None, live: bool) -> bool:
    """Whether lease_id is the job's current lease and it has not run out."""
    return lease_id is not None and job.lease_id == lease_id and live


def _live(job: Job) -> bool:
    return job.lease_expires_at is not None and job.lease_expires_at > datetime.now(UTC)


def refused_move(job_id: uuid.UUID, current: Job | None, target: JobState, lease_id: uuid.UUID | None) -> Job:
    """A move the conditional UPDATE did not apply, judged on the job read after it: already in
    the target state under the caller's lease (or with none given) is no change (returned);
    anything else is an error."""
    if current is None:
        raise errors.job_not_found(job_id)
    if target is JobState.RUNNING:
        raise errors.running_only_by_claim(job_id, current.status)
    if current.status is target and lease_id in (None, current.lease_id):
        return current
    if lease_id is not None and current.lease_id != lease_id:
        raise errors.lease_lost(job_id)
    if current.status is JobState.RUNNING and not lease_held(current, lease_id, _live(current)):
        raise errors.lease_lost(job_id)
    if current.has_assets and target in UNDELIVERED:
        raise errors.job_has_assets(job_id, target)
    if current.status is JobState.RUNNING and target is JobState.CANCELLED and not current.cancel_requested:
        raise errors.cancel_not_requested(job_id)
    raise errors.invalid_transition(
        job_id, current.status, target, (to for source, to in ALLOWED if source == current.status)
    )


def refused_renewal(job_id: uuid.UUID, current: Job | None) -> None:
    """A heartbeat that renewed nothing: the job is gone from view, or the lease is not the caller's."""
    if current is None:
        raise errors.job_not_found(job_id)
    raise errors.lease_lost(job_id)


def refused_cancel(job_id: uuid.UUID, user_id: uuid.UUID, current: Job | None) -> Job:
    """A cancel the UPDATE did not apply: already cancelled (or asked of its worker) is no
    change; another user's job or a finished one is an error."""
    if current is None:
        raise errors.job_not_found(job_id)
    if current.user_id != user_id:
        raise errors.job_not_owned(job_id, user_id)
    if current.status is JobState.CANCELLED or (current.status is JobState.RUNNING and current.cancel_requested):
        return current
    raise errors.not_cancellable(job_id, current.status)


def check_attach(new: NewAsset, job: JobRef | None, lease_id: uuid.UUID | None) -> None:
    """Why an asset could not be attached to its job, if the job is why."""
    if job is None:
        raise errors.job_not_found(new.job_id)
    if job.user_id != new.user_id:
        raise errors.job_not_owned(new.job_id, new.user_id)
    check_accepting(job, lease_id)


def check_variant(asset_id: uuid.UUID, user_id: uuid.UUID, job: JobRef | None, lease_id: uuid.UUID | None) -> None:
    """Why a variant could not be added to its asset, if the asset or its job is why."""
    if job is None:
        raise errors.asset_not_found(asset_id)
    if job.user_id != user_id:
        raise errors.asset_not_owned(asset_id, user_id)
    check_accepting(job, lease_id)


def check_accepting(job: JobRef, lease_id: uuid.UUID | None) -> None:
    """A job takes images while RUNNING under the caller's live lease, and once SUCCEEDED."""
    if job.status is JobState.RUNNING and not lease_held(job, lease_id, job.lease_live):
        raise errors.lease_lost(job.id)
    if job.status not in ACCEPTING_ASSETS:
        raise errors.job_not_accepting_assets(job.id, job.status)


def check_same_asset(stored: Asset, new: NewAsset) -> Asset:
    """The stored asset when `new` is a retry of it; ASSET_ID_REUSED when it asks for something else."""
    if not stored.same_request(new):
        raise errors.asset_id_reused(new.id)
    return stored


def check_same_variant(stored: Variant, image: Image) -> Variant:
    """The stored variant of that kind when `image` repeats it; VARIANT_KIND_TAKEN otherwise."""
    if stored.image != image:
        raise errors.variant_kind_taken(stored.asset_id, stored.kind, stored.id)
    return stored
