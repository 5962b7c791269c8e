"""OTP login over real channels and the real database, on a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from blumpo_common.timestamps import from_proto
from tests import support
from tests.support import OtpHarness
from token_service import otp as otp_rules
from token_service.config import OtpLimits, SmtpConfig
from token_service.otp_sender import DeliveryError, LogSender, SmtpSender
from token_service.store import Store

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


async def request(otp: OtpHarness, email: str) -> tuple[tpb.RequestOtpResponse, str]:
    response = await otp.token.RequestOtp(tpb.RequestOtpRequest(email=email))
    return response, otp.sender.last_code(email)


async def verify_error(
    otp: OtpHarness, email: str, code: str, expected: grpc.StatusCode, reason: str | None = None
) -> grpc.aio.AioRpcError:
    call = otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code))
    return await support.expect_error(call, expected, reason)


async def challenges(admin: asyncpg.Connection, email: str) -> list[asyncpg.Record]:
    return await admin.fetch("SELECT * FROM token.auth_otp WHERE email = $1 ORDER BY created_at, id", email)


async def test_first_login_creates_the_user_and_links_the_challenge(otp: OtpHarness, admin: asyncpg.Connection) -> None:
    email = support.new_email()
    response, code = await request(otp, email.upper())
    assert uuid.UUID(response.challenge_id)
    assert from_proto(response.expires_at) == otp.clock.now() + timedelta(seconds=600)

    login = await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code))
    assert login.created
    assert login.user.email == email
    assert login.user.account.plan == "free"
    assert login.user.account.balance == 100  # the free plan's signup grant
    [row] = await challenges(admin, email)
    assert str(row["id"]) == response.challenge_id
    assert str(row["user_id"]) == login.user.user_id
    assert row["consumed_at"] is not None

    # A used code does not work twice.
    await verify_error(otp, email, code, UNAUTHENTICATED)

    # The next login finds the same user and grants nothing new.
    _, code = await request(otp, email)
    again = await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code))
    assert not again.created
    assert again.user.user_id == login.user.user_id
    assert again.user.account.balance == 100


async def test_the_code_is_never_in_clear_in_responses_database_or_log(
    otp: OtpHarness, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    email = support.new_email()
    with caplog.at_level(logging.DEBUG):
        response, code = await request(otp, email)
        error = await verify_error(otp, email, wrong(code), UNAUTHENTICATED)
        login = await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code))
    assert code not in str(response) and code.encode() not in response.SerializeToString()
    assert code not in str(error.details()) and code not in str(error.trailing_metadata())
    assert code not in str(login)
    assert code not in caplog.text
    [row] = await challenges(admin, email)
    assert code not in str(dict(row))
    stored = bytes(row["code_hash"])
    assert code.encode() not in stored
    assert stored != hashlib.sha256(code.encode()).digest()
    # It is the keyed hash of this challenge's id and the code.
    assert stored == otp_rules.hash_code(otp.secret, row["id"], code)
    assert stored != otp_rules.hash_code(b"another secret of a good length....", row["id"], code)


async def test_expired_and_wrong_codes_get_the_same_answer(otp: OtpHarness) -> None:
    email = support.new_email()
    _, code = await request(otp, email)
    wrong_answer = await verify_error(otp, email, wrong(code), UNAUTHENTICATED, "OTP_INVALID")
    otp.clock.advance(600)  # exactly at expiry: dead
    expired_answer = await verify_error(otp, email, code, UNAUTHENTICATED, "OTP_INVALID")
    unknown_answer = await verify_error(otp, support.new_email(), code, UNAUTHENTICATED, "OTP_INVALID")
    assert expired_answer.details() == unknown_answer.details() == wrong_answer.details()


async def test_a_code_works_until_just_before_expiry(otp: OtpHarness) -> None:
    email = support.new_email()
    _, code = await request(otp, email)
    otp.clock.advance(599)
    assert (await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code))).created


async def test_a_new_request_leaves_the_earlier_code_working_until_one_logs_in(
    otp: OtpHarness, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    first, first_code = await request(otp, email)
    second, second_code = await request(otp, email)
    assert first.challenge_id != second.challenge_id
    active = {str(r["id"]): r["invalidated_at"] is None for r in await challenges(admin, email)}
    assert active == {first.challenge_id: True, second.challenge_id: True}
    # The earlier code logs in; the login ends the other one.
    assert (await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=first_code))).created
    if first_code != second_code:  # one in a million they are equal
        await verify_error(otp, email, second_code, UNAUTHENTICATED)
    active = {str(r["id"]): r["invalidated_at"] is None for r in await challenges(admin, email)}
    assert active == {first.challenge_id: True, second.challenge_id: False}


async def test_five_wrong_codes_refuse_the_client_and_leave_the_code_working(
    otp: OtpHarness, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    _, code = await request(otp, email)
    for _ in range(1, otp_rules.MAX_ATTEMPTS):
        await verify_error(otp, email, wrong(code), UNAUTHENTICATED)
    otp.clock.advance(60)
    error = await verify_error(otp, email, wrong(code), EXHAUSTED, "OTP_ATTEMPTS_EXHAUSTED")
    # The first miss leaves the window (one code lifetime) in 600 - 60 seconds.
    assert support.retry_delay_seconds(error) == 600 - 60
    # This client is refused from now on, even with the right code, and nothing more is counted.
    await verify_error(otp, email, code, EXHAUSTED, "OTP_ATTEMPTS_EXHAUSTED")
    failures = "SELECT count(*) FROM token.auth_otp_failure WHERE email = $1"
    assert await admin.fetchval(failures, email) == otp_rules.MAX_ATTEMPTS
    # The code itself is untouched: another client (the person, from their own address) logs in.
    [row] = await challenges(admin, email)
    assert row["invalidated_at"] is None and row["consumed_at"] is None
    metadata = [("x-forwarded-for", "192.0.2.44")]
    assert (await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code), metadata=metadata)).created


async def test_per_email_codes_within_one_lifetime_then_resource_exhausted_with_retry_delay(
    otp: OtpHarness, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    per_email = OtpLimits().per_email
    for _ in range(per_email):
        _, newest = await request(otp, email)
        otp.clock.advance(60)
    before = await support.row_counts(admin, "token")
    sent = len(otp.sender.sent)
    error = await support.expect_error(
        otp.token.RequestOtp(tpb.RequestOtpRequest(email=email)), EXHAUSTED, "OTP_RATE_LIMITED"
    )
    # The oldest request (180 s ago) leaves the window of one code lifetime (600 s) in 420 s.
    delay = support.retry_delay_seconds(error)
    assert delay == 600 - per_email * 60
    assert await support.row_counts(admin, "token") == before
    assert len(otp.sender.sent) == sent
    # Meanwhile the newest code mailed still works: the limit never leaves the address without one.
    otp.clock.advance(delay - 1)
    with pytest.raises(grpc.aio.AioRpcError):
        await otp.token.RequestOtp(tpb.RequestOtpRequest(email=email))
    assert (await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=newest))).created
    otp.clock.advance(1)
    _, code = await request(otp, email)
    assert not (await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code))).created


async def test_rate_limit_is_per_email(otp: OtpHarness) -> None:
    email = support.new_email()
    for _ in range(OtpLimits().per_email):
        await request(otp, email)
    with pytest.raises(grpc.aio.AioRpcError):
        await otp.token.RequestOtp(tpb.RequestOtpRequest(email=email))
    await request(otp, support.new_email())


async def test_concurrent_verifies_with_the_right_code_exactly_one_succeeds(
    otp: OtpHarness, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    _, code = await request(otp, email)
    # From 20 addresses: the used code is a wrong one for the 19 others, one miss each.
    calls = [
        otp.token.VerifyOtp(
            tpb.VerifyOtpRequest(email=email, code=code), metadata=[("x-forwarded-for", f"198.51.100.{index}")]
        )
        for index in range(20)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    successes = [r for r in results if isinstance(r, tpb.VerifyOtpResponse)]
    failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(successes) == 1 and successes[0].created
    assert len(failures) == 19
    assert {f.code() for f in failures} == {UNAUTHENTICATED}
    assert await admin.fetchval("SELECT count(*) FROM token.app_user WHERE email = $1", email) == 1
    user_id = uuid.UUID(successes[0].user.user_id)
    assert await admin.fetchval("SELECT count(*) FROM token.token_ledger WHERE user_id = $1", user_id) == 1


async def test_concurrent_requests_issue_exactly_the_limit_and_every_code_works(
    otp: OtpHarness, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    calls = [otp.token.RequestOtp(tpb.RequestOtpRequest(email=email)) for _ in range(12)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if isinstance(r, tpb.RequestOtpResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    per_email = OtpLimits().per_email
    assert len(ok) == per_email
    assert {r.code() for r in refused} == {EXHAUSTED}
    rows = await challenges(admin, email)
    active = [r for r in rows if r["invalidated_at"] is None and r["consumed_at"] is None]
    assert len(rows) == len(active) == per_email
    # Codes are mailed after the email's lock is released, in any order: each matches one row.
    mailed = [code for to, code in otp.sender.sent if to == email]
    assert len(mailed) == per_email
    for row in active:
        assert sum(otp_rules.code_matches(otp.secret, row["id"], code, row["code_hash"]) for code in mailed) == 1
    assert (await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=mailed[-1]))).created


async def test_failed_delivery_writes_nothing_and_keeps_the_previous_code(
    otp: OtpHarness, admin: asyncpg.Connection
) -> None:
    email = support.new_email()
    _, code = await request(otp, email)
    before = await support.row_counts(admin, "token")
    otp.sender.fail = True
    try:
        await support.expect_error(
            otp.token.RequestOtp(tpb.RequestOtpRequest(email=email)), grpc.StatusCode.UNAVAILABLE, "OTP_DELIVERY_FAILED"
        )
    finally:
        otp.sender.fail = False
    assert await support.row_counts(admin, "token") == before
    assert (await otp.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code))).created


async def test_cleanup_deletes_challenges_expired_long_enough_ago(otp: OtpHarness, admin: asyncpg.Connection) -> None:
    old = [support.new_email() for _ in range(3)]
    for email in old:
        _, code = await request(otp, email)
        await verify_error(otp, email, wrong(code), UNAUTHENTICATED)
    otp.clock.advance(600 + 24 * 3600 + 1)  # expired just over 24 hours ago
    recent = support.new_email()
    _, code = await request(otp, recent)
    await verify_error(otp, recent, wrong(code), UNAUTHENTICATED)
    otp.clock.advance(600 + 3600 + 1)  # the recent one expired just over an hour ago
    deleted = (await otp.token.DeleteExpiredOtps(tpb.DeleteExpiredOtpsRequest())).deleted
    assert deleted >= len(old)
    assert await admin.fetchval("SELECT count(*) FROM token.auth_otp WHERE email = ANY($1)", old) == 0
    # The wrong codes go with them: every window that counts them is shorter than the cutoff.
    failures = "SELECT count(*) FROM token.auth_otp_failure WHERE email = ANY($1)"
    assert await admin.fetchval(failures, old) == 0
    assert len(await challenges(admin, recent)) == 1
    assert await admin.fetchval(failures, [recent]) == 1
    assert (await otp.token.DeleteExpiredOtps(tpb.DeleteExpiredOtpsRequest(older_than_hours=1))).deleted >= 1
    assert await challenges(admin, recent) == []
    assert await admin.fetchval(failures, [recent]) == 0


async def test_cleanup_works_in_batches(token_store: Store, admin: asyncpg.Connection) -> None:
    emails = [support.new_email() for _ in range(5)]
    await admin.executemany(
        "INSERT INTO token.auth_otp (email, code_hash, created_at, expires_at) "
        "VALUES ($1, $2, '2001-01-01', '2001-01-01 00:10')",
        [(email, bytes(32)) for email in emails],
    )
    deleted = await token_store.delete_expired_otps(datetime(2001, 1, 2, tzinfo=UTC), batch_size=2)
    assert deleted == 5
    assert await admin.fetchval("SELECT count(*) FROM token.auth_otp WHERE email = ANY($1)", emails) == 0


async def test_the_development_sender_writes_the_code_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        await LogSender().send("a@example.com", "123456", datetime.now(UTC))
    [record] = caplog.records
    assert record.otp_code == "123456"  # type: ignore[attr-defined]
    assert record.email == "a@example.com"  # type: ignore[attr-defined]


async def test_the_smtp_sender_writes_a_mail_and_reports_an_unreachable_server() -> None:
    config = SmtpConfig("127.0.0.1", 9, "login@blumpo.example", "", "", starttls=True, timeout_seconds=2)
    sender = SmtpSender(config)
    message = sender.message("a@example.com", "123456", datetime(2030, 1, 1, tzinfo=UTC))
    assert message["To"] == "a@example.com" and message["From"] == "login@blumpo.example"
    assert "123456" in message.get_content()
    with pytest.raises(DeliveryError) as caught:
        await sender.send("a@example.com", "123456", datetime(2030, 1, 1, tzinfo=UTC))
    assert "123456" not in str(caught.value)


def test_codes_are_six_digits_and_vary() -> None:
    codes = {otp_rules.generate_code() for _ in range(200)}
    assert all(otp_rules.is_well_formed(code) for code in codes)
    assert len(codes) > 190


class SmtpSink:
    """A minimal SMTP server on a free port that keeps each message it receives."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> SmtpSink:
        self.server = await asyncio.start_server(self.session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := (await reader.readline()).decode().strip():
            verb = line.split()[0].upper()
            if verb == "EHLO":
                writer.write(b"250-sink\r\n250 8BITMIME\r\n")
            elif verb == "DATA":
                writer.write(b"354 end with .\r\n")
                await writer.drain()
                body = await reader.readuntil(b"\r\n.\r\n")
                self.messages.append(body.decode())
                writer.write(b"250 queued\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


async def test_the_smtp_sender_delivers_the_code_by_mail() -> None:
    async with SmtpSink() as sink:
        config = SmtpConfig("127.0.0.1", sink.port, "login@blumpo.example", "", "", starttls=False, timeout_seconds=5)
        await SmtpSender(config).send("ada@example.com", "654321", datetime(2030, 1, 1, tzinfo=UTC))
    [message] = sink.messages
    assert "To: ada@example.com" in message and "From: login@blumpo.example" in message
    assert "654321" in message
