"""Email one-time-password login: codes, their keyed hashes, and the rules of a challenge.

A code is 6 digits from `secrets`. Only HMAC-SHA256(server secret, challenge id, code)
is stored, so a copy of the database does not reveal live codes, and the same code
in two challenges hashes differently. Every code mailed works until it expires or is used:
neither a new request nor wrong codes sent by someone else take away a code already mailed,
so nobody can lock another person out (docs/security.md). A login ends the email's other
codes. Wrong codes count against the client that sent them: MAX_ATTEMPTS for one email within
a code lifetime, or failures_per_client_per_hour over every email, and that client is refused
(even with the right code) until its window frees. Limits on requests (OtpLimits): codes per
email per code lifetime, codes per client (the calling service and the end user's address)
per hour, and mail per minute in all. Every step for one email runs under that email's
advisory lock, issuing codes under one more lock, and a client's verifications under its own,
so the counts hold under concurrent calls. The locks, and every transaction here, end before
the code is mailed: no network call waits inside one.
"""

from __future__ import annotations

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
from token_service.config import OtpLimits
from token_service.model import EmailTaken, UnknownPlan, User
from token_service.otp_sender import DeliveryError, OtpSender
from token_service.store import Store

CODE_DIGITS = 6
MAX_ATTEMPTS = 5
CLIENT_WINDOW = timedelta(hours=1)
MAIL_WINDOW = timedelta(minutes=1)
MAX_CLIENT = 256
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


def client_key(caller: str, forwarded_for: str) -> str:
    """The client a call counts against: the calling service and the end user's address it
    passed on, the last of x-forwarded-for (the one the web tier's own proxy saw and appended;
    the entries before it are whatever the end user wrote); "" without an address, as for a
    service calling on its own behalf (no limit per client on requests, and wrong codes count
    against the calling service alone)."""
    address = forwarded_for.split(",")[-1].strip()[:64]
    return f"{caller}|{address}"[:MAX_CLIENT] if address else ""


