"""Random input at every RPC of both services: never INTERNAL or UNKNOWN, and a refused call
writes nothing.

The RPCs and their request fields are read from the service descriptors, so a new RPC or
field is fuzzed without a change here. Each RPC gets random field values (strings with
unicode, NUL and huge ones, integers at the int32/int64 edges, enum numbers out of range,
nested messages), random bytes as the raw request, and the lists random page tokens and
tokens signed with the services' secret around random JSON. Runs are derandomized (the
same examples every run) and bounded: about 700 calls, well under 30 s.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta, timezone
from functools import cache
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from blumpo_common.db import create_pool
from generation_service.charging import ReconcilerSettings
from generation_service.server import Parts as GenerationParts
from generation_service.server import parts as generation_parts_for
from tests import support
from tests.conftest import TEST_PAGE_TOKENS, TEST_RETRY, database_config
from tests.generation_support import asset_input, finish, running_job
from tests.support import GenerationStub, TokenStub

FD = descriptor.FieldDescriptor
SERVICES = [
    tpb.DESCRIPTOR.services_by_name["TokenService"],
    gpb.DESCRIPTOR.services_by_name["GenerationService"],
]
METHODS = [method for service in SERVICES for method in service.methods]
LISTS = {
    # RPC: the query a page token is signed for, from the user id (statuses left empty).
    "ListLedgerEntries": "ledger:{}",
    "ListGenerationJobs": "jobs:{}:",
    "GetAssetsForUser": "assets:{}",
}

CALL_SECONDS = 10.0
# A watch of a job that stays live would stream until cancelled: read its first answer only.
STREAM_SECONDS = 1.0
MAX_DEPTH = 3

FUZZ = settings(
    max_examples=16,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
RAW = settings(FUZZ, max_examples=6)
TOKENS = settings(FUZZ, max_examples=40)

# A refused call of these writes by design, so for them only INVALID_ARGUMENT must write nothing:
# a wrong login code is recorded against its client; a job the token service refuses is kept as REJECTED
# (nothing charged or listed: docs/charging.md).
RECORDED_REFUSALS = {"VerifyOtp", "CreateGenerationJob"}
# A call cut short by its deadline may have written just before; it says nothing either way.
NO_VERDICT = {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}

calls: Counter[str] = Counter()
answers: Counter[str] = Counter()


@pytest.fixture(scope="module")
async def generation_parts(database_url: str, token_address: str) -> AsyncIterator[GenerationParts]:
    """As conftest's, with the reconciler idle after its first pass, so that nothing but the
    call under test writes while a call is checked."""
    config = database_config(database_url, "generation_service")
    pool = await create_pool(config)
    quiet = ReconcilerSettings(claim_seconds=3.0, interval_seconds=3600.0)
    async with grpc.aio.insecure_channel(token_address) as channel:
        yield generation_parts_for(pool, config, channel, TEST_RETRY, quiet, pages=TEST_PAGE_TOKENS)
    await pool.close()


@dataclass(frozen=True)
class Known:
    """Values that exist, so random requests also reach past the checks into the stores."""

    user_id: str
    email: str
    job_id: str
    asset_id: str

    def strings(self) -> list[str]:
        return [self.user_id, self.email, self.job_id, self.asset_id, "free", "pro", "2026-01", "fuzz-worker"]


@pytest.fixture(scope="module")
async def known(token: TokenStub, generation: GenerationStub) -> Known:
    """A user with a finished job, its asset and a variant."""
    email = support.new_email()
    user = (await token.CreateUser(tpb.CreateUserRequest(email=email))).user
    job = await running_job(generation, user.user_id, worker_id="fuzz-setup")
    asset = asset_input()
    await generation.AttachAssetToJob(
        gpb.AttachAssetToJobRequest(job_id=job.job_id, user_id=user.user_id, asset=asset, lease_id=job.lease_id)
    )
    await generation.AddAssetVariant(
        gpb.AddAssetVariantRequest(
            asset_id=asset.asset_id,
            user_id=user.user_id,
            lease_id=job.lease_id,
            kind=gpb.VARIANT_KIND_THUMBNAIL,
            storage_key="users/u/thumb.webp",
            mime_type="image/webp",
            bytes_size=100,
            width=256,
            height=256,
            format=gpb.IMAGE_FORMAT_WEBP,
        )
    )
    await finish(generation, job, gpb.JOB_STATUS_SUCCEEDED)
    return Known(user.user_id, email, job.job_id, asset.asset_id)


@pytest.fixture(scope="module")
async def channels(token_address: str, generation_address: str) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    async with (
        grpc.aio.insecure_channel(token_address) as token_channel,
        grpc.aio.insecure_channel(generation_address) as generation_channel,
    ):
        yield {SERVICES[0].full_name: token_channel, SERVICES[1].full_name: generation_channel}


@pytest.fixture(scope="module")
async def fingerprint(admin: asyncpg.Connection) -> Callable[[], Any]:
    """What every table of both schemas holds (row count and a sum of row hashes), in one query."""
    tables = await admin.fetch(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('token', 'generation') ORDER BY 1, 2"
    )
    parts = [
        f'(SELECT count(*) || \':\' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM "{s}"."{n}" t)'
        for s, n in tables
    ]
    query = f"SELECT ARRAY[{', '.join(parts)}]"

    async def take() -> Any:
        return await admin.fetchval(query)

    return take


@pytest.fixture(scope="module", autouse=True)
def report_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Prints how many calls were made and what they answered, once the module is done."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and calls:
        with capture.global_and_fixture_disabled():
            codes = ", ".join(f"{name} {count}" for name, count in answers.most_common())
            reporter.write_line(f"fuzz: {sum(calls.values())} calls over {len(calls)} RPCs ({codes})")


# Strategies built from the descriptors.

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
HUGE = ["x" * 70_000, "é" * 30_000]
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\u202e\ufeff\u200b",
    "💥" * 3,
    "NaN",
    "-1",
    "0",
    "00000000-0000-0000-0000-000000000000",
    str(uuid.uuid4()).upper(),
    "{" + str(uuid.uuid4()) + "}",
    "a@b",
    "ADA@EXAMPLE.COM",
    "user@bücher.de",
    "9999-12",
    "1999-12",
    "2026-13",
    "123456",
    *HUGE,
]


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, low + 1, high - 1, -1, 0, 1, 2**31 - 1, -(2**31), 2**31) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def strings(known: Known) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(ODD_STRINGS + known.strings()),
        st.uuids().map(str),
        st.emails(),
    )


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30))
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    )


def page_key_payloads() -> st.SearchStrategy[bytes]:
    """Payloads near a real key: [instant, tiebreak] of random kinds, random JSON, random bytes."""
    offsets = st.sampled_from([UTC, timezone(timedelta(hours=5)), timezone(timedelta(hours=-5, minutes=-30))])
    instants = st.one_of(
        st.datetimes(timezones=offsets).map(lambda moment: moment.isoformat()),
        st.datetimes().map(lambda moment: moment.isoformat()),
        st.text(max_size=40),
        json_values(),
    )
    tiebreaks = st.one_of(st.integers(-(2**65), 2**65), st.uuids().map(str), st.booleans(), json_values())
    keys = st.tuples(instants, tiebreaks).map(list)
    return st.one_of(
        st.one_of(keys, json_values()).map(lambda key: json.dumps(key).encode()),
        st.binary(max_size=300),
        st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),
    )


def page_tokens(known: Known) -> st.SearchStrategy[str]:
    """Random tokens, and tokens signed for one of the known user's lists around random payloads."""
    scopes = st.sampled_from([scope.format(known.user_id) for scope in LISTS.values()])
    return st.one_of(
        st.text(max_size=600),
        st.binary(max_size=400).map(lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")),
        st.builds(TEST_PAGE_TOKENS.sign, scopes, page_key_payloads()),
    )


def is_map(field: FD) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def named_strings(name: str, known: Known) -> st.SearchStrategy[str]:
    """Random strings, weighted by the field's name towards what it holds, to get past the checks."""
    if name == "page_token":
        return st.one_of(strings(known), page_tokens(known))
    if name.endswith("_id"):
        return st.one_of(
            st.sampled_from([known.user_id, known.job_id, known.asset_id]), st.uuids().map(str), strings(known)
        )
    if name == "email":
        return st.one_of(st.just(known.email), st.emails(), strings(known))
    return strings(known)


def single(field: FD, known: Known, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_STRING:
        return named_strings(field.name, known)
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_DOUBLE:
        return st.floats()
    if kind == FD.TYPE_FLOAT:
        return st.floats(width=32)
    if field.enum_type is not None:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), integers(-(2**31), 2**31 - 1))
    if field.message_type is not None:
        return messages(field.message_type, known, depth + 1)
    low, high = INT_RANGES[kind]
    return integers(low, high)


