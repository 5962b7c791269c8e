"""Every error the token service answers with, by reason: each ServiceError is built here.

The rules that decide on an error live in their domain modules (ledger, otp, api);
this module only says how each one reads on the wire: code, reason, message, metadata.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc

from blumpo_common.errors import (
    RETRY_AFTER_COLLISION_SECONDS,
    RETRY_AFTER_OUTAGE_SECONDS,
    ServiceError,
    invalid_argument,
    not_found,
)
from token_service.model import LedgerEntry


def user_not_found(key: uuid.UUID | str) -> ServiceError:
    """key: the id or email the user was looked up by."""
    return not_found("user", str(key))


def account_not_found(user_id: uuid.UUID) -> ServiceError:
    return not_found("account", str(user_id))


def unknown_plan(plan: str) -> ServiceError:
    return invalid_argument([("plan", f"unknown plan {plan!r}")])


def email_taken(email: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN", f"a user with email {email} exists", {"email": email}
    )


def insufficient_tokens(balance: int, requested: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_TOKENS",
        f"the balance is {balance} tokens, {requested} requested",
        {"balance": str(balance), "requested": str(requested)},
    )


def balance_limit_exceeded(balance: int, limit: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "BALANCE_LIMIT_EXCEEDED",
        f"the balance would exceed {limit}",
        {"balance": str(balance), "limit": str(limit)},
    )


def wrong_sign(reason: str, delta: int) -> ServiceError:
    """The delta's sign does not fit the reason (a credit written as a debit, or the reverse)."""
    kind, wanted = ("a debit", "below 0") if delta > 0 else ("a credit", "above 0")
    return invalid_argument([("delta", f"must be {wanted} for {reason} ({kind}), got {delta}")])


def refund_unmatched(reference_id: str, debit: int | None, requested: int) -> ServiceError:
    """debit: the amount of the GENERATION debit the refund names; None when there is none."""
    metadata = {"reference_id": reference_id, "requested": str(requested)}
    if debit is None:
        message = (
            f"a refund needs the reference '<x>:refund' of a GENERATION debit <x> of this user; "
            f"{reference_id!r} names none"
        )
    else:
        message = f"the refund of {requested} tokens exceeds the debit it gives back ({debit} tokens)"
        metadata["debit"] = str(debit)
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "REFUND_UNMATCHED", message, metadata)


def idempotency_key_reused(earlier: LedgerEntry) -> ServiceError:
    """earlier: the entry already written under the reference."""
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        f"reference_id {earlier.reference_id!r} was already used with delta {earlier.delta} "
        f"and reason {earlier.reason}; use a new reference for a different entry",
        {"reference_id": earlier.reference_id, "delta": str(earlier.delta), "reason": str(earlier.reason)},
    )


def otp_invalid() -> ServiceError:
    # The same answer for wrong, expired and unknown, so it reveals nothing about the email.
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED,
        "OTP_INVALID",
        "the code is wrong or has expired; check it or request a new one",
    )


def otp_attempts_exhausted(retry_after_seconds: int, max_attempts: int, window: timedelta) -> ServiceError:
    """This client's wrong codes for the email: its codes still work for whoever holds them."""
    seconds = int(window.total_seconds())
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OTP_ATTEMPTS_EXHAUSTED",
        f"{max_attempts} wrong codes for this email from this client within {seconds} seconds; "
        f"retry in {retry_after_seconds} seconds",
        {"max_attempts": str(max_attempts), "window_seconds": str(seconds)},
        retry_delay_seconds=retry_after_seconds,
    )


def otp_client_guesses_limited(retry_after_seconds: int, limit: int, window: timedelta) -> ServiceError:
    """This client's wrong codes over every email."""
    seconds = int(window.total_seconds())
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OTP_CLIENT_RATE_LIMITED",
        f"at most {limit} wrong codes per client per {seconds} seconds; retry in {retry_after_seconds} seconds",
        {"limit": str(limit), "window_seconds": str(seconds)},
        retry_delay_seconds=retry_after_seconds,
    )


def otp_rate_limited(retry_after_seconds: int, limit: int, window: timedelta) -> ServiceError:
    """The email's limit: the codes mailed to it in the window (one code lifetime) still work."""
    seconds = int(window.total_seconds())
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OTP_RATE_LIMITED",
        f"at most {limit} codes per email per {seconds} seconds; a code already mailed still works, "
        f"or retry in {retry_after_seconds} seconds",
        {"limit": str(limit), "window_seconds": str(seconds)},
        retry_delay_seconds=retry_after_seconds,
    )


def otp_client_rate_limited(retry_after_seconds: int, limit: int, window: timedelta) -> ServiceError:
    seconds = int(window.total_seconds())
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OTP_CLIENT_RATE_LIMITED",
        f"at most {limit} codes per client per {seconds} seconds; retry in {retry_after_seconds} seconds",
        {"limit": str(limit), "window_seconds": str(seconds)},
        retry_delay_seconds=retry_after_seconds,
    )


def otp_mail_ceiling(retry_after_seconds: int, limit: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OTP_MAIL_CEILING",
        f"at most {limit} login codes are mailed per minute in all; retry in {retry_after_seconds} seconds",
        {"limit": str(limit), "window_seconds": "60"},
        retry_delay_seconds=retry_after_seconds,
    )


def otp_delivery_failed() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "OTP_DELIVERY_FAILED",
        "the login code could not be sent; retry in a moment",
        retry_delay_seconds=RETRY_AFTER_OUTAGE_SECONDS,
    )


def concurrent_signup() -> ServiceError:
    """A login's sign-up lost the email to a user created meanwhile; the code is still unused."""
    return ServiceError(
        grpc.StatusCode.ABORTED,
        "CONCURRENT_UPDATE",
        "the user was created by a concurrent call; retry the verification",
        retry_delay_seconds=RETRY_AFTER_COLLISION_SECONDS,
    )
