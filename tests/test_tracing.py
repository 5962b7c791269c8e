"""One CreateGenerationJob is one trace across both services, down to their database statements."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import logs, server, tracing
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


async def test_create_job_is_one_trace_across_both_services(traced: Traced, caplog: pytest.LogCaptureFixture) -> None:
    user_id = (await traced.token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user.user_id
    traced.spans.clear()
    caplog.handler.addFilter(logs.CallFields())
    with caplog.at_level(logging.INFO, logger="blumpo_common.server"):
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

    assert any("append_entry(" in sql for sql in statements(append_server)), statements(append_server)
    # Each service's log line of its call names the trace.
    trace_id = format(create.context.trace_id, "032x")
    assert {(r.message, getattr(r, "method", ""), getattr(r, "trace_id", None)) for r in caplog.records} >= {
        ("call", "/blumpo.generation.v1.GenerationService/CreateGenerationJob", trace_id),
        ("call", "/blumpo.token.v1.TokenService/AppendLedgerEntry", trace_id),
    }
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


def test_an_unknown_exporter_or_protocol_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER must be otlp, console or none"):
        tracing.configure("token_service", {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL must be grpc"):
        tracing.configure(
            "token_service",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        )


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP collector that keeps the spans it is sent, by service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans += [(attributes["service.name"], span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.slow
async def test_service_processes_export_one_trace_by_otlp(database_url: str, tmp_path: Path) -> None:
    collector = Collector()
    otlp = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, otlp)  # type: ignore[no-untyped-call]
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    await otlp.start()
    traced_env = {
        "DATABASE_URL": database_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    token_port, generation_port = free_port(), free_port()
    token_env = {"TOKEN_LISTEN_ADDR": f"127.0.0.1:{token_port}", "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    generation_env = {
        "GENERATION_LISTEN_ADDR": f"127.0.0.1:{generation_port}",
        "GENERATION_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "TOKEN_SERVICE_TARGET": f"127.0.0.1:{token_port}",
    }
    token = ServiceProcess("token_service", traced_env | token_env, token_port, tmp_path / "token.log")
    generation = ServiceProcess(
        "generation_service", traced_env | generation_env, generation_port, tmp_path / "generation.log"
    )
    try:
        await asyncio.gather(token.start(), generation.start())
        async with (
            grpc.aio.insecure_channel(token.address) as to_token,
            grpc.aio.insecure_channel(generation.address) as to_generation,
        ):
            token_stub: TokenStub = token_pb2_grpc.TokenServiceStub(to_token)
            user_id = (await token_stub.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user.user_id
            generation_stub: GenerationStub = generation_pb2_grpc.GenerationServiceStub(to_generation)
            await generation_stub.CreateGenerationJob(job_request(user_id))
        # SIGTERM: each process flushes what it has not exported yet (to the collector served on
        # this loop, so the wait for the exits runs on a thread).
        assert list(await asyncio.gather(asyncio.to_thread(token.stop), asyncio.to_thread(generation.stop))) == [0, 0]
    finally:
        token.stop()
        generation.stop()
        await otlp.stop(None)

    [create] = [span for service, span in collector.spans if span.name.endswith("/CreateGenerationJob")]
    in_trace = [(service, span) for service, span in collector.spans if span.trace_id == create.trace_id]
    [append_server] = [
        span
        for service, span in in_trace
        if service == "token_service"
        and span.kind == Span.SPAN_KIND_SERVER
        and span.name.endswith("/AppendLedgerEntry")
    ]
    [append_client] = [
        span
        for service, span in in_trace
        if service == "generation_service"
        and span.kind == Span.SPAN_KIND_CLIENT
        and span.name.endswith("/AppendLedgerEntry")
    ]
    assert append_client.parent_span_id == create.span_id
    assert append_server.parent_span_id == append_client.span_id
    statements = {service for service, span in in_trace if span.name in ("SELECT", "INSERT", "UPDATE", "WITH")}
    assert statements == {"token_service", "generation_service"}
