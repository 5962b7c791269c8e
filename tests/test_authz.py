"""Per-caller permissions of deploy/policy.toml, over mutual TLS: every caller may call what it
lists and is refused (CALLER_NOT_ALLOWED) what it does not, ledger reasons included; the
policy file is checked at start-up."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from blumpo.generation.v1 import generation_pb2
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import authz
from blumpo_common.config import ConfigError
from tests import support
from tests.certificates import POLICY, Authority, secure_generation_server, secure_token_server

TOKEN = tpb.DESCRIPTOR.services_by_name["TokenService"]
GENERATION = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]
ALL_METHODS = [f"{service.full_name}/{method.name}" for service in (TOKEN, GENERATION) for method in service.methods]
POLICY_CALLERS = authz.load_policy(POLICY).callers
# For each caller, a method it may not call (admin may call everything).
NOT_LISTED = {
    "web": "blumpo.token.v1.TokenService/AppendLedgerEntry",
    "worker": "blumpo.generation.v1.GenerationService/CreateGenerationJob",
    "generation": "blumpo.token.v1.TokenService/RunMonthlyRefill",
    "billing": "blumpo.generation.v1.GenerationService/ClaimNextJob",
}


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
async def addresses(database_url: str, authority: Authority) -> AsyncIterator[dict[str, str]]:
    """The address of each service's server, by the service's full name."""
    async with (
        secure_token_server(database_url, authority.server("token")) as token,
        secure_generation_server(database_url, authority.server("generation"), token) as generation,
    ):
        yield {TOKEN.full_name: token, GENERATION.full_name: generation}


async def call_with_empty_request(
    addresses: dict[str, str], authority: Authority, caller: str, method: str
) -> grpc.StatusCode:
    """The code an empty request to method answers, called with caller's certificate."""
    service, _, name = method.partition("/")
    streaming = (TOKEN if service == TOKEN.full_name else GENERATION).methods_by_name[name].server_streaming
    async with grpc.aio.secure_channel(addresses[service], authority.issue(caller).channel_credentials()) as channel:
        try:
            if streaming:
                stream = channel.unary_stream(f"/{method}", None, None)(b"", timeout=5)
                await stream.read()
                stream.cancel()
            else:
                await channel.unary_unary(f"/{method}", None, None)(b"", timeout=5)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                assert support.error_info(error).reason == "CALLER_NOT_ALLOWED"
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("caller", sorted(POLICY_CALLERS))
async def test_each_caller_may_call_exactly_what_it_lists(
    addresses: dict[str, str], authority: Authority, caller: str
) -> None:
    rights = POLICY_CALLERS[caller]
    for method in ALL_METHODS:
        code = await call_with_empty_request(addresses, authority, caller, method)
        # An empty request may well be refused as malformed, but never by the policy if listed.
        if rights.allows_method(method):
            assert code != grpc.StatusCode.PERMISSION_DENIED, (caller, method)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (caller, method)


@pytest.mark.parametrize(("caller", "method"), sorted(NOT_LISTED.items()))
async def test_a_refusal_names_the_caller_and_the_method(
    addresses: dict[str, str], authority: Authority, caller: str, method: str
) -> None:
    service = method.partition("/")[0]
    async with grpc.aio.secure_channel(addresses[service], authority.issue(caller).channel_credentials()) as channel:
        error = await support.expect_error(
            channel.unary_unary(f"/{method}", None, None)(b"", timeout=5),
            grpc.StatusCode.PERMISSION_DENIED,
            "CALLER_NOT_ALLOWED",
        )
    assert dict(support.error_info(error).metadata) == {"caller": caller, "method": method}


async def test_a_caller_the_policy_does_not_name_may_only_check_health(
    addresses: dict[str, str], authority: Authority
) -> None:
    for method in ALL_METHODS:
        assert await call_with_empty_request(addresses, authority, "stranger", method) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    health = "grpc.health.v1.Health/Check"
    async with grpc.aio.secure_channel(
        addresses[TOKEN.full_name], authority.issue("stranger").channel_credentials()
    ) as channel:
        await channel.unary_unary(f"/{health}", None, None)(b"", timeout=5)


