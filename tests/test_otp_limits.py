"""Login-code abuse limits: per email, per client (the calling service and the end user's
address it passes on), and on mail per minute in all; wrong codes per email and client and
per client; none of them, nor anyone's wrong codes, can leave a person without a working code
for longer than a code's lifetime."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import server
from blumpo_common.db import create_pool
from tests import support
from tests.conftest import OTP_TEST_SECRET, database_config
from tests.support import TokenStub
from token_service.config import OtpLimits
from token_service.otp import MAX_ATTEMPTS, OtpLogins
from token_service.server import service as token_service
from token_service.store import Store

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
ATTACKER = "203.0.113.9"
VICTIM = "192.0.2.10"
TTL_SECONDS = 600
Serve = Callable[[OtpLimits], AbstractAsyncContextManager["Limited"]]
# Each test's clock starts a day after the previous one's, so no test counts another's codes.
DAYS = itertools.count(1)


class Limited:
    """A token server with these OTP limits, a fake clock and a capturing mailbox."""

    def __init__(self, token: TokenStub, clock: support.FakeClock, sender: support.CapturingSender) -> None:
        self.token, self.clock, self.sender = token, clock, sender
        self.started = clock.now()

    async def failures(self, admin: asyncpg.Connection, address: str) -> int:
        """The wrong codes counted against the web tier's end user at address in this test."""
        query = "SELECT count(*) FROM token.auth_otp_failure WHERE client = $1 AND failed_at >= $2"
        count: int = await admin.fetchval(query, f"web|{address}", self.started)
        return count

    def request(self, email: str, address: str = "", caller: str = "web") -> grpc.aio.UnaryUnaryCall:  # type: ignore[type-arg]
        metadata = [("x-blumpo-caller", caller)] + ([("x-forwarded-for", address)] if address else [])
        return self.token.RequestOtp(tpb.RequestOtpRequest(email=email), metadata=metadata)

    def verify(self, email: str, code: str, address: str = "", caller: str = "web") -> grpc.aio.UnaryUnaryCall:  # type: ignore[type-arg]
        metadata = [("x-blumpo-caller", caller)] + ([("x-forwarded-for", address)] if address else [])
        return self.token.VerifyOtp(tpb.VerifyOtpRequest(email=email, code=code), metadata=metadata)

    async def logs_in(self, email: str, code: str, address: str = "") -> bool:
        try:
            await self.verify(email, code, address)
        except grpc.aio.AioRpcError:
            return False
        return True


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    made = await create_pool(database_config(database_url, "token_service"))
    yield made
    await made.close()