def values(field: FD, known: Known, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and is_map(field):
        entry = field.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(single(key, known, depth), single(value, known, depth), max_size=3)
    if field.is_repeated:
        return st.lists(single(field, known, depth), max_size=4)
    return single(field, known, depth)


def build(kind: descriptor.Descriptor, chosen: dict[str, Any]) -> Message:
    message = GetMessageClass(kind)()
    for name, value in chosen.items():
        field = kind.fields_by_name[name]
        target = getattr(message, name)
        if is_map(field):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            for item in value:
                target.add().CopyFrom(item) if isinstance(item, Message) else target.append(item)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


@cache
def _messages(kind: descriptor.Descriptor, known: Known, depth: int) -> st.SearchStrategy[Message]:
    if depth > MAX_DEPTH:
        return st.just(GetMessageClass(kind)())
    optional = {field.name: values(field, known, depth) for field in kind.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda chosen: build(kind, chosen))


def messages(kind: descriptor.Descriptor, known: Known, depth: int = 0) -> st.SearchStrategy[Message]:
    return st.deferred(lambda: _messages(kind, known, depth))


def raw_requests(kind: descriptor.Descriptor, known: Known) -> st.SearchStrategy[bytes]:
    """Bytes that are not (or not quite) a message of the kind: random, or a valid one cut and extended."""
    mangled = st.tuples(messages(kind, known), st.integers(0, 64), st.binary(max_size=32)).map(
        lambda parts: parts[0].SerializeToString()[: parts[1]] + parts[2]
    )
    return st.one_of(st.binary(max_size=256), mangled)


# Calls.


async def call(
    channels: dict[str, grpc.aio.Channel], method: descriptor.MethodDescriptor, payload: bytes
) -> grpc.StatusCode:
    """The status the method answers to the raw request (identity serializers: bytes in, bytes out)."""
    channel = channels[method.containing_service.full_name]
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, None, None)(payload, timeout=STREAM_SECONDS)
            try:
                await stream.read()  # the first message, the end, or the error
            finally:
                stream.cancel()
        else:
            await channel.unary_unary(path, None, None)(payload, timeout=CALL_SECONDS)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def check(
    channels: dict[str, grpc.aio.Channel],
    fingerprint: Callable[[], Any],
    method: descriptor.MethodDescriptor,
    payload: bytes,
    shown: object,
) -> grpc.StatusCode:
    before = await fingerprint()
    code = await call(channels, method, payload)
    calls[method.full_name] += 1
    answers[code.name] += 1
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
        f"{method.name} answered {code.name} to {shown!r}"
    )
    checked = code not in NO_VERDICT and (
        method.name not in RECORDED_REFUSALS or code == grpc.StatusCode.INVALID_ARGUMENT
    )
    if checked:
        assert await fingerprint() == before, f"{method.name} answered {code.name} to {shown!r} but wrote"
    return code


def shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) < 2000 else text[:2000] + "..."


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@FUZZ
@given(data=st.data())
async def test_random_field_values(
    method: descriptor.MethodDescriptor,
    channels: dict[str, grpc.aio.Channel],
    fingerprint: Callable[[], Any],
    known: Known,
    data: st.DataObject,
) -> None:
    request = data.draw(messages(method.input_type, known), label="request")
    await check(channels, fingerprint, method, request.SerializeToString(), shorten(request))


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@RAW
@given(data=st.data())
async def test_random_bytes(
    method: descriptor.MethodDescriptor,
    channels: dict[str, grpc.aio.Channel],
    fingerprint: Callable[[], Any],
    known: Known,
    data: st.DataObject,
) -> None:
    payload = data.draw(raw_requests(method.input_type, known), label="payload")
    await check(channels, fingerprint, method, payload, shorten(payload))


LIST_METHODS = [m for m in METHODS if m.name in LISTS]


def test_every_list_with_a_page_token_is_fuzzed_with_signed_tokens() -> None:
    takes_tokens = {m.name for m in METHODS if "page_token" in m.input_type.fields_by_name}
    assert takes_tokens == set(LISTS), "a list RPC takes page tokens: add the query its tokens are signed for"


@pytest.mark.parametrize("method", LIST_METHODS, ids=[m.name for m in LIST_METHODS])
@TOKENS
@given(data=st.data())
async def test_signed_page_tokens_of_random_payloads(
    method: descriptor.MethodDescriptor,
    channels: dict[str, grpc.aio.Channel],
    fingerprint: Callable[[], Any],
    known: Known,
    data: st.DataObject,
) -> None:
    """A token signed for the very query it is used with: the key inside it is all that varies.
    It answers a page or INVALID_ARGUMENT, nothing else."""
    payload = data.draw(page_key_payloads(), label="payload")
    request = GetMessageClass(method.input_type)(
        user_id=known.user_id, page_token=TEST_PAGE_TOKENS.sign(LISTS[method.name].format(known.user_id), payload)
    )
    code = await check(channels, fingerprint, method, request.SerializeToString(), shorten(payload))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), f"{method.name}: {code.name}"
