"""Every database call of the token service; the SQL lives in queries.sql.

Methods return typed records (model.py), None for a missing row, and raise the model's
refusals for a write the data refuses. Each runs on the pool, or on a caller's
transaction when given `conn=`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import asyncpg

from blumpo_common import db
from token_service.model import (
    Account,
    AppendResult,
    BalanceMismatch,
    EmailTaken,
    EntryRequest,
    ListedEntry,
    OtpChallenge,
    OtpRequests,
    RefillAccount,
    UnknownPlan,
    User,
)

Q = db.load_queries(Path(__file__).with_name("queries.sql"))
MAX_MISMATCHES = 1000
OTP_DELETE_BATCH = 1000
_END_OF_TIME = datetime.max
_MAX_SEQ = 2**63 - 1


class Store(db.BaseStore):
    queries = Q

    async def create_user(
        self, email: str, plan: str, max_balance: int, created_by: str, *, conn: db.Connection | None = None
    ) -> User:
        """Creates the user, account and signup grant (credited up to max_balance, as any credit, and
        written by created_by); EmailTaken or UnknownPlan when refused."""
        try:
            row = await self.fetchrow("create_user", email, plan, max_balance, created_by, conn=conn)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "app_user_email_key":
                raise EmailTaken(email) from None
            raise
        if row is None:
            raise UnknownPlan(plan)
        return User.from_row(row)

    async def user_by_id(self, user_id: uuid.UUID, *, conn: db.Connection | None = None) -> User | None:
        row = await self.fetchrow("user_by_id", user_id, conn=conn)
        return None if row is None else User.from_row(row)

    async def user_by_email(self, email: str, *, conn: db.Connection | None = None) -> User | None:
        row = await self.fetchrow("user_by_email", email, conn=conn)
        return None if row is None else User.from_row(row)

    async def user_exists(self, user_id: uuid.UUID, *, conn: db.Connection | None = None) -> bool:
        return bool(await self.fetchval("user_exists", user_id, conn=conn))

    async def account(self, user_id: uuid.UUID, *, conn: db.Connection | None = None) -> Account | None:
        row = await self.fetchrow("account", user_id, conn=conn)
        return None if row is None else Account.from_row(row)

    async def change_plan(self, user_id: uuid.UUID, plan: str, *, conn: db.Connection | None = None) -> Account | None:
        """The account on its new plan; None without an account, UnknownPlan for an unknown plan."""
        row = await self.fetchrow("change_plan", user_id, plan, conn=conn)
        assert row is not None
        if not row["plan_exists"]:
            raise UnknownPlan(plan)
        return None if row["user_id"] is None else Account.from_row(row)

    # The ledger.

    async def append_entries(
        self,
        requests: Sequence[EntryRequest],
        max_balance: int,
        created_by: str,
        *,
        conn: db.Connection | None = None,
    ) -> list[AppendResult]:
        """Applies the requests in order, in one statement, each entry written naming created_by;
        one result per request, in order."""
        return await self._append_batch("append_entries", requests, max_balance, created_by, conn)

    async def append_entry(
        self, request: EntryRequest, max_balance: int, created_by: str, *, conn: db.Connection | None = None
    ) -> AppendResult:
        """Applies one request by the lean single-entry function."""
        row = await self.fetchrow(
            "append_entry",
            user_id=request.user_id,
            delta=request.delta,
            reason=request.reason,
            reference_id=request.reference_id,
            max_balance=max_balance,
            created_by=created_by,
            conn=conn,
        )
        assert row is not None, "token.append_entry answers once"
        return AppendResult.from_row(row)

    async def append_distinct_entries(
        self, requests: Sequence[EntryRequest], max_balance: int, created_by: str, *, conn: db.Connection | None = None
    ) -> list[AppendResult]:
        """Applies requests naming each account once, set-based; one result per request, in order."""
        return await self._append_batch("append_distinct_entries", requests, max_balance, created_by, conn)

    async def _append_batch(
        self,
        query: str,
        requests: Sequence[EntryRequest],
        max_balance: int,
        created_by: str,
        conn: db.Connection | None,
    ) -> list[AppendResult]:
        rows = await self.fetch(
            query,
            user_ids=[r.user_id for r in requests],
            deltas=[r.delta for r in requests],
            reasons=[r.reason for r in requests],
            reference_ids=[r.reference_id for r in requests],
            max_balance=max_balance,
            created_by=created_by,
            conn=conn,
        )
        assert len(rows) == len(requests), f"{query} answers once per entry"
        return [AppendResult.from_row(row) for row in rows]

    async def list_entries(
        self, user_id: uuid.UUID, after: tuple[datetime, int] | None, limit: int, *, conn: db.Connection | None = None
    ) -> list[ListedEntry]:
        """The user's entries newest first, after the position `after` (None: from the newest)."""
        occurred_at, seq = after or (_END_OF_TIME, _MAX_SEQ)
        rows = await self.fetch("list_entries", user_id, occurred_at, seq, limit, conn=conn)
        return [ListedEntry.from_row(row) for row in rows]

    async def check_balances(
        self, user_id: uuid.UUID | None, *, conn: db.Connection | None = None
    ) -> tuple[int, list[BalanceMismatch]]:
        """How many accounts were checked (all, or the user's), and (up to MAX_MISMATCHES of)
        those whose balance disagrees with their ledger; without conn, on one snapshot."""
        if conn is None:
            async with self.transaction(isolation="repeatable_read", readonly=True) as snapshot:
                return await self.check_balances(user_id, conn=snapshot)
        checked = await self.fetchval("count_accounts", user_id, conn=conn)
        rows = await self.fetch("balance_mismatches", user_id, MAX_MISMATCHES, conn=conn)
        return checked, [BalanceMismatch.from_row(row) for row in rows]

    # OTP challenges. The flows (otp.py) hold a transaction and the email's lock.

    async def lock_email(self, email: str, *, conn: db.Connection) -> None:
        """Held until conn's transaction ends."""
        await self.execute("lock_email", email, conn=conn)

    async def lock_otp_requests(self, *, conn: db.Connection) -> None:
        """Serializes issuing codes until conn's transaction ends (see queries.sql)."""
        await self.execute("lock_otp_requests", conn=conn)

    async def otp_requests_since(
        self, email: str, since: datetime, *, conn: db.Connection | None = None
    ) -> OtpRequests:
        row = await self.fetchrow("otp_requests_since", email, since, conn=conn)
        assert row is not None
        return OtpRequests.from_row(row)

    async def otp_client_requests_since(
        self, client: str, since: datetime, *, conn: db.Connection | None = None
    ) -> OtpRequests:
        row = await self.fetchrow("otp_client_requests_since", client, since, conn=conn)
        assert row is not None
        return OtpRequests.from_row(row)

    async def otp_mails_since(self, since: datetime, *, conn: db.Connection | None = None) -> OtpRequests:
        row = await self.fetchrow("otp_mails_since", since, conn=conn)
        assert row is not None
        return OtpRequests.from_row(row)

    async def withdraw_otp(self, challenge_id: uuid.UUID, *, conn: db.Connection | None = None) -> None:
        """Deletes an unused challenge (its code was not sent)."""
        await self.execute("withdraw_otp", challenge_id, conn=conn)

    async def insert_otp(
        self,
        *,
        challenge_id: uuid.UUID,
        email: str,
        code_hash: bytes,
        created_at: datetime,
        expires_at: datetime,
        client: str | None,
        conn: db.Connection | None = None,
    ) -> None:
        await self.execute(
            "insert_otp",
            id=challenge_id,
            email=email,
            code_hash=code_hash,
            created_at=created_at,
            expires_at=expires_at,
            client=client,
            conn=conn,
        )

    async def live_otps_for_update(self, email: str, now: datetime, *, conn: db.Connection) -> list[OtpChallenge]:
        """The email's challenges whose codes still work, newest first; locked until conn's
        transaction ends."""
        rows = await self.fetch("live_otps_for_update", email, now, conn=conn)
        return [OtpChallenge.from_row(row) for row in rows]

    async def lock_otp_client(self, client: str, *, conn: db.Connection) -> None:
        """Serializes one client's verifications until conn's transaction ends (see queries.sql)."""
        await self.execute("lock_otp_client", client, conn=conn)

    async def otp_failures_since(
        self, email: str, client: str, since: datetime, *, conn: db.Connection | None = None
    ) -> OtpRequests:
        row = await self.fetchrow("otp_failures_since", email, client, since, conn=conn)
        assert row is not None
        return OtpRequests.from_row(row)

    async def otp_client_failures_since(
        self, client: str, since: datetime, *, conn: db.Connection | None = None
    ) -> OtpRequests:
        row = await self.fetchrow("otp_client_failures_since", client, since, conn=conn)
        assert row is not None
        return OtpRequests.from_row(row)

    async def insert_otp_failure(
        self, email: str, client: str, failed_at: datetime, *, conn: db.Connection | None = None
    ) -> None:
        await self.execute("insert_otp_failure", email, client, failed_at, conn=conn)

    async def end_other_otps(
        self, email: str, kept: uuid.UUID, now: datetime, *, conn: db.Connection | None = None
    ) -> None:
        await self.execute("end_other_otps", email, kept, now, conn=conn)

    async def consume_otp(
        self, challenge_id: uuid.UUID, user_id: uuid.UUID, now: datetime, *, conn: db.Connection | None = None
    ) -> None:
        status = await self.execute("consume_otp", challenge_id, user_id, now, conn=conn)
        # The row is locked and was checked live: anything else is a bug, not a race.
        assert status == "UPDATE 1", status

    async def delete_expired_otps(
        self, expired_before: datetime, batch_size: int = OTP_DELETE_BATCH, *, conn: db.Connection | None = None
    ) -> int:
        """Deletes in batches; without conn each is its own short transaction, so cleanup
        never holds many row locks."""
        deleted = 0
        while True:
            status = await self.execute("delete_expired_otps", expired_before, batch_size, conn=conn)
            count = int(status.split()[-1])
            deleted += count
            if count < batch_size:
                return deleted

    async def delete_old_otp_failures(
        self, before: datetime, batch_size: int = OTP_DELETE_BATCH, *, conn: db.Connection | None = None
    ) -> int:
        """Deletes wrong codes recorded before `before`, in batches like delete_expired_otps."""
        deleted = 0
        while True:
            status = await self.execute("delete_old_otp_failures", before, batch_size, conn=conn)
            count = int(status.split()[-1])
            deleted += count
            if count < batch_size:
                return deleted

    # Monthly refill.

    async def refill_batch(
        self, after: uuid.UUID, limit: int, period_end: datetime, *, conn: db.Connection | None = None
    ) -> list[RefillAccount]:
        """The next accounts after `after`, with their allowance for the period ending at period_end."""
        rows = await self.fetch("refill_batch", after, limit, period_end, conn=conn)
        return [RefillAccount.from_row(row) for row in rows]
