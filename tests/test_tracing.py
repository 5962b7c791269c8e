"""One CreateGenerationJob is one trace across both services, down to their database statements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import server, tracing
from blumpo_common.config import ConfigError
from blumpo_common.db import create_pool
from generation_service.server import parts, service, token_channel_interceptors
from harness.processes import ServiceProcess, free_port
from tests import support
from tests.conftest import TEST_RECONCILER, TEST_RETRY, database_config
from tests.generation_support import job_request
from tests.support import GenerationStub, TokenStub
from token_service.server import service as token_service
from token_service.store import Store as TokenStore


@dataclass
class Traced:
    spans: InMemorySpanExporter
    token: TokenStub
    generation: GenerationStub
    health: health_pb2_grpc.HealthStub


@pytest.fixture(scope="module")
async def traced(database_url: str) -> AsyncIterator[Traced]:
    """Both services, started with tracing on and an in-memory exporter."""
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=tracing.sampler())
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.install(provider)
    token_pool = await create_pool(database_config(database_url, "token_service"))
    token_running = await server.start(token_service(TokenStore(token_pool, 30.0)), token_pool, "127.0.0.1:0")
    config = database_config(database_url, "generation_service")
    pool = await create_pool(config)
    token_address = f"127.0.0.1:{token_running.port}"
    try:
        async with grpc.aio.insecure_channel(token_address, interceptors=token_channel_interceptors()) as to_token:
            wired = parts(pool, config, to_token, TEST_RETRY, TEST_RECONCILER)
            running = await server.start(service(wired), pool, "127.0.0.1:0")
            async with (
                grpc.aio.insecure_channel(token_address) as token_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as generation_channel,
            ):
                yield Traced(
                    spans,
                    token_pb2_grpc.TokenServiceStub(token_channel),
                    generation_pb2_grpc.GenerationServiceStub(generation_channel),
                    health_pb2_grpc.HealthStub(token_channel),
                )
            await running.stop(1)
    finally:
        await token_running.stop(1)
        tracing.uninstall()
        await pool.close()
        await token_pool.close()


def rpc_span(spans: list[ReadableSpan], kind: SpanKind, method: str) -> ReadableSpan:
    [found] = [s for s in spans if s.kind is kind and s.attributes and s.attributes.get("rpc.method") == method]
    return found


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_create_job_is_one_trace_across_both_services(traced: Traced) -> None:
    user_id = (await traced.token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user.user_id
    traced.spans.clear()
    await traced.generation.CreateGenerationJob(job_request(user_id))
    finished = list(traced.spans.get_finished_spans())

    create = rpc_span(finished, SpanKind.SERVER, "CreateGenerationJob")
    assert create.context is not None and create.parent is None  # the caller sent no traceparent
    trace = [s for s in finished if s.context is not None and s.context.trace_id == create.context.trace_id]

    # The debit: a client span under the create call, then the token service's server span under
    # that client span (its traceparent came along), each with the statements it ran.
    append_client = rpc_span(trace, SpanKind.CLIENT, "AppendLedgerEntry")
    append_server = rpc_span(trace, SpanKind.SERVER, "AppendLedgerEntry")
    assert append_client in children(trace, create)
    assert children(trace, append_client) == [append_server]
    assert append_server.attributes is not None
    assert append_server.attributes.get("rpc.service") == "blumpo.token.v1.TokenService"

    def statements(parent: ReadableSpan) -> list[str]:
        return [
            str(s.attributes.get("db.statement"))
            for s in children(trace, parent)
            if s.kind is SpanKind.CLIENT and s.attributes and s.attributes.get("db.system") == "postgresql"
        ]

    assert any("append_entries" in sql for sql in statements(append_server)), statements(append_server)
    assert any("INSERT INTO generation_job" in sql for sql in statements(create)), statements(create)
    # Nothing of the call escaped into a trace of its own, and the reconciler's passes (every
    # 0.2 s here) left no traces of lone statements.
    assert [s for s in finished if s not in trace] == []


async def test_health_probes_are_not_traced(traced: Traced) -> None:
    user = (await traced.token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user
    traced.spans.clear()
    await traced.token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user.user_id))
    await traced.health.Check(health_pb2.HealthCheckRequest())
    services = {s.attributes.get("rpc.service") for s in traced.spans.get_finished_spans() if s.attributes}
    assert "blumpo.token.v1.TokenService" in services and "grpc.health.v1.Health" not in services


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, False),
    ],
)
def test_tracing_is_on_only_when_the_environment_asks(env: dict[str, str], on: bool) -> None:
    assert tracing.requested(env) is on


def test_an_unknown_exporter_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER must be otlp, console or none"):
        tracing.configure("token_service", {"OTEL_TRACES_EXPORTER": "zipkin"})


@pytest.mark.slow
async def test_a_service_process_exports_its_spans(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    process = ServiceProcess("token_service", env, port, tmp_path / "token.log")
    await process.start()
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            token: TokenStub = token_pb2_grpc.TokenServiceStub(channel)
            await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))
    finally:
        assert process.stop() == 0
    printed = process.log_path.read_text()
    assert '"name": "/blumpo.token.v1.TokenService/CreateUser"' in printed, printed[-5000:]
    assert '"service.name": "token_service"' in printed
    assert '"db.system": "postgresql"' in printed