def retry_after(oldest: datetime | None, window: timedelta, now: datetime) -> int:
    """Seconds until the oldest request of a full window leaves it (at least 1)."""
    assert oldest is not None
    return max(1, math.ceil((oldest + window - now).total_seconds()))


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

    def __init__(
        self,
        store: Store,
        sender: OtpSender,
        clock: Clock,
        secret: bytes,
        ttl_seconds: int,
        limits: OtpLimits | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        self.clock = clock
        self.secret = secret
        self.ttl = timedelta(seconds=ttl_seconds)
        self.limits = limits or OtpLimits()

    async def request(self, email: str, client: str = "") -> Challenge:
        """Starts a challenge for the email (earlier codes keep working), then sends the code.

        The challenge is committed before the code goes out, so no transaction (and no pooled
        connection) waits on the mail server; a code that cannot be sent is withdrawn."""
        now = self.clock.now()
        code = generate_code()
        challenge = await self._issue(email, code, now, client)
        try:
            await self.sender.send(email, code, challenge.expires_at)
        except DeliveryError as exc:
            log.error("login code delivery failed", extra={"email": email, "error": str(exc)})
            await self._withdraw(email, challenge)
            raise errors.otp_delivery_failed() from None
        # A cancelled call (the caller gave up) withdraws nothing: the mail may still go out.
        return challenge

    async def _issue(self, email: str, code: str, now: datetime, client: str) -> Challenge:
        """The new challenge, committed, once every limit allows it."""
        limits = self.limits
        async with self.store.transaction() as conn:
            await self.store.lock_otp_requests(conn=conn)
            await self.store.lock_email(email, conn=conn)
            # The email's window is one code lifetime: when it is full, the newest code mailed
            # to the address is still live, so its owner is never left without one.
            recent = await self.store.otp_requests_since(email, now - self.ttl, conn=conn)
            if recent.count >= limits.per_email:
                wait = retry_after(recent.oldest, self.ttl, now)
                raise errors.otp_rate_limited(wait, limits.per_email, self.ttl)
            if client:
                asked = await self.store.otp_client_requests_since(client, now - CLIENT_WINDOW, conn=conn)
                if asked.count >= limits.per_client_per_hour:
                    wait = retry_after(asked.oldest, CLIENT_WINDOW, now)
                    raise errors.otp_client_rate_limited(wait, limits.per_client_per_hour, CLIENT_WINDOW)
            mailed = await self.store.otp_mails_since(now - MAIL_WINDOW, conn=conn)
            if mailed.count >= limits.mails_per_minute:
                wait = retry_after(mailed.oldest, MAIL_WINDOW, now)
                raise errors.otp_mail_ceiling(wait, limits.mails_per_minute)
            challenge = Challenge(uuid.uuid4(), now + self.ttl)
            await self.store.insert_otp(
                challenge_id=challenge.id,
                email=email,
                code_hash=hash_code(self.secret, challenge.id, code),
                created_at=now,
                expires_at=challenge.expires_at,
                client=client or None,
                conn=conn,
            )
        return challenge

    async def _withdraw(self, email: str, challenge: Challenge) -> None:
        """Deletes a challenge whose code was not sent, so it counts against no limit; the
        codes mailed before it were never touched and still work."""
        try:
            async with self.store.transaction() as conn:
                await self.store.lock_email(email, conn=conn)
                await self.store.withdraw_otp(challenge.id, conn=conn)
        except Exception:
            # The caller learns of the failed delivery either way; an unsent challenge left
            # behind only counts against the limits, and its code was never mailed.
            log.exception("could not withdraw an unsent login challenge", extra={"email": email})

    async def verify(self, email: str, code: str, caller: str, client: str = "") -> Login:
        """Checks the code against the email's live challenges; logs in (or signs up, the signup
        grant written by caller) on success, ending the email's other codes. A wrong code counts
        against the client (client_key's, or the caller alone), never against the codes."""
        guesser = client or caller[:MAX_CLIENT]
        async with self.store.transaction() as conn:
            await self.store.lock_email(email, conn=conn)
            if client:
                await self.store.lock_otp_client(client, conn=conn)
            # Read once the locks are held: a call that waited behind others must not accept a
            # code that expired meanwhile.
            now = self.clock.now()
            await self._check_guesses(email, guesser, client, now, conn=conn)
            live = await self.store.live_otps_for_update(email, now, conn=conn)
            matched = next((c for c in live if code_matches(self.secret, c.id, code, c.code_hash)), None)
            if matched is not None:
                user = await self.store.user_by_email(email, conn=conn)
                created = user is None
                if user is None:
                    user = await self._sign_up(email, caller, conn=conn)
                await self.store.consume_otp(matched.id, user.id, now, conn=conn)
                await self.store.end_other_otps(email, matched.id, now, conn=conn)
                return Login(user, created)
            await self.store.insert_otp_failure(email, guesser, now, conn=conn)
            failed = await self.store.otp_failures_since(email, guesser, now - self.ttl, conn=conn)
        # Out of the transaction block, so the wrong code is committed first. The miss that
        # uses up the client's attempts says so, with when it may try again.
        if failed.count >= MAX_ATTEMPTS:
            raise errors.otp_attempts_exhausted(retry_after(failed.oldest, self.ttl, now), MAX_ATTEMPTS, self.ttl)
        raise errors.otp_invalid()

    async def _check_guesses(self, email: str, guesser: str, client: str, now: datetime, *, conn: Connection) -> None:
        """Refuses a client that has used up its wrong codes: for this email within a code
        lifetime, or (with an end user's address) over every email within the hour."""
        failed = await self.store.otp_failures_since(email, guesser, now - self.ttl, conn=conn)
        if failed.count >= MAX_ATTEMPTS:
            raise errors.otp_attempts_exhausted(retry_after(failed.oldest, self.ttl, now), MAX_ATTEMPTS, self.ttl)
        if client:
            limit = self.limits.failures_per_client_per_hour
            spread = await self.store.otp_client_failures_since(client, now - CLIENT_WINDOW, conn=conn)
            if spread.count >= limit:
                wait = retry_after(spread.oldest, CLIENT_WINDOW, now)
                raise errors.otp_client_guesses_limited(wait, limit, CLIENT_WINDOW)

    async def _sign_up(self, email: str, caller: str, *, conn: Connection) -> User:
        try:
            user = await self.store.create_user(email, SIGNUP_PLAN, ledger.MAX_BALANCE, caller, conn=conn)
        except EmailTaken:
            # A CreateUser for this email committed since the lookup: the code is still
            # unused (this transaction rolls back), so the client can simply retry.
            raise errors.concurrent_signup() from None
        except UnknownPlan:
            # Only if the signup plan left the plan table: answered as CreateUser answers it.
            raise errors.unknown_plan(SIGNUP_PLAN) from None
        ledger.count_signup(user)
        return user

    async def delete_expired(self, older_than: timedelta) -> int:
        """Deletes challenges expired before `older_than` ago, and wrong codes recorded before then
        (older_than is at least an hour, the longest window that counts them). How many
        challenges went."""
        cutoff = self.clock.now() - older_than
        await self.store.delete_old_otp_failures(cutoff)
        return await self.store.delete_expired_otps(cutoff)
