"""The generation service's rules: which moves a job may make, who may touch it, when a refund is owed.

Pure decisions, no I/O. The store applies a move in one conditional UPDATE whose
allowed source states come from here, so two racing moves cannot both win; here
too is what a refused statement meant, told apart from the facts it returned.
"""

from __future__ import annotations

import uuid

from generation_service import errors
from generation_service.model import Asset, Image, Job, JobRef, JobState, NewAsset, RefundState, Variant
from generation_service.token_client import Outcome

VISIBLE = frozenset(
    {JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.ARCHIVED, JobState.PAUSED}
)
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.ARCHIVED})
ACCEPTING_ASSETS = frozenset({JobState.RUNNING, JobState.SUCCEEDED})

# (from, to) moves a caller may ask for.
ALLOWED: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.QUEUED, JobState.PAUSED),
        (JobState.PAUSED, JobState.QUEUED),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.FAILED),
        (JobState.QUEUED, JobState.FAILED),
        (JobState.SUCCEEDED, JobState.ARCHIVED),
        (JobState.FAILED, JobState.ARCHIVED),
    }
)

# A RUNNING job whose lease ran out this many times is failed (and refunded).
MAX_LOST_LEASES = 3


def sources(target: JobState) -> list[JobState]:
    """The states from which a job may move to target."""
    return sorted(source for source, to in ALLOWED if to == target)


def owes_refund_on(target: JobState) -> bool:
    """Whether entering target makes the job's cost owed back (a job that failed was not delivered)."""
    return target is JobState.FAILED


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


def refused_move(job_id: uuid.UUID, current: Job | None, target: JobState) -> Job:
    """A move the conditional UPDATE did not apply, judged on the job read after it:
    already in the target state is no change (returned); anything else is an error."""
    if current is None:
        raise errors.job_not_found(job_id)
    if current.status is target:
        return current
    raise errors.invalid_transition(
        job_id, current.status, target, (to for source, to in ALLOWED if source == current.status)
    )


def check_attach(new: NewAsset, job: JobRef | None) -> None:
    """Why an asset could not be attached to its job, if the job is why."""
    if job is None:
        raise errors.job_not_found(new.job_id)
    if job.user_id != new.user_id:
        raise errors.job_not_owned(new.job_id, new.user_id)
    if job.status not in ACCEPTING_ASSETS:
        raise errors.job_not_accepting_assets(new.job_id, job.status)


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
