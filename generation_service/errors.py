"""Every error the generation service answers with, by its ErrorInfo reason (domain blumpo.generation)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import grpc

from blumpo_common.errors import ServiceError, not_found
from generation_service.model import JobState, VariantKind
from generation_service.token_client import Outcome

DOMAIN = "blumpo.generation"


def job_not_found(job_id: uuid.UUID) -> ServiceError:
    return not_found("job", str(job_id))


def asset_not_found(asset_id: uuid.UUID) -> ServiceError:
    return not_found("asset", str(asset_id))


def invalid_transition(
    job_id: uuid.UUID, current: JobState, target: JobState, allowed: Iterable[JobState]
) -> ServiceError:
    allowed = sorted(allowed)
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_TRANSITION",
        f"job {job_id} is {current} and cannot become {target}; from {current} it may become "
        + (", ".join(allowed) if allowed else "nothing else"),
        {"job_id": str(job_id), "current_status": current, "requested_status": target},
    )


def job_not_owned(job_id: uuid.UUID, user_id: uuid.UUID) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        "JOB_NOT_OWNED",
        f"job {job_id} does not belong to user {user_id}",
        {"job_id": str(job_id), "user_id": str(user_id)},
    )


def job_not_accepting_assets(job_id: uuid.UUID, status: JobState) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOB_NOT_ACCEPTING_ASSETS",
        f"job {job_id} is {status}; assets attach only to RUNNING or SUCCEEDED jobs",
        {"job_id": str(job_id), "status": status},
    )


def asset_id_reused(asset_id: uuid.UUID) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "ASSET_ID_REUSED",
        f"asset {asset_id} exists with other data; use a new asset_id for another image",
        {"asset_id": str(asset_id)},
    )


def variant_kind_taken(asset_id: uuid.UUID, kind: VariantKind, variant_id: uuid.UUID) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "VARIANT_KIND_TAKEN",
        f"asset {asset_id} already has a {kind} variant with other data",
        {"asset_id": str(asset_id), "kind": kind, "variant_id": str(variant_id)},
    )


def job_id_reused(job_id: uuid.UUID) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "JOB_ID_REUSED",
        f"job {job_id} exists with a different request; use a new job_id for a new job",
        {"job_id": str(job_id)},
    )


def charge_unconfirmed(job_id: uuid.UUID, outcome: Outcome) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "TOKEN_SERVICE_UNAVAILABLE",
        f"the token service did not confirm the charge of job {job_id} ({outcome.code.name}); "
        "retry with the same job_id, it will not be charged twice",
        {"job_id": str(job_id)},
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
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            "USER_NOT_FOUND",
            f"no user {user_id} (no token account)",
            {"user_id": str(user_id)},
        )
    return ServiceError(
        code,
        outcome.reason or "CHARGE_REFUSED",
        f"the token service refused the charge of job {job_id}: {message}",
        {**metadata, "job_id": str(job_id)},
    )


def too_many_watchers() -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS", "too many watched jobs; retry later")
