"""The error vocabulary: domain errors and how they become gRPC statuses.

Handlers raise ServiceError; the server's interceptor turns it into a status with a
google.rpc.ErrorInfo detail (and BadRequest for INVALID_ARGUMENT). Database failures
that say something about retrying are mapped here too, so no handler sees them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from blumpo_common import db


@dataclass
class ServiceError(Exception):
    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    # (field path, description) pairs, for INVALID_ARGUMENT.
    violations: Sequence[tuple[str, str]] = ()
    # When set, a google.rpc.RetryInfo detail tells the caller how long to back off.
    retry_delay_seconds: int | None = None

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"


def invalid_argument(violations: Sequence[tuple[str, str]]) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "; ".join(f"{name} {why}" for name, why in violations),
        violations=violations,
    )


def not_found(what: str, key: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"{what.upper()}_NOT_FOUND", f"no {what} {key}", {"key": key})


def to_status(error: ServiceError, domain: str) -> status_pb2.Status:
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=dict(error.metadata))
    details: list[error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.RetryInfo] = [info]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=name, description=why)
                    for name, why in error.violations
                ]
            )
        )
    if error.retry_delay_seconds is not None:
        details.append(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=error.retry_delay_seconds))
        )
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


D = TypeVar("D", bound=Message)


def detail_of(error: grpc.aio.AioRpcError, kind: type[D]) -> D | None:
    """The first detail of that kind in a failed call's google.rpc.Status, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for packed in status.details if status is not None else ():
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            return detail
    return None


# How long a caller should wait before trying again (google.rpc.RetryInfo).
RETRY_AFTER_COLLISION_SECONDS = 0
RETRY_AFTER_OUTAGE_SECONDS = 1


def database_unavailable() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database is unreachable; retry later",
        retry_delay_seconds=RETRY_AFTER_OUTAGE_SECONDS,
    )


def overloaded(max_concurrent_calls: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OVERLOADED",
        f"the service is serving its maximum of {max_concurrent_calls} calls; retry later",
        {"max_concurrent_calls": str(max_concurrent_calls)},
        retry_delay_seconds=RETRY_AFTER_OUTAGE_SECONDS,
    )


def shutting_down() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "SHUTTING_DOWN",
        "the server is shutting down; retry, another one will answer",
        retry_delay_seconds=RETRY_AFTER_OUTAGE_SECONDS,
    )


def from_exception(exc: BaseException) -> ServiceError | None:
    """Maps a failure below the domain (database, network) to a retryable status; None for a bug."""
    if isinstance(exc, (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)):
        return ServiceError(
            grpc.StatusCode.ABORTED,
            "CONCURRENT_UPDATE",
            "the operation collided with a concurrent one; retry it",
            retry_delay_seconds=RETRY_AFTER_COLLISION_SECONDS,
        )
    if isinstance(exc, (asyncpg.QueryCanceledError, asyncio.TimeoutError)):
        return ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "DATABASE_TIMEOUT",
            "the database did not answer in time; retry later",
            retry_delay_seconds=RETRY_AFTER_OUTAGE_SECONDS,
        )
    if db.connection_failed(exc):
        return database_unavailable()
    return None
