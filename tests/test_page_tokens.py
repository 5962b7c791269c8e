"""Page tokens are signed with PAGE_TOKEN_SECRET and their keys checked strictly: a token
that is not one the service issued for that query is INVALID_ARGUMENT, whatever it holds."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import config as common_config
from blumpo_common import server
from blumpo_common.config import ConfigError
from blumpo_common.db import create_pool
from blumpo_common.errors import ServiceError
from blumpo_common.pagination import MAX_TOKEN_CHARS, PageTokens, int64_tiebreak, uuid_tiebreak
from generation_service import config as generation_config
from harness import ROOT
from harness.processes import free_port
from tests import support
from tests.certificates import production_security
from tests.conftest import TEST_PAGE_TOKENS, database_config
from tests.generation_support import create_job
from tests.support import GenerationStub, TokenStub
from token_service import config as token_config
from token_service.server import service as token_service
from token_service.store import Store as TokenStore

SCOPE = "ledger:0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"
MOMENT = datetime(2026, 1, 1, 12, 30, 15, 250000, tzinfo=UTC)
A_UUID = "5d0c6f4e-2b1a-4c3d-8e9f-0a1b2c3d4e5f"
SECRET = "p" * 32


def refused(token: str, tiebreak: Callable[[object], object] = int64_tiebreak, scope: str = SCOPE) -> bool:
    try:
        TEST_PAGE_TOKENS.decode(scope, token, tiebreak)
    except ServiceError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [name for name, _ in error.violations] == ["page_token"]
        return True
    return False


def signed(payload: object, scope: str = SCOPE) -> str:
    return TEST_PAGE_TOKENS.sign(scope, json.dumps(payload).encode())


def test_a_token_decodes_to_the_key_it_was_made_from() -> None:
    for moment in (MOMENT, MOMENT.replace(microsecond=0), MOMENT.astimezone(timezone(timedelta(hours=-5)))):
        assert TEST_PAGE_TOKENS.decode(SCOPE, TEST_PAGE_TOKENS.encode(SCOPE, moment, 7), int64_tiebreak) == (moment, 7)
    token = TEST_PAGE_TOKENS.encode(SCOPE, MOMENT, A_UUID)
    assert TEST_PAGE_TOKENS.decode(SCOPE, token, uuid_tiebreak) == (MOMENT, uuid.UUID(A_UUID))
    assert len(token) < MAX_TOKEN_CHARS
    assert TEST_PAGE_TOKENS.decode(SCOPE, "", int64_tiebreak) is None


def test_a_token_is_bound_to_its_secret_and_its_query() -> None:
    token = TEST_PAGE_TOKENS.encode(SCOPE, MOMENT, 7)
    assert refused(token, scope=SCOPE + "x")
    assert refused(PageTokens(b"another-secret-0123456789abcdef01").encode(SCOPE, MOMENT, 7))
    assert refused(PageTokens.generated().encode(SCOPE, MOMENT, 7))
    # Each character changed in turn.
    for index in range(len(token)):
        edited = token[:index] + ("A" if token[index] != "A" else "B") + token[index + 1 :]
        assert refused(edited), index


def test_a_token_signed_with_the_old_public_key_is_refused() -> None:
    """Before PAGE_TOKEN_SECRET, tokens were signed with a constant from the source."""
    payload = json.dumps([MOMENT.isoformat(), 7], separators=(",", ":")).encode()
    digest = hashlib.blake2b(SCOPE.encode() + b"\0" + payload, key=b"blumpo-page-token-v1", digest_size=16).digest()
    assert refused(base64.urlsafe_b64encode(digest + payload).decode().rstrip("="))


DEEP = 100_000
NESTED = b"[" * DEEP + b"]" * DEEP


@pytest.mark.parametrize(
    ("payload", "tiebreak"),
    [
        (["2026-01-01T00:00:00+00:00", 5], uuid_tiebreak),  # a ledger key on a jobs list
        (["2026-01-01T00:00:00+00:00", [A_UUID]], uuid_tiebreak),
        (["2026-01-01T00:00:00+00:00", [5]], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", {"seq": 5}], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", True], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", 5.0], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", "5"], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", 2**63], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", -(2**63) - 1], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", None], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", A_UUID.upper()], uuid_tiebreak),
        (["2026-01-01T00:00:00+00:00", A_UUID.replace("-", "")], uuid_tiebreak),
        (["2026-01-01T00:00:00+00:00", "{" + A_UUID + "}"], uuid_tiebreak),
        (["2026-01-01T00:00:00", 5], int64_tiebreak),  # no offset
        (["2026-01-01", 5], int64_tiebreak),
        (["2026-01-01T00:00:00Z", 5], int64_tiebreak),  # not as encode() writes it
        (["2026-01-01 00:00:00+00:00", 5], int64_tiebreak),
        (["0001-01-01T00:00:00+05:00", 5], int64_tiebreak),  # before year 1 in UTC
        (["9999-12-31T23:59:59-05:00", 5], int64_tiebreak),  # after 9999 in UTC
        ([1767225600, 5], int64_tiebreak),
        ([["2026-01-01T00:00:00+00:00"], 5], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00", 5, 6], int64_tiebreak),
        (["2026-01-01T00:00:00+00:00"], int64_tiebreak),
        ([], int64_tiebreak),
        ({"0": "2026-01-01T00:00:00+00:00", "1": 5}, int64_tiebreak),
        ("2026-01-01T00:00:00+00:00", int64_tiebreak),
        (None, int64_tiebreak),
        ([[[[[[[[[[]]]]]]]]], 5], int64_tiebreak),
    ],
)
def test_a_signed_key_of_the_wrong_shape_is_refused(payload: object, tiebreak: Callable[[object], object]) -> None:
    assert refused(signed(payload), tiebreak)


@pytest.mark.parametrize(
    "payload",
    [
        NESTED,  # would exhaust the recursion limit if decoded
        b"[" * 150 + b"]" * 150,
        b"\xff\xfe not json",
        b"",
        b"[NaN, Infinity]",
    ],
    ids=["nested-100000", "nested-150", "not-utf8", "empty", "nan"],
)
def test_a_signed_payload_that_is_not_a_key_is_refused(payload: bytes) -> None:
    assert refused(TEST_PAGE_TOKENS.sign(SCOPE, payload))


@pytest.mark.parametrize(
    "token",
    ["!!!!", "é" * 40, "A" * (MAX_TOKEN_CHARS + 1), "=", "a", "\x00" * 20],
)
def test_a_token_that_is_not_base64_of_a_signed_payload_is_refused(token: str) -> None:
    assert refused(token)


MOMENT_TEXT = "2026-01-01T00:00:00+00:00"
# The report's tokens: (ledger payload, jobs and assets payload), each a tiebreak of the other kind.
REPORTED = {
    "wrong-tiebreak-type": (json.dumps([MOMENT_TEXT, A_UUID]).encode(), json.dumps([MOMENT_TEXT, 5]).encode()),
    "list-tiebreak": (json.dumps([MOMENT_TEXT, [5]]).encode(), json.dumps([MOMENT_TEXT, [A_UUID]]).encode()),
    "nested-100000": (NESTED, NESTED),
}


@pytest.mark.parametrize(("ledger_payload", "payload"), REPORTED.values(), ids=REPORTED.keys())
async def test_forged_tokens_on_every_list_are_invalid_argument(
    token: TokenStub, generation: GenerationStub, ledger_payload: bytes, payload: bytes
) -> None:
    """The report's tokens, signed with the service's own secret, on each list that takes one."""
    user_id = await support.user_with_balance(token, 10)
    await create_job(generation, user_id)
    sign = TEST_PAGE_TOKENS.sign
    calls: list[Awaitable[Any]] = [
        token.ListLedgerEntries(
            tpb.ListLedgerEntriesRequest(user_id=user_id, page_token=sign(f"ledger:{user_id}", ledger_payload))
        ),
        generation.ListGenerationJobs(
            gpb.ListGenerationJobsRequest(user_id=user_id, page_token=sign(f"jobs:{user_id}:", payload))
        ),
        generation.GetAssetsForUser(
            gpb.GetAssetsForUserRequest(user_id=user_id, page_token=sign(f"assets:{user_id}", payload))
        ),
    ]
    for call in calls:
        failure = await support.expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert support.bad_fields(failure) == ["page_token"]


async def test_pages_follow_across_replicas_that_share_the_secret(
    token: TokenStub, database_url: str, token_address: str
) -> None:
    """A second token server with the same PAGE_TOKEN_SECRET carries on from the first's token;
    one with another secret (a restart that made one up) refuses it."""
    user_id = await support.user_with_balance(token, 100)  # the signup grant: one entry
    for n in range(3):
        await token.AppendLedgerEntry(
            tpb.AppendLedgerEntryRequest(
                user_id=user_id, delta=1, reason=tpb.LEDGER_REASON_PURCHASE, reference_id=f"order-{n}"
            )
        )
    everything = await token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user_id))
    first = await token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user_id, page_size=2))
    rest = tpb.ListLedgerEntriesRequest(user_id=user_id, page_size=2, page_token=first.next_page_token)
    async with replica(database_url, TEST_PAGE_TOKENS) as same, replica(database_url, PageTokens.generated()) as other:
        second = await same.ListLedgerEntries(rest)
        await support.expect_error(other.ListLedgerEntries(rest), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert [*first.entries, *second.entries] == list(everything.entries)
    assert len(everything.entries) == 4 and not second.next_page_token


@asynccontextmanager
async def replica(database_url: str, pages: PageTokens) -> AsyncIterator[TokenStub]:
    pool = await create_pool(database_config(database_url, "token_service"))
    running = await server.start(token_service(TokenStore(pool, 30.0), pages=pages), pool, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield token_pb2_grpc.TokenServiceStub(channel)
    finally:
        await running.stop(1)
        await pool.close()


# Settings.

BASE = {
    "TOKEN_DATABASE_URL": "postgresql://token_service@127.0.0.1:5432/blumpo",
    "GENERATION_DATABASE_URL": "postgresql://generation_service@127.0.0.1:5432/blumpo",
}
TOKEN_PRODUCTION = {
    **BASE,
    "OTP_SECRET": "o" * 32,
    "OTP_SMTP_HOST": "smtp.example.com",
    "OTP_SMTP_FROM": "login@blumpo.example",
}


@pytest.mark.parametrize("load", [token_config.load, generation_config.load], ids=["token", "generation"])
def test_the_secret_is_required_outside_development(load: Callable[[Mapping[str, str]], Any]) -> None:
    env = TOKEN_PRODUCTION
    with pytest.raises(ConfigError, match="PAGE_TOKEN_SECRET is not set"):
        load(env)
    with pytest.raises(ConfigError, match="PAGE_TOKEN_SECRET must be at least 32"):
        load({**env, "PAGE_TOKEN_SECRET": "short"})
    with pytest.raises(ConfigError, match="PAGE_TOKEN_SECRET must be at least 32"):
        load({**env, "BLUMPO_ENV": "development", "PAGE_TOKEN_SECRET": "short"})
    loaded = load({**env, **production_security(), "PAGE_TOKEN_SECRET": SECRET})
    assert loaded.page_tokens == common_config.PageTokenConfig(SECRET.encode(), generated=False)
    assert SECRET not in repr(loaded)


def test_development_makes_a_secret_up_per_process() -> None:
    env = {**BASE, "BLUMPO_ENV": "development"}
    first, second = generation_config.load(env).page_tokens, generation_config.load(env).page_tokens
    assert first.generated and second.generated
    assert len(first.secret) == common_config.GENERATED_SECRET_BYTES
    assert first.secret != second.secret
    assert token_config.load(env).page_tokens.generated


def start_up(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTP_", "BLUMPO_ENV", "PAGE_TOKEN"))}
    return subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("module", ["token_service", "generation_service"])
def test_start_up_without_the_secret_outside_development_exits_2(module: str) -> None:
    done = start_up(module, TOKEN_PRODUCTION)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "PAGE_TOKEN_SECRET" in line


@pytest.mark.parametrize("module", ["token_service", "generation_service"])
def test_start_up_in_development_warns_that_the_secret_was_made_up(module: str, database_url: str) -> None:
    """Stopped right after the warning by a listen address that cannot be used (exit 2)."""
    prefix = "TOKEN" if module == "token_service" else "GENERATION"
    env = {
        "DATABASE_URL": database_url,
        "BLUMPO_ENV": "development",
        f"{prefix}_LISTEN_ADDR": "999.1.1.1:1",
        f"{prefix}_METRICS_ADDR": f"127.0.0.1:{free_port()}",
    }
    done = start_up(module, env)
    assert done.returncode == 2, done.stderr
    warnings = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(w["message"] == common_config.PAGE_TOKEN_SECRET_MADE_UP for w in warnings), done.stderr
