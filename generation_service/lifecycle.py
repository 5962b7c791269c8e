"""The job state machine: which status moves are allowed and what each one stamps.

Pure rules, no I/O. The store applies a move in one conditional UPDATE whose
allowed source statuses come from here, so two racing moves cannot both win.
"""

from __future__ import annotations

import grpc

from blumpo_common.errors import ServiceError

QUEUED = "QUEUED"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
ARCHIVED = "ARCHIVED"
PAUSED = "PAUSED"
# Internal: a job being charged (REJECTED, its refusal, lives only in SQL). Never visible.
CHARGING = "CHARGING"

VISIBLE = (QUEUED, RUNNING, SUCCEEDED, FAILED, ARCHIVED, PAUSED)
TERMINAL = frozenset({SUCCEEDED, FAILED, ARCHIVED})

# (from, to) moves a caller may ask for.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        (QUEUED, RUNNING),
        (QUEUED, PAUSED),
        (PAUSED, QUEUED),
        (RUNNING, SUCCEEDED),
        (RUNNING, FAILED),
        (QUEUED, FAILED),
        (SUCCEEDED, ARCHIVED),
        (FAILED, ARCHIVED),
    }
)

# A RUNNING job whose lease ran out this many times is failed (and refunded).
MAX_LOST_LEASES = 3


def sources(target: str) -> list[str]:
    """The statuses from which a job may move to target."""
    return sorted(source for source, to in ALLOWED if to == target)


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def invalid_transition(job_id: str, current: str, target: str) -> ServiceError:
    allowed = sorted(to for source, to in ALLOWED if source == current)
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_TRANSITION",
        f"job {job_id} is {current} and cannot become {target}; from {current} it may become "
        + (", ".join(allowed) if allowed else "nothing else"),
        {"job_id": job_id, "current_status": current, "requested_status": target},
    )
