"""Every error the generation service answers with, by its ErrorInfo reason (domain blumpo.generation)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import grpc

from blumpo_common.errors import RETRY_AFTER_OUTAGE_SECONDS, ServiceError, invalid_argument, not_found
from generation_service.model import JobState, VariantKind
from generation_service.token_client import Outcome

DOMAIN = "blumpo.generation"


def _error(
    code: grpc.StatusCode, reason: str, message: str, *, retry_after: int | None = None, **metadata: object
) -> ServiceError:
    """retry_after: seconds of the google.rpc.RetryInfo the answer carries, if any."""
    metadata_text = {key: str(value) for key, value in metadata.items()}
    return ServiceError(code, reason, message, metadata_text, retry_delay_seconds=retry_after)


def job_not_found(job_id: uuid.UUID) -> ServiceError:
    return not_found("job", str(job_id))


def asset_not_found(asset_id: uuid.UUID) -> ServiceError:
    return not_found("asset", str(asset_id))


def invalid_transition(
    job_id: uuid.UUID, current: JobState, target: JobState, allowed: Iterable[JobState]
) -> ServiceError:
    allowed = sorted(allowed)
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_TRANSITION",
        f"job {job_id} is {current} and cannot become {target}; from {current} it may become "
        + (", ".join(allowed) if allowed else "nothing else"),
        job_id=job_id,
        current_status=current,
        requested_status=target,
    )


def job_not_owned(job_id: uuid.UUID, user_id: uuid.UUID) -> ServiceError:
    return _error(
        grpc.StatusCode.PERMISSION_DENIED,
        "JOB_NOT_OWNED",
        f"job {job_id} does not belong to user {user_id}",
        job_id=job_id,
        user_id=user_id,
    )


def asset_not_owned(asset_id: uuid.UUID, user_id: uuid.UUID) -> ServiceError:
    return _error(
        grpc.StatusCode.PERMISSION_DENIED,
        "ASSET_NOT_OWNED",
        f"asset {asset_id} does not belong to user {user_id}",
        asset_id=asset_id,
        user_id=user_id,
    )


def lease_lost(job_id: uuid.UUID) -> ServiceError:
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
        f"the lease_id given is not the live lease of job {job_id} (it ran out, or the job was claimed "
        "again or finished); stop working on it and claim another job",
        job_id=job_id,
    )


def running_only_by_claim(job_id: uuid.UUID, current: JobState) -> ServiceError:
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_TRANSITION",
        f"job {job_id} is {current}; a job becomes RUNNING only through ClaimNextJob, which hands out its lease",
        job_id=job_id,
        current_status=current,
        requested_status=JobState.RUNNING,
    )


def cancel_not_requested(job_id: uuid.UUID) -> ServiceError:
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_TRANSITION",
        f"job {job_id} is RUNNING and its user did not ask to cancel it; a worker reports CANCELLED only "
        "after RenewJobLease answered cancel_requested (report FAILED for a job it cannot do)",
        job_id=job_id,
        current_status=JobState.RUNNING,
        requested_status=JobState.CANCELLED,
    )


def job_has_assets(job_id: uuid.UUID, target: JobState) -> ServiceError:
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOB_HAS_ASSETS",
        f"job {job_id} has an attached asset, so it was delivered and cannot become {target}; mark it SUCCEEDED",
        job_id=job_id,
        requested_status=target,
    )


def unknown_model(model: str) -> ServiceError:
    return invalid_argument([("params.model", f"no model {model!r} on the price list (empty: the default model)")])


def price_changed(price: int, expected: int) -> ServiceError:
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "PRICE_CHANGED",
        f"the job costs {price} tokens now, not the {expected} expected; nothing was charged. "
        "Ask again with tokens_cost set to the price (or unset to accept it)",
        price=price,
        expected=expected,
    )


def user_not_found(user_id: uuid.UUID) -> ServiceError:
    return _error(grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", f"no user {user_id} (no token account)", user_id=user_id)


def job_not_accepting_assets(job_id: uuid.UUID, status: JobState) -> ServiceError:
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOB_NOT_ACCEPTING_ASSETS",
        f"job {job_id} is {status}; assets attach only to RUNNING or SUCCEEDED jobs",
        job_id=job_id,
        status=status,
    )


def not_cancellable(job_id: uuid.UUID, current: JobState) -> ServiceError:
    return _error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_TRANSITION",
        f"job {job_id} is {current}: only a QUEUED, PAUSED or RUNNING job can be cancelled",
        job_id=job_id,
        current_status=current,
        requested_status=JobState.CANCELLED,
    )


def asset_id_reused(asset_id: uuid.UUID) -> ServiceError:
    message = f"asset {asset_id} exists with other data; use a new asset_id for another image"
    return _error(grpc.StatusCode.ALREADY_EXISTS, "ASSET_ID_REUSED", message, asset_id=asset_id)


def variant_kind_taken(asset_id: uuid.UUID, kind: VariantKind, variant_id: uuid.UUID) -> ServiceError:
    message = f"asset {asset_id} already has a {kind} variant with other data"
    return _error(
        grpc.StatusCode.ALREADY_EXISTS,
        "VARIANT_KIND_TAKEN",
        message,
        asset_id=asset_id,
        kind=kind,
        variant_id=variant_id,
    )


def job_id_reused(job_id: uuid.UUID) -> ServiceError:
    message = f"job {job_id} exists with a different request; use a new job_id for a new job"
    return _error(grpc.StatusCode.ALREADY_EXISTS, "JOB_ID_REUSED", message, job_id=job_id)


def charge_unconfirmed(job_id: uuid.UUID, outcome: Outcome) -> ServiceError:
    return _error(
        grpc.StatusCode.UNAVAILABLE,
        "TOKEN_SERVICE_UNAVAILABLE",
        f"the token service did not confirm the charge of job {job_id} ({outcome.code.name}); "
        "retry with the same job_id, it will not be charged twice",
        job_id=job_id,
        retry_after=RETRY_AFTER_OUTAGE_SECONDS,
    )


def charge_in_progress(job_id: uuid.UUID) -> ServiceError:
    return _error(
        grpc.StatusCode.UNAVAILABLE,
        "CHARGE_IN_PROGRESS",
        f"job {job_id} is being charged by a concurrent request; retry with the same job_id, "
        "it will not be charged twice",
        job_id=job_id,
        retry_after=RETRY_AFTER_OUTAGE_SECONDS,
    )


def charge_refused(job_id: uuid.UUID, user_id: uuid.UUID, outcome: Outcome) -> ServiceError:
    """The token service's refusal of a debit, as this service's answer to the create."""
    code, message, metadata = outcome.code, outcome.message, outcome.metadata
    if outcome.reason == "INSUFFICIENT_TOKENS":
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSUFFICIENT_TOKENS",
            f"not enough tokens for job {job_id}: {message}",
            {**metadata, "job_id": str(job_id)},
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return user_not_found(user_id)
    return ServiceError(
        code,
        outcome.reason or "CHARGE_REFUSED",
        f"the token service refused the charge of job {job_id}: {message}",
        {**metadata, "job_id": str(job_id)},
    )


# Long enough for another of the caller's streams to end, short enough to come back soon.
WATCH_RETRY_SECONDS = 5


def too_many_watchers(limit: str, allowed: int) -> ServiceError:
    """limit is "caller" (this caller's open streams) or "process" (all callers' together)."""
    whose = "this caller holds" if limit == "caller" else "this server holds"
    return _error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_WATCHERS",
        f"{whose} {allowed} open watch streams, its limit; end one or retry later",
        limit=limit,
        allowed=allowed,
        retry_after=WATCH_RETRY_SECONDS,
    )
