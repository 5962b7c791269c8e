"""Login codes are mailed after their challenge is committed: a mail server that hangs holds
no database connection, and a code that cannot be sent is withdrawn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import grpc
import pytest

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import server
from blumpo_common.db import create_pool
from blumpo_common.errors import ServiceError
from tests import support
from tests.conftest import OTP_TEST_SECRET, database_config
from token_service import otp as otp_rules
from token_service.config import SmtpConfig
from token_service.otp import OtpLogins
from token_service.otp_sender import DeliveryError, SmtpSender
from token_service.server import service as token_service
from token_service.store import Store as TokenStore

# Seconds smtplib waits on the silent server before giving up; every bound below is a fraction of it.
SMTP_TIMEOUT = 3
# More than the pool's 20 connections, as in the report this answers.
CONCURRENT_REQUESTS = 30


class SilentSmtp:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> SilentSmtp:
        self.server = await asyncio.start_server(self.session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        await reader.read()  # until the client hangs up


async def until(condition_met: Callable[[], Awaitable[bool]], what: str, seconds: float) -> None:
    """Polls (bounded) until the condition holds."""
    deadline = time.monotonic() + seconds
    while not await condition_met():
        assert time.monotonic() < deadline, f"{what} not within {seconds}s"
        await asyncio.sleep(0.02)


SilentServer = tuple[support.TokenStub, SilentSmtp]


@pytest.fixture
async def silent_token_server(database_url: str) -> AsyncIterator[SilentServer]:
    """A token server (pool of 20) whose login codes go to a mail server that never answers."""
    pool = await create_pool(database_config(database_url, "token_service"))
    store = TokenStore(pool, 30.0)
    async with SilentSmtp() as silent:
        smtp = SmtpConfig("127.0.0.1", silent.port, "login@blumpo.example", "", "", False, SMTP_TIMEOUT)
        logins = OtpLogins(store, SmtpSender(smtp), support.FakeClock(), OTP_TEST_SECRET, ttl_seconds=600)
        running = await server.start(token_service(store, logins), pool, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                yield token_pb2_grpc.TokenServiceStub(channel), silent
        finally:
            await running.stop(1)
            await pool.close()


async def test_a_mail_server_that_never_answers_leaves_other_calls_unaffected(
    silent_token_server: SilentServer, admin: asyncpg.Connection
) -> None:
    """30 RequestOtp calls wait on a mail server that accepts and never answers, more than the
    pool's 20 connections. Their challenges are committed before the mail goes out, so while
    every one of them still waits, GetTokenBalance on the same server answers at once; then
    each RequestOtp answers UNAVAILABLE and its unsent challenge is withdrawn."""
    stub, silent = silent_token_server
    user_id = await support.user_with_balance(stub, 7)
    emails = [support.new_email() for _ in range(CONCURRENT_REQUESTS)]
    started = time.monotonic()
    requests = [asyncio.ensure_future(stub.RequestOtp(tpb.RequestOtpRequest(email=email))) for email in emails]

    async def all_committed_and_mailing() -> bool:
        committed = await admin.fetchval("SELECT count(*) FROM token.auth_otp WHERE email = ANY($1)", emails)
        return bool(committed == len(emails) and silent.accepted == len(emails))

    await until(all_committed_and_mailing, "every challenge committed and its mail started", SMTP_TIMEOUT / 3)
    latencies = []
    for _ in range(10):
        begun = time.monotonic()
        balance = await stub.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id), timeout=SMTP_TIMEOUT)
        latencies.append(time.monotonic() - begun)
        assert balance.balance == 7
    assert not any(request.done() for request in requests), "the mail server answered: the test proves nothing"
    # Holding a connection per mail, a balance call would wait for a send to time out.
    assert max(latencies) < SMTP_TIMEOUT / 3, latencies

    for request in requests:
        await support.expect_error(request, grpc.StatusCode.UNAVAILABLE, "OTP_DELIVERY_FAILED")
    assert time.monotonic() - started >= SMTP_TIMEOUT * 0.9, "the sends did not wait on the mail server"
    assert await admin.fetchval("SELECT count(*) FROM token.auth_otp WHERE email = ANY($1)", emails) == 0


@dataclass
class HeldSend:
    """One send the test decides the outcome of, when it releases it."""

    fail: bool
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    code: str = ""


@dataclass
class HeldSender:
    """Sends in call order: each takes the next held send, if any, else is delivered at once."""

    held: list[HeldSend] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    every: list[HeldSend] = field(default_factory=list)

    def hold(self, fail: bool) -> HeldSend:
        self.held.append(HeldSend(fail))
        self.every.append(self.held[-1])
        return self.held[-1]

    async def send(self, email: str, code: str, expires_at: datetime) -> None:
        if self.held:
            held = self.held.pop(0)
            held.code = code
            held.started.set()
            await held.release.wait()
            if held.fail:
                raise DeliveryError("held and failed")
        self.delivered.append(code)


async def logs_in(logins: OtpLogins, email: str, code: str) -> bool:
    try:
        await logins.verify(email, code, "test")
    except ServiceError:
        return False
    return True


async def start(logins: OtpLogins, email: str, held: HeldSend) -> asyncio.Task[otp_rules.Challenge]:
    task = asyncio.create_task(logins.request(email))
    await asyncio.wait_for(held.started.wait(), 10)
    return task


@pytest.fixture
async def held_logins(token_store: TokenStore) -> AsyncIterator[tuple[OtpLogins, HeldSender, support.FakeClock]]:
    sender, clock = HeldSender(), support.FakeClock()
    yield OtpLogins(token_store, sender, clock, OTP_TEST_SECRET, ttl_seconds=600), sender, clock
    for held in sender.every:  # a failed test leaves no send waiting (and no connection held)
        held.release.set()


async def failed(task: asyncio.Task[otp_rules.Challenge]) -> str:
    with pytest.raises(ServiceError) as caught:
        await task
    return caught.value.reason


async def test_a_failed_send_overtaken_by_a_newer_code_leaves_the_mailed_codes_working(
    held_logins: tuple[OtpLogins, HeldSender, support.FakeClock], admin: asyncpg.Connection
) -> None:
    logins, sender, clock = held_logins
    email = support.new_email()
    await logins.request(email)
    first = sender.delivered[-1]
    clock.advance(1)
    held = sender.hold(fail=True)
    failing = await start(logins, email, held)
    clock.advance(1)
    await logins.request(email)  # delivered while the other send hangs
    newer = sender.delivered[-1]
    held.release.set()
    assert await failed(failing) == "OTP_DELIVERY_FAILED"

    assert await admin.fetchval("SELECT count(*) FROM token.auth_otp WHERE email = $1", email) == 2
    # Both mailed codes work; the login with one ends the other.
    assert await logs_in(logins, email, newer)
    assert not await logs_in(logins, email, first)


async def test_failed_sends_that_overlap_bring_back_the_code_mailed_before_them(
    held_logins: tuple[OtpLogins, HeldSender, support.FakeClock], admin: asyncpg.Connection
) -> None:
    """Two sends that fail, the newer one first: the older unsent challenge is briefly active
    again, then withdrawn in its turn, and the code mailed before both works again."""
    logins, sender, clock = held_logins
    email = support.new_email()
    await logins.request(email)
    mailed = sender.delivered[-1]
    clock.advance(1)
    older_held, newer_held = sender.hold(fail=True), sender.hold(fail=True)
    older = await start(logins, email, older_held)
    newer = await start(logins, email, newer_held)
    newer_held.release.set()
    assert await failed(newer) == "OTP_DELIVERY_FAILED"
    older_held.release.set()
    assert await failed(older) == "OTP_DELIVERY_FAILED"

    # Withdrawn challenges do not count against the hourly limit.
    assert await admin.fetchval("SELECT count(*) FROM token.auth_otp WHERE email = $1", email) == 1
    assert not await logs_in(logins, email, older_held.code)
    assert await logs_in(logins, email, mailed)


async def test_a_failed_send_does_not_bring_back_a_used_or_ended_code(
    held_logins: tuple[OtpLogins, HeldSender, support.FakeClock],
) -> None:
    logins, sender, clock = held_logins
    email = support.new_email()
    await logins.request(email)
    used = sender.delivered[-1]
    assert await logs_in(logins, email, used)
    clock.advance(601)  # out of the email's window, which allows 3 codes
    await logins.request(email)
    ended = sender.delivered[-1]
    clock.advance(1)
    await logins.request(email)
    assert await logs_in(logins, email, sender.delivered[-1])  # the login ends the other code
    clock.advance(1)
    held = sender.hold(fail=True)
    task = await start(logins, email, held)
    held.release.set()
    assert await failed(task) == "OTP_DELIVERY_FAILED"

    assert not await logs_in(logins, email, ended)
    assert not await logs_in(logins, email, used)
