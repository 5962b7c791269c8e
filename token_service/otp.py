"""Email one-time-password login: codes, their keyed hashes, and the rules of a challenge.

A code is 6 digits from `secrets`. Only HMAC-SHA256(server secret, challenge id, code)
is stored, so a copy of the database does not reveal live codes, and the same code
in two challenges hashes differently. Per email: one active challenge (a new request
supersedes it), at most MAX_REQUESTS_PER_WINDOW requests per hour, MAX_ATTEMPTS
wrong codes before the challenge dies. Every step for one email runs under that
email's advisory lock, so concurrent calls for it are applied one at a time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import math
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import asyncpg
import grpc

from blumpo_common.db import Connection
from blumpo_common.errors import ServiceError
from token_service.otp_sender import DeliveryError, OtpSender, delivery_failed
from token_service.store import Store

CODE_DIGITS = 6
MAX_ATTEMPTS = 5
MAX_REQUESTS_PER_WINDOW = 5
RATE_WINDOW = timedelta(hours=1)
SIGNUP_PLAN = "free"
_HASH_CONTEXT = b"blumpo-otp-v1\0"

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def generate_code() -> str:
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def hash_code(secret: bytes, challenge_id: uuid.UUID, code: str) -> bytes:
    return hmac.new(secret, _HASH_CONTEXT + challenge_id.bytes + code.encode(), hashlib.sha256).digest()


def code_matches(secret: bytes, challenge_id: uuid.UUID, code: str, stored_hash: bytes) -> bool:
    """Constant-time comparison, so response timing says nothing about the stored hash."""
    return hmac.compare_digest(hash_code(secret, challenge_id, code), stored_hash)


def is_well_formed(code: str) -> bool:
    return len(code) == CODE_DIGITS and code.isascii() and code.isdigit()


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    # Unknown, expired, superseded, consumed or wrong: one answer for all.
    INVALID = "invalid"
    EXHAUSTED = "exhausted"


def judge(challenge: asyncpg.Record | None, now: datetime, code_ok: bool) -> Verdict:
    """What a verification of the email's newest challenge comes to (before counting it)."""
    if challenge is None or challenge["expires_at"] <= now or challenge["consumed_at"] is not None:
        return Verdict.INVALID
    if challenge["invalidated_at"] is not None:
        return Verdict.EXHAUSTED if challenge["attempts"] >= MAX_ATTEMPTS else Verdict.INVALID
    return Verdict.ACCEPTED if code_ok else Verdict.INVALID


def invalid_code() -> ServiceError:
    # The same answer for wrong, expired and unknown, so it reveals nothing about the email.
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED,
        "OTP_INVALID",
        "the code is wrong or has expired; check it or request a new one",
    )


def attempts_exhausted() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OTP_ATTEMPTS_EXHAUSTED",
        f"{MAX_ATTEMPTS} wrong codes: this code no longer works; request a new one",
        {"max_attempts": str(MAX_ATTEMPTS)},
    )


def rate_limited(retry_after_seconds: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OTP_RATE_LIMITED",
        f"at most {MAX_REQUESTS_PER_WINDOW} codes per email per hour; retry in {retry_after_seconds} seconds",
        {"limit": str(MAX_REQUESTS_PER_WINDOW), "window_seconds": str(int(RATE_WINDOW.total_seconds()))},
        retry_delay_seconds=retry_after_seconds,
    )


@dataclass(frozen=True)
class Challenge:
    id: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True)
class Login:
    user: asyncpg.Record
    created: bool


class OtpLogins:
    """The OTP flows, over the store, a sender and a clock."""

    def __init__(self, store: Store, sender: OtpSender, clock: Clock, secret: bytes, ttl_seconds: int) -> None:
        self.store = store
        self.sender = sender
        self.clock = clock
        self.secret = secret
        self.ttl = timedelta(seconds=ttl_seconds)

    async def request(self, email: str) -> Challenge:
        """Starts a challenge for the email, superseding its active one, and sends the code."""
        now = self.clock.now()
        async with self.store.transaction() as conn:
            await self.store.lock_email(conn, email)
            recent, oldest = await self.store.otp_requests_since(conn, email, now - RATE_WINDOW)
            if recent >= MAX_REQUESTS_PER_WINDOW:
                assert oldest is not None
                wait = (oldest + RATE_WINDOW - now).total_seconds()
                raise rate_limited(max(1, math.ceil(wait)))
            challenge = Challenge(uuid.uuid4(), now + self.ttl)
            code = generate_code()
            await self.store.supersede_otps(conn, email, now)
            await self.store.insert_otp(
                conn, challenge.id, email, hash_code(self.secret, challenge.id, code), now, challenge.expires_at
            )
            # Sent inside the transaction: if delivery fails the call writes nothing
            # and the previous challenge stays active.
            try:
                await self.sender.send(email, code, challenge.expires_at)
            except DeliveryError as exc:
                log.error("login code delivery failed", extra={"email": email, "error": str(exc)})
                raise delivery_failed() from None
        return challenge

    async def verify(self, email: str, code: str) -> Login:
        """Checks the code against the email's active challenge; logs in (or signs up) on success."""
        now = self.clock.now()
        async with self.store.transaction() as conn:
            await self.store.lock_email(conn, email)
            challenge = await self.store.newest_otp_for_update(conn, email)
            code_ok = challenge is not None and code_matches(self.secret, challenge["id"], code, challenge["code_hash"])
            verdict = judge(challenge, now, code_ok)
            if verdict is Verdict.ACCEPTED:
                assert challenge is not None
                user = await self.store.user_by_email_on(conn, email)
                created = user is None
                if user is None:
                    user = await self._sign_up(conn, email)
                await self.store.consume_otp(conn, challenge["id"], user["id"], now)
                return Login(user, created)
            live = challenge is not None and judge(challenge, now, code_ok=True) is Verdict.ACCEPTED
            if live:
                assert challenge is not None
                # A wrong code for a live challenge counts; the last allowed miss kills it.
                dead = challenge["attempts"] + 1 >= MAX_ATTEMPTS
                await self.store.record_otp_attempt(conn, challenge["id"], now if dead else None)
                if dead:
                    verdict = Verdict.EXHAUSTED
        # Out of the transaction block, so the counted attempt is committed first.
        raise attempts_exhausted() if verdict is Verdict.EXHAUSTED else invalid_code()

    async def _sign_up(self, conn: Connection, email: str) -> asyncpg.Record:
        try:
            return await self.store.create_user(email, SIGNUP_PLAN, conn=conn)
        except ServiceError as error:
            if error.reason != "EMAIL_TAKEN":
                raise
            # A CreateUser for this email committed since the lookup: the code is still
            # unused (this transaction rolls back), so the client can simply retry.
            raise ServiceError(
                grpc.StatusCode.ABORTED,
                "CONCURRENT_UPDATE",
                "the user was created by a concurrent call; retry the verification",
            ) from None

    async def delete_expired(self, older_than: timedelta) -> int:
        return await self.store.delete_expired_otps(self.clock.now() - older_than)