def entry(user_id: str, reason: int, delta: int) -> tpb.AppendLedgerEntryRequest:
    return tpb.AppendLedgerEntryRequest(user_id=user_id, delta=delta, reason=reason, reference_id=str(uuid.uuid4()))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("caller", "allowed", "refused"),
    [
        ("generation", (tpb.LEDGER_REASON_GENERATION, -5), (tpb.LEDGER_REASON_PURCHASE, 5)),
        ("billing", (tpb.LEDGER_REASON_PURCHASE, 5), (tpb.LEDGER_REASON_ADJUSTMENT, 5)),
        ("admin", (tpb.LEDGER_REASON_ADJUSTMENT, 5), None),
    ],
)
async def test_a_caller_writes_only_its_ledger_reasons(
    addresses: dict[str, str],
    authority: Authority,
    caller: str,
    allowed: tuple[int, int],
    refused: tuple[int, int] | None,
) -> None:
    token_address = addresses[TOKEN.full_name]
    async with (
        grpc.aio.secure_channel(token_address, authority.issue("admin").channel_credentials()) as admin_channel,
        grpc.aio.secure_channel(token_address, authority.issue(caller).channel_credentials()) as channel,
    ):
        operator = token_pb2_grpc.TokenServiceStub(admin_channel)
        user_id = await support.user_with_balance(operator, 100)
        stub = token_pb2_grpc.TokenServiceStub(channel)
        written = (await stub.AppendLedgerEntry(entry(user_id, *allowed))).entry
        assert written.created_by == caller
        if refused is None:
            return
        error = await support.expect_error(
            stub.AppendLedgerEntry(entry(user_id, *refused)), grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED"
        )
        assert support.error_info(error).metadata["reason"] == tpb.LedgerReason.Name(refused[0]).removeprefix(  # type: ignore[arg-type]
            "LEDGER_REASON_"
        )
        balance = (await operator.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance
        assert balance == 100 + allowed[1]


async def test_in_a_batch_an_entry_with_a_forbidden_reason_fails_alone(
    addresses: dict[str, str], authority: Authority
) -> None:
    token_address = addresses[TOKEN.full_name]
    async with (
        grpc.aio.secure_channel(token_address, authority.issue("admin").channel_credentials()) as admin_channel,
        grpc.aio.secure_channel(token_address, authority.issue("billing").channel_credentials()) as channel,
    ):
        user_id = await support.user_with_balance(token_pb2_grpc.TokenServiceStub(admin_channel), 100)
        answer = await token_pb2_grpc.TokenServiceStub(channel).AppendLedgerEntries(
            tpb.AppendLedgerEntriesRequest(
                entries=[
                    entry(user_id, tpb.LEDGER_REASON_PURCHASE, 10),
                    entry(user_id, tpb.LEDGER_REASON_ADJUSTMENT, 1000),
                    entry(user_id, tpb.LEDGER_REASON_PURCHASE, 20),
                ]
            )
        )
    first, forbidden, last = answer.results
    assert first.status.code == 0 and first.entry.balance_after == 110 and first.entry.created_by == "billing"
    assert forbidden.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "ADJUSTMENT" in forbidden.status.message and not forbidden.HasField("entry")
    assert last.status.code == 0 and last.entry.balance_after == 130


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[callers.web]\nmethods = ["blumpo.token.v1.TokenService/MintTokens"]', "names no method"),
        ('[callers.web]\nmethods = ["blumpo.other.v1.Other/Get"]', "names no method"),
        ('[callers.web]\nledger_reasons = ["FREE_MONEY"]', "names no ledger reason"),
        ('[callers.web]\nledger_reasons = ["LEDGER_REASON_PURCHASE"]', "names no ledger reason"),
        ('[callers.web]\nmethod = ["*"]', "unknown keys"),
        ('[callers.web]\nmethods = "*"', "must be a list of strings"),
        ("[caller.web]", "unknown top-level keys"),
        ("[callers.web", "not valid TOML"),
    ],
)
def test_a_policy_naming_what_does_not_exist_is_refused(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=complaint):
        authz.load_policy(path)


def test_without_a_policy_only_development_allows_everything() -> None:
    assert authz.load({"BLUMPO_ENV": "development"}) is None
    with pytest.raises(ConfigError, match="AUTHZ_POLICY_FILE is not set"):
        authz.load({})
