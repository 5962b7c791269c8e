"""The TokenService servicer: validates requests, calls the store, builds responses."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import email_validator

from blumpo.token.v1 import token_pb2 as pb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import authz, timestamps
from blumpo_common.callers import caller_of, metadata_value
from blumpo_common.enums import ProtoEnum
from blumpo_common.errors import ServiceError, to_status
from blumpo_common.pagination import PageTokens, int64_tiebreak
from blumpo_common.server import Context
from blumpo_common.timestamps import to_proto
from blumpo_common.validation import Checker
from token_service import errors, ledger, otp, refill
from token_service.group_commit import GroupCommit
from token_service.model import (
    Account,
    BalanceMismatch,
    EmailTaken,
    EntryRequest,
    LedgerEntry,
    LedgerReason,
    UnknownPlan,
    User,
)
from token_service.store import Store

ERROR_DOMAIN = "blumpo.token"
DEFAULT_PLAN = "free"
MAX_BATCH = 1000
DEFAULT_OTP_CLEANUP_HOURS = 24
# A year; at least 1, so cleanup never deletes a challenge the hourly rate limit still counts.
MAX_OTP_CLEANUP_HOURS = 24 * 366

REASONS = ProtoEnum(pb.LedgerReason, LedgerReason)
# The end user's address, as the web tier passes it on (for the login-code limits per client).
FORWARDED_FOR = "x-forwarded-for"
# Kept from the end: the address that counts is the last entry (the one the web tier's proxy
# appended), so a long header written by the end user must not push it out.
MAX_FORWARDED_FOR = 1024


def forwarded_for(context: Context) -> str:
    """The end of the x-forwarded-for chain (bounded), or ""."""
    return metadata_value(context, FORWARDED_FOR, sys.maxsize)[-MAX_FORWARDED_FOR:]


def check_email(check: Checker, field: str, raw: str) -> str:
    """The address in one canonical form (Unicode NFC, Unicode domain, lower case), so one
    mailbox is one user however it is typed."""
    email = raw.strip()
    if not email:
        check.add(field, "is required")
        return email
    try:
        return email_validator.validate_email(email, check_deliverability=False).normalized.lower()
    except email_validator.EmailNotValidError as exc:
        check.add(field, f"is not a valid email address: {exc}")
    return email.lower()


def check_plan(check: Checker, field: str, plan: str) -> str:
    return check.text(field, plan, max_len=32)


def user_message(user: User) -> pb.User:
    return pb.User(
        user_id=str(user.id),
        email=user.email,
        created_at=to_proto(user.created_at),
        account=account_message(user.account),
    )


def account_message(account: Account) -> pb.TokenAccount:
    return pb.TokenAccount(
        user_id=str(account.user_id),
        balance=account.balance,
        plan=account.plan,
        updated_at=to_proto(account.updated_at),
    )


def entry_message(entry: LedgerEntry, into: pb.LedgerEntry | None = None) -> pb.LedgerEntry:
    """The entry as a message: a new one, or written into `into`, a field of a message being
    built (a message given to a constructor is copied; a batch answers a thousand)."""
    message = pb.LedgerEntry() if into is None else into
    message.entry_id = str(entry.id)
    message.user_id = str(entry.user_id)
    message.delta = entry.delta
    message.reason = REASONS.to_proto(entry.reason)
    message.reference_id = entry.reference_id
    message.balance_after = entry.balance_after
    timestamps.put(entry.occurred_at, message.occurred_at)
    message.created_by = entry.created_by
    return message


def mismatch_message(mismatch: BalanceMismatch) -> pb.BalanceMismatch:
    return pb.BalanceMismatch(
        user_id=str(mismatch.user_id),
        account_balance=mismatch.account_balance,
        ledger_sum=mismatch.ledger_sum,
        last_balance_after=mismatch.last_balance_after,
    )


def entry_request(request: pb.AppendLedgerEntryRequest, prefix: str = "") -> EntryRequest:
    """The requested entry; INVALID_ARGUMENT naming each bad field (under prefix), then
    CALLER_NOT_ALLOWED when the caller may not write its reason."""
    check = Checker(prefix)
    user_id = check.uuid("user_id", request.user_id)
    if request.delta == 0 or abs(request.delta) > ledger.MAX_DELTA:
        check.add("delta", f"must be non-zero and at most {ledger.MAX_DELTA} in absolute value, got {request.delta}")
    reason = check.choice("reason", request.reason, REASONS.by_number)
    reference_id = check.text("reference_id", request.reference_id, max_len=ledger.MAX_REFERENCE_LENGTH)
    if reference_id and reference_id != reference_id.strip():
        # "job-1" and "job-1 " would be two references: a blank or padded one is refused.
        check.add("reference_id", "must not be blank or start or end with whitespace")
    check.done()
    assert reason is not None  # else check.done() raised
    # Well-formed, so it is for the policy now: may this caller write this reason?
    authz.check_reason(reason)
    return EntryRequest(user_id, request.delta, reason, request.reference_id)


def raise_error(outcome: ledger.Outcome) -> LedgerEntry:
    if outcome.error is not None:
        raise outcome.error
    assert outcome.entry is not None
    return outcome.entry


class TokenApi(token_pb2_grpc.TokenServiceServicer):
    def __init__(self, store: Store, logins: otp.OtpLogins, pages: PageTokens) -> None:
        self.store = store
        self.logins = logins
        self.pages = pages
        self.group_commit = GroupCommit(store)

    async def CreateUser(self, request: pb.CreateUserRequest, context: Context) -> pb.CreateUserResponse:
        check = Checker()
        email = check_email(check, "email", request.email)
        plan = check_plan(check, "plan", request.plan or DEFAULT_PLAN)
        check.done()
        try:
            user = await self.store.create_user(email, plan, ledger.MAX_BALANCE, caller_of(context))
        except EmailTaken:
            raise errors.email_taken(email) from None
        except UnknownPlan:
            raise errors.unknown_plan(plan) from None
        ledger.count_signup(user)
        return pb.CreateUserResponse(user=user_message(user))

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        check = Checker()
        lookup = request.WhichOneof("lookup")
        if lookup == "user_id":
            user_id = check.uuid("user_id", request.user_id)
            check.done()
            user, key = await self.store.user_by_id(user_id), str(user_id)
        elif lookup == "email":
            email = check_email(check, "email", request.email)
            check.done()
            user, key = await self.store.user_by_email(email), email
        else:
            check.add("user_id", "or email is required")
            check.done()
        if user is None:
            raise errors.user_not_found(key)
        return pb.GetUserResponse(user=user_message(user))

    async def GetTokenBalance(self, request: pb.GetTokenBalanceRequest, context: Context) -> pb.GetTokenBalanceResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        check.done()
        account = await self.store.account(user_id)
        if account is None:
            raise errors.account_not_found(user_id)
        return pb.GetTokenBalanceResponse(user_id=str(account.user_id), balance=account.balance, plan=account.plan)

    async def AppendLedgerEntry(
        self, request: pb.AppendLedgerEntryRequest, context: Context
    ) -> pb.AppendLedgerEntryResponse:
        outcome = await self.group_commit.append(entry_request(request), caller_of(context))
        return pb.AppendLedgerEntryResponse(entry=entry_message(raise_error(outcome)), replayed=outcome.replayed)

    async def AppendLedgerEntries(
        self, request: pb.AppendLedgerEntriesRequest, context: Context
    ) -> pb.AppendLedgerEntriesResponse:
        count = len(request.entries)
        if not 1 <= count <= MAX_BATCH:
            check = Checker()
            check.add("entries", f"must hold 1 to {MAX_BATCH} entries, got {count}")
            check.done()
        # Each entry is judged alone: a malformed one fails only itself.
        refused: list[ledger.Outcome | None] = []
        valid: list[EntryRequest] = []
        for index, item in enumerate(request.entries):
            try:
                valid.append(entry_request(item, prefix=f"entries[{index}]."))
                refused.append(None)
            except ServiceError as error:
                refused.append(ledger.Outcome(error=error))
        outcomes = iter(await ledger.append(self.store, valid, caller_of(context)))
        response = pb.AppendLedgerEntriesResponse()
        for outcome in refused:
            _put_result(outcome or next(outcomes), response.results.add())
        return response

    async def ListLedgerEntries(
        self, request: pb.ListLedgerEntriesRequest, context: Context
    ) -> pb.ListLedgerEntriesResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        page_size = check.page_size("page_size", request.page_size, default=50)
        check.done()
        scope = f"ledger:{user_id}"
        after = self.pages.decode(scope, request.page_token, int64_tiebreak)
        listed = await self.store.list_entries(user_id, after, page_size + 1)
        if not listed and after is None and not await self.store.user_exists(user_id):
            raise errors.user_not_found(user_id)
        positions = [listed_entry.position for listed_entry in listed]
        return pb.ListLedgerEntriesResponse(
            entries=[entry_message(listed_entry.entry) for listed_entry in listed[:page_size]],
            next_page_token=self.pages.next_page_token(scope, positions, page_size),
        )

    async def CheckBalances(self, request: pb.CheckBalancesRequest, context: Context) -> pb.CheckBalancesResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id) if request.user_id else None
        check.done()
        checked, mismatches = await self.store.check_balances(user_id)
        if user_id is not None and checked == 0:
            raise errors.account_not_found(user_id)
        return pb.CheckBalancesResponse(accounts_checked=checked, mismatches=[mismatch_message(m) for m in mismatches])

    async def ChangePlan(self, request: pb.ChangePlanRequest, context: Context) -> pb.ChangePlanResponse:
        check = Checker()
        user_id = check.uuid("user_id", request.user_id)
        plan = check_plan(check, "plan", request.plan)
        check.done()
        try:
            account = await self.store.change_plan(user_id, plan)
        except UnknownPlan:
            raise errors.unknown_plan(plan) from None
        if account is None:
            raise errors.account_not_found(user_id)
        authz.audit("plan changed", user_id=str(user_id), plan=plan)
        return pb.ChangePlanResponse(account=account_message(account))

    async def RunMonthlyRefill(
        self, request: pb.RunMonthlyRefillRequest, context: Context
    ) -> pb.RunMonthlyRefillResponse:
        check = Checker()
        period = refill.check_period(check, "period", request.period, datetime.now(UTC).date())
        check.done()
        result = await refill.run(self.store, period, caller_of(context))
        authz.audit("monthly refill", period=period, credited=result.credited, skipped=result.skipped)
        return pb.RunMonthlyRefillResponse(accounts_credited=result.credited, accounts_skipped=result.skipped)

    async def RequestOtp(self, request: pb.RequestOtpRequest, context: Context) -> pb.RequestOtpResponse:
        check = Checker()
        email = check_email(check, "email", request.email)
        check.done()
        client = otp.client_key(caller_of(context), forwarded_for(context))
        challenge = await self.logins.request(email, client)
        return pb.RequestOtpResponse(challenge_id=str(challenge.id), expires_at=to_proto(challenge.expires_at))

    async def VerifyOtp(self, request: pb.VerifyOtpRequest, context: Context) -> pb.VerifyOtpResponse:
        check = Checker()
        email = check_email(check, "email", request.email)
        if not otp.is_well_formed(request.code):
            check.add("code", f"must be the {otp.CODE_DIGITS}-digit code from the email")
        check.done()
        caller = caller_of(context)
        client = otp.client_key(caller, forwarded_for(context))
        login = await self.logins.verify(email, request.code, caller, client)
        return pb.VerifyOtpResponse(user=user_message(login.user), created=login.created)

    async def DeleteExpiredOtps(
        self, request: pb.DeleteExpiredOtpsRequest, context: Context
    ) -> pb.DeleteExpiredOtpsResponse:
        check = Checker()
        hours = request.older_than_hours or DEFAULT_OTP_CLEANUP_HOURS
        check.in_range("older_than_hours", hours, 1, MAX_OTP_CLEANUP_HOURS)
        check.done()
        deleted = await self.logins.delete_expired(timedelta(hours=hours))
        authz.audit("expired login codes deleted", older_than_hours=hours, deleted=deleted)
        return pb.DeleteExpiredOtpsResponse(deleted=deleted)


def _put_result(outcome: ledger.Outcome, into: pb.AppendLedgerEntryResult) -> None:
    """Writes the outcome into a batch answer's result (built in place, see entry_message)."""
    if outcome.error is not None:
        into.status.CopyFrom(to_status(outcome.error, ERROR_DOMAIN))
        return
    assert outcome.entry is not None
    entry_message(outcome.entry, into.entry)
    into.replayed = outcome.replayed
    into.status.SetInParent()  # code 0: the entry was written or replayed