@pytest.fixture
def limited(pool: asyncpg.Pool) -> Serve:
    @asynccontextmanager
    async def serve(limits: OtpLimits) -> AsyncIterator[Limited]:
        clock, sender = support.FakeClock(), support.CapturingSender()
        clock.advance(86_400 * next(DAYS))
        store = Store(pool, 30.0)
        logins = OtpLogins(store, sender, clock, OTP_TEST_SECRET, TTL_SECONDS, limits)
        running = await server.start(token_service(store, logins), pool, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                yield Limited(token_pb2_grpc.TokenServiceStub(channel), clock, sender)
        finally:
            await running.stop(1)

    return serve


async def test_a_client_is_limited_across_emails_and_other_clients_are_not(
    limited: Serve, admin: asyncpg.Connection
) -> None:
    async with limited(OtpLimits(per_email=3, per_client_per_hour=3, mails_per_minute=100)) as otp:
        for _ in range(3):
            await otp.request(support.new_email(), "203.0.113.5")
            otp.clock.advance(60)
        before = await admin.fetchval("SELECT count(*) FROM token.auth_otp")
        error = await support.expect_error(
            # An address the end user wrote in front changes nothing: the last entry counts.
            otp.request(support.new_email(), "10.0.0.1, 203.0.113.5"),
            EXHAUSTED,
            "OTP_CLIENT_RATE_LIMITED",
        )
        # The first of the three leaves the hour in 3600 - 180 seconds.
        assert support.retry_delay_seconds(error) == 3600 - 180
        assert support.error_info(error).metadata["limit"] == "3"
        assert await admin.fetchval("SELECT count(*) FROM token.auth_otp") == before
        # Another address through the same service, and the same address through another
        # service, are other clients.
        await otp.request(support.new_email(), "198.51.100.7")
        await otp.request(support.new_email(), "203.0.113.5", caller="partner")
        otp.clock.advance(3600 - 180)
        await otp.request(support.new_email(), "203.0.113.5")


async def test_someone_asking_for_a_persons_codes_never_takes_their_login_away(
    limited: Serve,
) -> None:
    async with limited(OtpLimits(per_email=3, per_client_per_hour=100, mails_per_minute=100)) as otp:
        victim = support.new_email()
        await otp.request(victim, "192.0.2.10")
        held = otp.sender.last_code(victim)
        # An attacker asks for the victim's codes until the email's limit refuses.
        otp.clock.advance(30)
        for _ in range(2):
            await otp.request(victim, "203.0.113.66")
        await support.expect_error(otp.request(victim, "203.0.113.66"), EXHAUSTED, "OTP_RATE_LIMITED")
        # The victim's own request is refused too, for less than a code's lifetime...
        refused = await support.expect_error(otp.request(victim, "192.0.2.10"), EXHAUSTED, "OTP_RATE_LIMITED")
        assert 0 < support.retry_delay_seconds(refused) <= TTL_SECONDS
        # ...while every code in the victim's mailbox still works: the one they held first.
        assert await otp.logs_in(victim, held)


async def test_a_person_refused_by_the_email_limit_holds_a_live_code(
    limited: Serve,
) -> None:
    """Whatever the timing: when the limit refuses, the newest code mailed is still live."""
    async with limited(OtpLimits(per_email=2, per_client_per_hour=100, mails_per_minute=100)) as otp:
        victim = support.new_email()
        await otp.request(victim, "203.0.113.66")
        otp.clock.advance(TTL_SECONDS - 1)
        await otp.request(victim, "203.0.113.66")
        refused = await support.expect_error(otp.request(victim, "192.0.2.10"), EXHAUSTED, "OTP_RATE_LIMITED")
        assert support.retry_delay_seconds(refused) == 1
        assert await otp.logs_in(victim, otp.sender.last_code(victim))


async def test_mail_per_minute_has_a_ceiling(limited: Serve) -> None:
    async with limited(OtpLimits(per_email=3, per_client_per_hour=100, mails_per_minute=5)) as otp:
        for index in range(5):
            await otp.request(support.new_email(), f"198.51.100.{index}")
            otp.clock.advance(5)
        error = await support.expect_error(
            otp.request(support.new_email(), "198.51.100.9"), EXHAUSTED, "OTP_MAIL_CEILING"
        )
        assert support.retry_delay_seconds(error) == 60 - 25
        assert len(otp.sender.sent) == 5
        otp.clock.advance(35)
        await otp.request(support.new_email(), "198.51.100.9")


async def test_the_ceiling_holds_under_concurrent_requests(limited: Serve, admin: asyncpg.Connection) -> None:
    async with limited(OtpLimits(per_email=3, per_client_per_hour=100, mails_per_minute=10)) as otp:
        calls = [otp.request(support.new_email(), f"198.51.100.{index}") for index in range(40)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r for r in results if isinstance(r, tpb.RequestOtpResponse)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 10 and len(otp.sender.sent) == 10
        assert len(refused) == 30 and {support.error_info(r).reason for r in refused} == {"OTP_MAIL_CEILING"}
        now = otp.clock.now()
        assert await admin.fetchval("SELECT count(*) FROM token.auth_otp WHERE created_at = $1", now) == 10


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


async def test_wrong_codes_from_another_client_never_lock_a_person_out(
    limited: Serve, admin: asyncpg.Connection
) -> None:
    async with limited(OtpLimits()) as otp:
        victim = support.new_email()
        await otp.request(victim, VICTIM)
        code = otp.sender.last_code(victim)
        for _ in range(MAX_ATTEMPTS - 1):
            await support.expect_error(otp.verify(victim, wrong(code), ATTACKER), UNAUTHENTICATED, "OTP_INVALID")
        otp.clock.advance(30)
        used_up = await support.expect_error(
            otp.verify(victim, wrong(code), ATTACKER), EXHAUSTED, "OTP_ATTEMPTS_EXHAUSTED"
        )
        assert support.retry_delay_seconds(used_up) == TTL_SECONDS - 30
        # The attacker is refused from now on, even with the right code, and nothing more is counted.
        for guess in (wrong(code), wrong(wrong(code)), code):
            await support.expect_error(otp.verify(victim, guess, ATTACKER), EXHAUSTED, "OTP_ATTEMPTS_EXHAUSTED")
        assert await otp.failures(admin, ATTACKER) == MAX_ATTEMPTS
        # The victim's code was never touched.
        assert await otp.logs_in(victim, code, VICTIM)


@pytest.mark.parametrize("which", [0, 1, 2])
async def test_filling_the_email_window_then_guessing_leaves_every_mailed_code_working(
    limited: Serve, which: int
) -> None:
    async with limited(OtpLimits(per_email=3)) as otp:
        victim = support.new_email()
        for _ in range(3):
            await otp.request(victim, ATTACKER)
            otp.clock.advance(10)
        mailed = [code for to, code in otp.sender.sent if to == victim]
        assert len(mailed) == 3
        guess = next(f"{n:06d}" for n in range(10**6) if f"{n:06d}" not in mailed)
        for _ in range(MAX_ATTEMPTS - 1):
            await support.expect_error(otp.verify(victim, guess, ATTACKER), UNAUTHENTICATED)
        await support.expect_error(otp.verify(victim, guess, ATTACKER), EXHAUSTED, "OTP_ATTEMPTS_EXHAUSTED")
        # The victim gets no new code for now (at most one lifetime)...
        refused = await support.expect_error(otp.request(victim, VICTIM), EXHAUSTED, "OTP_RATE_LIMITED")
        assert 0 < support.retry_delay_seconds(refused) <= TTL_SECONDS
        # ...but logs in with any of the three in their mailbox.
        assert await otp.logs_in(victim, mailed[which], VICTIM)


async def test_a_client_is_limited_in_wrong_codes_across_emails(limited: Serve, admin: asyncpg.Connection) -> None:
    async with limited(OtpLimits(failures_per_client_per_hour=6)) as otp:
        for _ in range(6):
            await support.expect_error(otp.verify(support.new_email(), "000000", ATTACKER), UNAUTHENTICATED)
            otp.clock.advance(10)
        victim = support.new_email()
        await otp.request(victim, VICTIM)
        code = otp.sender.last_code(victim)
        error = await support.expect_error(otp.verify(victim, code, ATTACKER), EXHAUSTED, "OTP_CLIENT_RATE_LIMITED")
        # The first of the six leaves the hour in 3600 - 60 seconds.
        assert support.retry_delay_seconds(error) == 3600 - 60
        assert support.error_info(error).metadata["limit"] == "6"
        assert await otp.failures(admin, ATTACKER) == 6
        # Another address, and the same address through another service, are other clients.
        await support.expect_error(otp.verify(support.new_email(), "000000", "198.51.100.7"), UNAUTHENTICATED)
        await support.expect_error(
            otp.verify(support.new_email(), "000000", ATTACKER, caller="partner"), UNAUTHENTICATED
        )
        assert await otp.logs_in(victim, code, VICTIM)
        otp.clock.advance(3600 - 60)
        await support.expect_error(otp.verify(support.new_email(), "000000", ATTACKER), UNAUTHENTICATED)


async def test_a_client_refused_for_an_email_may_try_again_after_one_code_lifetime(limited: Serve) -> None:
    async with limited(OtpLimits()) as otp:
        email = support.new_email()
        await otp.request(email, VICTIM)
        code = otp.sender.last_code(email)
        for _ in range(MAX_ATTEMPTS):
            await otp.logs_in(email, wrong(code), VICTIM)
        otp.clock.advance(TTL_SECONDS - 1)
        error = await support.expect_error(otp.verify(email, code, VICTIM), EXHAUSTED, "OTP_ATTEMPTS_EXHAUSTED")
        assert support.retry_delay_seconds(error) == 1
        otp.clock.advance(1)
        # The window has freed (and the first code has expired with it): a new code logs in.
        await otp.request(email, VICTIM)
        assert await otp.logs_in(email, otp.sender.last_code(email), VICTIM)


async def test_the_last_forwarded_address_is_the_one_counted(limited: Serve, admin: asyncpg.Connection) -> None:
    async with limited(OtpLimits()) as otp:
        victim = support.new_email()
        await otp.request(victim, VICTIM)
        code = otp.sender.last_code(victim)
        # The attacker writes a new address in front each time; its proxy appends the real one.
        # A header longer than the bound kept (MAX_FORWARDED_FOR) still ends in the address that counts.
        fronts = [f"10.9.{index}.1, " for index in range(MAX_ATTEMPTS - 1)] + ["10.9.9.9, " * 300]
        for front in fronts:
            await otp.logs_in(victim, wrong(code), front + ATTACKER)
        await support.expect_error(
            otp.verify(victim, code, "10.9.99.1, " + ATTACKER), EXHAUSTED, "OTP_ATTEMPTS_EXHAUSTED"
        )
        assert await otp.failures(admin, ATTACKER) == MAX_ATTEMPTS
        # The victim, whose header names the attacker's address first, is not the attacker.
        assert await otp.logs_in(victim, code, f"{ATTACKER}, {VICTIM}")


async def test_concurrent_wrong_codes_are_counted_exactly(limited: Serve, admin: asyncpg.Connection) -> None:
    async with limited(OtpLimits(failures_per_client_per_hour=10)) as otp:
        # One email: exactly MAX_ATTEMPTS misses count, the rest are refused.
        email = support.new_email()
        results = await asyncio.gather(
            *(otp.verify(email, "000000", "198.51.100.20") for _ in range(20)), return_exceptions=True
        )
        reasons = [support.error_info(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(reasons) == 20
        assert reasons.count("OTP_INVALID") == MAX_ATTEMPTS - 1
        assert reasons.count("OTP_ATTEMPTS_EXHAUSTED") == 20 - (MAX_ATTEMPTS - 1)
        assert await otp.failures(admin, "198.51.100.20") == MAX_ATTEMPTS
        # Many emails: exactly the client's limit counts.
        results = await asyncio.gather(
            *(otp.verify(support.new_email(), "000000", ATTACKER) for _ in range(30)), return_exceptions=True
        )
        reasons = [support.error_info(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(reasons) == 30
        assert reasons.count("OTP_INVALID") == 10 and reasons.count("OTP_CLIENT_RATE_LIMITED") == 20
        assert await otp.failures(admin, ATTACKER) == 10
