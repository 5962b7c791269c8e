"""Email one-time-password login: codes, their keyed hashes, and the rules of a challenge.

A code is 6 digits from `secrets`. Only HMAC-SHA256(server secret, challenge id, code)
is stored, so a copy of the database does not reveal live codes, and the same code
in two challenges hashes differently. Per email: one active challenge (a new request
supersedes it), at most MAX_REQUESTS_PER_WINDOW requests per hour, MAX_ATTEMPTS
wrong codes before the challenge dies. Every step for one email runs under that
email's advisory lock, so concurrent calls for it are applied one at a time. The lock, and
every transaction here, ends before the code is mailed: no network call waits inside one.
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

from blumpo_common.db import Connection
from token_service import errors, ledger
from token_service.model import EmailTaken, OtpChallenge, UnknownPlan, User
from token_service.otp_sender import DeliveryError, OtpSender
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


def judge(challenge: OtpChallenge | None, now: datetime, code_ok: bool) -> Verdict:
    """What a verification of the email's newest challenge comes to (before counting it)."""
    if challenge is None or challenge.expires_at <= now or challenge.consumed_at is not None:
        return Verdict.INVALID
    if challenge.invalidated_at is not None:
        return Verdict.EXHAUSTED if challenge.attempts >= MAX_ATTEMPTS else Verdict.INVALID
    return Verdict.ACCEPTED if code_ok else Verdict.INVALID


@dataclass(frozen=True)
class Challenge:
    """A challenge just issued, as the caller learns of it (the stored one: model.OtpChallenge)."""

    id: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True)
class Login:
    user: User
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
        """Starts a challenge for the email, superseding its active one, then sends the code.

        The challenge is committed before the code goes out, so no transaction (and no pooled
        connection) waits on the mail server; a code that cannot be sent is withdrawn."""
        now = self.clock.now()
        code = generate_code()
        challenge = await self._issue(email, code, now)
        try:
            await self.sender.send(email, code, challenge.expires_at)
        except DeliveryError as exc:
            log.error("login code delivery failed", extra={"email": email, "error": str(exc)})
            await self._withdraw(email, challenge)
            raise errors.otp_delivery_failed() from None
        # A cancelled call (the caller gave up) withdraws nothing: the mail may still go out.
        return challenge

    async def _issue(self, email: str, code: str, now: datetime) -> Challenge:
        """The new challenge, committed, superseding the active one."""
        async with self.store.transaction() as conn:
            await self.store.lock_email(email, conn=conn)
            recent = await self.store.otp_requests_since(email, now - RATE_WINDOW, conn=conn)
            if recent.count >= MAX_REQUESTS_PER_WINDOW:
                assert recent.oldest is not None
                wait = (recent.oldest + RATE_WINDOW - now).total_seconds()
                raise errors.otp_rate_limited(max(1, math.ceil(wait)), MAX_REQUESTS_PER_WINDOW, RATE_WINDOW)
            challenge = Challenge(uuid.uuid4(), now + self.ttl)
            await self.store.supersede_otps(email, now, conn=conn)
            await self.store.insert_otp(
                challenge_id=challenge.id,
                email=email,
                code_hash=hash_code(self.secret, challenge.id, code),
                created_at=now,
                expires_at=challenge.expires_at,
                conn=conn,
            )
        return challenge

    async def _withdraw(self, email: str, challenge: Challenge) -> None:
        """Deletes a challenge whose code was not sent (so it does not count against the rate
        limit) and, if it was the active one, makes the email's newest remaining challenge
        active again when it was only superseded: the code mailed before works again."""
        try:
            async with self.store.transaction() as conn:
                await self.store.lock_email(email, conn=conn)
                if await self.store.withdraw_otp(challenge.id, conn=conn):
                    await self.store.reinstate_newest_otp(email, MAX_ATTEMPTS, conn=conn)
        except Exception:
            # The caller learns of the failed delivery either way; an unsent challenge left
            # active only means the previous code stopped working, as a lost mail would.
            log.exception("could not withdraw an unsent login challenge", extra={"email": email})

    async def verify(self, email: str, code: str, caller: str) -> Login:
        """Checks the code against the email's active challenge; logs in (or signs up, the signup
        grant written by caller) on success."""
        now = self.clock.now()
        async with self.store.transaction() as conn:
            await self.store.lock_email(email, conn=conn)
            challenge = await self.store.newest_otp_for_update(email, conn=conn)
            code_ok = challenge is not None and code_matches(self.secret, challenge.id, code, challenge.code_hash)
            verdict = judge(challenge, now, code_ok)
            if verdict is Verdict.ACCEPTED:
                assert challenge is not None
                user = await self.store.user_by_email(email, conn=conn)
                created = user is None
                if user is None:
                    user = await self._sign_up(email, caller, conn=conn)
                await self.store.consume_otp(challenge.id, user.id, now, conn=conn)
                return Login(user, created)
            live = challenge is not None and judge(challenge, now, code_ok=True) is Verdict.ACCEPTED
            if live:
                assert challenge is not None
                # A wrong code for a live challenge counts; the last allowed miss kills it.
                dead = challenge.attempts + 1 >= MAX_ATTEMPTS
                await self.store.record_otp_attempt(challenge.id, now if dead else None, conn=conn)
                if dead:
                    verdict = Verdict.EXHAUSTED
        # Out of the transaction block, so the counted attempt is committed first.
        raise errors.otp_attempts_exhausted(MAX_ATTEMPTS) if verdict is Verdict.EXHAUSTED else errors.otp_invalid()

    async def _sign_up(self, email: str, caller: str, *, conn: Connection) -> User:
        try:
            return await self.store.create_user(email, SIGNUP_PLAN, ledger.MAX_BALANCE, caller, conn=conn)
        except EmailTaken:
            # A CreateUser for this email committed since the lookup: the code is still
            # unused (this transaction rolls back), so the client can simply retry.
            raise errors.concurrent_signup() from None
        except UnknownPlan:
            # Only if the signup plan left the plan table: answered as CreateUser answers it.
            raise errors.unknown_plan(SIGNUP_PLAN) from None

    async def delete_expired(self, older_than: timedelta) -> int:
        return await self.store.delete_expired_otps(self.clock.now() - older_than)
