"""Every database call of the token service; the SQL lives in queries.sql."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import asyncpg
import grpc

from blumpo_common import db
from blumpo_common.errors import ServiceError, invalid_argument, not_found
from token_service import ledger

Q = db.load_queries(Path(__file__).with_name("queries.sql"))
MAX_MISMATCHES = 1000
OTP_DELETE_BATCH = 1000
_END_OF_TIME = datetime.max
_MAX_SEQ = 2**63 - 1


class Store(db.BaseStore):
    async def create_user(self, email: str, plan: str, conn: db.Connection | None = None) -> asyncpg.Record:
        """Creates the user, account and signup grant; runs on conn when given (a caller's transaction)."""
        try:
            executor = conn if conn is not None else self.pool
            row = await executor.fetchrow(Q["create_user"], email, plan, timeout=self.timeout())
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "app_user_email_key":
                raise ServiceError(
                    grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN", f"a user with email {email} exists", {"email": email}
                ) from None
            raise
        if row is None:
            raise invalid_argument([("plan", f"unknown plan {plan!r}")])
        return row

    async def user_by_id(self, user_id: uuid.UUID) -> asyncpg.Record:
        row = await self.pool.fetchrow(Q["user_by_id"], user_id, timeout=self.timeout())
        if row is None:
            raise not_found("user", str(user_id))
        return row

    async def user_by_email(self, email: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(Q["user_by_email"], email, timeout=self.timeout())
        if row is None:
            raise not_found("user", email)
        return row

    async def account(self, user_id: uuid.UUID) -> asyncpg.Record:
        row = await self.pool.fetchrow(Q["account"], user_id, timeout=self.timeout())
        if row is None:
            raise not_found("account", str(user_id))
        return row

    async def append_entries(self, requests: Sequence[ledger.EntryRequest]) -> list[ledger.Outcome]:
        """Applies the requests in order, in one statement (its own transaction)."""
        timeout = self.timeout()
        async with self.pool.acquire(timeout=timeout) as conn:
            return await self.append_entries_on(conn, requests, timeout)

    async def append_entries_on(
        self, conn: db.Connection, requests: Sequence[ledger.EntryRequest], timeout: float
    ) -> list[ledger.Outcome]:
        """append_entries on conn, inside the transaction it may hold; one outcome per request, in order."""
        rows = await conn.fetch(
            Q["append_entries"],
            [r.user_id for r in requests],
            [r.delta for r in requests],
            [r.reason for r in requests],
            [r.reference_id for r in requests],
            ledger.MAX_BALANCE,
            timeout=timeout,
        )
        assert len(rows) == len(requests), "token.append_entries answers once per entry"
        return [ledger.outcome_of(row) for row in rows]

    async def list_entries(
        self, user_id: uuid.UUID, after: tuple[datetime, int] | None, limit: int
    ) -> list[asyncpg.Record]:
        occurred_at, seq = after or (_END_OF_TIME, _MAX_SEQ)
        timeout = self.timeout()
        rows = await self.pool.fetch(Q["list_entries"], user_id, occurred_at, seq, limit, timeout=timeout)
        if not rows and after is None and not await self.pool.fetchval(Q["user_exists"], user_id, timeout=timeout):
            raise not_found("user", str(user_id))
        return rows

    async def check_balances(self, user_id: uuid.UUID | None) -> tuple[int, list[asyncpg.Record]]:
        """How many accounts were checked, and (up to MAX_MISMATCHES of) those that disagree."""
        timeout = self.timeout()
        async with (
            self.pool.acquire(timeout=timeout) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            checked = await conn.fetchval(Q["count_accounts"], user_id, timeout=timeout)
            mismatches = await conn.fetch(Q["balance_mismatches"], user_id, MAX_MISMATCHES, timeout=timeout)
        if user_id is not None and checked == 0:
            raise not_found("account", str(user_id))
        return checked, mismatches

    async def change_plan(self, user_id: uuid.UUID, plan: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(Q["change_plan"], user_id, plan, timeout=self.timeout())
        assert row is not None
        if not row["plan_exists"]:
            raise invalid_argument([("plan", f"unknown plan {plan!r}")])
        if row["user_id"] is None:
            raise not_found("account", str(user_id))
        return row

    # OTP challenges. The flows (otp.py) hold a transaction and the email's lock.

    async def lock_email(self, conn: db.Connection, email: str) -> None:
        await conn.execute(Q["lock_email"], email, timeout=self.timeout())

    async def otp_requests_since(self, conn: db.Connection, email: str, since: datetime) -> tuple[int, datetime | None]:
        row = await conn.fetchrow(Q["otp_requests_since"], email, since, timeout=self.timeout())
        assert row is not None
        return row["requests"], row["oldest"]

    async def supersede_otps(self, conn: db.Connection, email: str, now: datetime) -> None:
        await conn.execute(Q["supersede_otps"], email, now, timeout=self.timeout())

    async def insert_otp(
        self,
        conn: db.Connection,
        challenge_id: uuid.UUID,
        email: str,
        code_hash: bytes,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        await conn.execute(Q["insert_otp"], challenge_id, email, code_hash, now, expires_at, timeout=self.timeout())

    async def newest_otp_for_update(self, conn: db.Connection, email: str) -> asyncpg.Record | None:
        return await conn.fetchrow(Q["newest_otp_for_update"], email, timeout=self.timeout())

    async def record_otp_attempt(
        self, conn: db.Connection, challenge_id: uuid.UUID, invalidate_at: datetime | None
    ) -> None:
        await conn.execute(Q["record_otp_attempt"], challenge_id, invalidate_at, timeout=self.timeout())

    async def consume_otp(
        self, conn: db.Connection, challenge_id: uuid.UUID, user_id: uuid.UUID, now: datetime
    ) -> None:
        status = await conn.execute(Q["consume_otp"], challenge_id, user_id, now, timeout=self.timeout())
        # The row is locked and was checked live: anything else is a bug, not a race.
        assert status == "UPDATE 1", status

    async def user_by_email_on(self, conn: db.Connection, email: str) -> asyncpg.Record | None:
        return await conn.fetchrow(Q["user_by_email"], email, timeout=self.timeout())

    async def delete_expired_otps(self, expired_before: datetime, batch_size: int = OTP_DELETE_BATCH) -> int:
        """Deletes in batches of short transactions, so cleanup never holds many row locks."""
        deleted = 0
        while True:
            status = await self.pool.execute(
                Q["delete_expired_otps"], expired_before, batch_size, timeout=self.timeout()
            )
            count = int(status.split()[-1])
            deleted += count
            if count < batch_size:
                return deleted

    # Monthly refill.

    async def refill_batch(
        self, conn: db.Connection, after: uuid.UUID, limit: int, period_end: datetime
    ) -> list[asyncpg.Record]:
        return await conn.fetch(Q["refill_batch"], after, limit, period_end, timeout=self.timeout())
